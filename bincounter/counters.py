"""The loaded bin counter: one network (BinCounter) or several (Ensemble), answering under `Settings` (how a model
answers: tta, temperature, target mix, decision rule, images per forward pass), said explicitly and never set on
a loaded model. A model folder holds a state dict (`weights.pt`, loaded with weights_only=True) and
`model_config.json` (its input settings, decision rule, trust and mixes); `load` gets the counter of a logged
model, `model_dir` and `logged_classes` read a logged model's folder and counts.
"""
from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from bincounter import calibration, priors
from bincounter.model import (DECISIONS, IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_FILE, build_model, decide,
                              probabilities)
from bincounter.runs import load_pyfunc
from bincounter.transforms import EvalPreset, ImageError, decode_image

CONFIG_FILE = "model_config.json"
MAX_BATCH = 64  # images per forward pass unless told (the served model's, HTTP and Spark): bounds memory
DECODE_THREADS = min(8, os.cpu_count() or 1)  # decoding threads per loaded model


@dataclass(frozen=True)
class Settings:
    """How a model answers, passed to it explicitly (predict.predict, BaseCounter's methods), never set on it;
    None: as the model was logged (its config's tta, decision rule and target mix). tta: the mean over each
    image and its mirror image; calibrated: False gives the raw probabilities (temperature 1, for an ensemble and
    every member alike); target_mix: `train`, `natural` or `count:share,...` (priors.parse_mix; checked against
    the model's counts when it answers); decision: argmax or median; batch_size: images per forward pass. Bad
    values raise ValueError naming the setting."""
    tta: bool | None = None
    calibrated: bool = True
    target_mix: str | None = None
    decision: str | None = None
    batch_size: int = MAX_BATCH

    def __post_init__(self):
        if self.tta not in (None, True, False) or self.calibrated not in (True, False):
            raise ValueError(f"tta and calibrated must be true or false, got {self.tta!r} and {self.calibrated!r}")
        if self.decision is not None and self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of images, 1 or more, got {self.batch_size!r}")
        if self.target_mix is not None:
            priors.parse_mix(self.target_mix)


class BaseCounter:
    """What every loaded bin counter shares, one network (BinCounter) or several (Ensemble): its counts and how it
    answers as logged (`config`: the decision rule, the temperature and thresholds in `trust`, the mix of counts
    it learned from, `train_mix`, and the one its answers are moved to, `target_mix`). `settings` fills a
    predict.Settings from these; `probabilities` and `table` answer under it (predict.predict calls both).

    Order: the model's distribution, its temperature, then the prior correction. The temperature was fitted on
    validation bins, which hold the training mix: it makes the probabilities honest at that mix, and only honest
    probabilities can be moved to another mix by Bayes' rule (p · target / train), so the prior comes last."""

    tta: bool | None = None  # test-time augmentation as logged (an ensemble's: None, each member's own)

    def __init__(self, config: dict, train_mix: list[float] | None, target_mix: str):
        self.config = config
        self.classes = [int(c) for c in config["classes"]]
        self.decision = config.get("decision", "argmax")
        # models logged before calibration: temperature 1, no review threshold, reconcile's old 0.2
        self.trust = calibration.Trust.from_config(config)
        self.train_mix = train_mix
        self.target_mix = target_mix

    @property
    def target_mix(self) -> str:
        """The mix of counts the answers are moved to unless told otherwise: `train` (none), `natural` or
        `count:share,...`."""
        return self._target_mix

    @target_mix.setter
    def target_mix(self, spec: str) -> None:
        self._weights(spec)  # checked against the model's counts and training mix: a refused mix changes nothing
        self._target_mix = spec

    def _weights(self, target_mix: str):
        """priors.prior_weights for this model (None: no correction); ValueError naming target_mix."""
        return priors.prior_weights(self.train_mix, target_mix, self.classes)

    def settings(self, given: Settings | None = None) -> Settings:
        """`given` (None: the served model's, forward passes of MAX_BATCH) with what it leaves open filled with
        the model's own (tta, decision, target mix); its target mix checked against the model's counts and
        training mix (ValueError naming target_mix), before any image is read."""
        s = Settings(batch_size=MAX_BATCH) if given is None else given
        s = replace(s, tta=self.tta if s.tta is None else s.tta, decision=s.decision or self.decision,
                    target_mix=s.target_mix or self.target_mix)
        self._weights(s.target_mix)
        return s

    def temperature(self, settings: Settings) -> float:
        """The temperature applied under `settings`: the model's own, or 1 when not `calibrated`."""
        return self.trust.temperature if settings.calibrated else 1.0

    def calibrated(self, images: list[bytes], names: list[str] | None = None,
                   settings: Settings | None = None) -> tuple[np.ndarray, list[str | None]]:
        """As `probabilities`, at the training mix: no prior correction (what an ensemble averages)."""
        raise NotImplementedError

    def probabilities(self, images: list[bytes], names: list[str] | None = None,
                      settings: Settings | None = None) -> tuple[np.ndarray, list[str | None]]:
        """Image bytes (and a name for each, for the messages) -> (probabilities [N, C], one error message or
        None per image). A bad image gets a NaN row and its error; it never stops the others."""
        s = self.settings(settings)
        probs, errors = self.calibrated(images, names, s)
        return priors.apply_prior(probs, self._weights(s.target_mix)), errors

    def table(self, probs: np.ndarray, settings: Settings | None = None) -> pd.DataFrame:
        """`probabilities`' output (under the same settings) -> count (the decision rule on the model's own
        distribution, prior-corrected), confidence (that count's probability as given), review (confidence below
        the model's review threshold: a person should look), p_<count> columns."""
        s = self.settings(settings)
        weights = self._weights(s.target_mix)
        # the count is the model's own answer: calibration changes how sure it says it is, not what it answers
        # (the median of a softened distribution drifts towards the middle count). The prior does change the
        # answer: so take the prior out, undo the temperature, and put the prior back on the model's own
        # distribution (p_model · target / train) before deciding; without it the counts would never move.
        unprior = None if weights is None else 1.0 / weights
        own = calibration.apply_temperature(priors.apply_prior(probs, unprior), 1 / self.temperature(s))
        best = decide(priors.apply_prior(own, weights), s.decision)
        confidence = probs[np.arange(len(best)), best].astype("float64")
        out = pd.DataFrame({"count": np.asarray(self.classes)[best].astype("int64"), "confidence": confidence,
                            "review": confidence < self.trust.review_confidence})
        for j, c in enumerate(self.classes):
            out[f"p_{c}"] = probs[:, j].astype("float64")
        return out


class BinCounter(BaseCounter):
    """One loaded network: bytes in, probabilities out. A request's images are decoded in parallel (a thread
    pool: PIL releases the GIL while it decodes and resizes), the next chunk while the model runs on this one;
    one forward per chunk of the settings' batch_size; on CUDA with mixed precision and channels_last."""

    def __init__(self, model: torch.nn.Module, config: dict, decode_threads: int = DECODE_THREADS):
        # models logged before prior correction: no training mix, target_mix train (no correction)
        super().__init__(config, config.get("train_mix"), config.get("target_mix", priors.TRAIN_MIX))
        # models logged before these options existed: no test-time augmentation (and the most likely count)
        self.tta = bool(config.get("tta", False))
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.model = model.eval().to(memory_format=torch.channels_last) if self.cuda else model.eval()
        # models logged before the input settings travelled in the config were all torchvision ResNets
        # ... and before `fit`, all cropped
        self.transform = EvalPreset(int(config["image_size"]), config.get("mean", IMAGENET_MEAN),
                                    config.get("std", IMAGENET_STD), config.get("fit", "crop"))
        self.decode_threads = decode_threads
        self._pool: ThreadPoolExecutor | None = None  # made on first use: a served model may be loaded, then forked

    @classmethod
    def from_dir(cls, path: str | Path) -> BaseCounter:
        """A logged model's `model_dir` (weights + config, or an ensemble's members) -> a loaded counter."""
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        if "members" in config:
            return Ensemble.from_dir(path)
        model = build_model(config["arch"], len(config["classes"]), weights="none")
        model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return cls(model, config)

    def _prepare(self, data: bytes, name: str) -> torch.Tensor | ImageError:
        """One image's bytes -> uint8 [3, S, S] (decoded, resized, cropped), or the ImageError saying why not
        (runs in the pool; normalising waits for the whole chunk)."""
        try:
            return self.transform.resize(decode_image(data, name))
        except ImageError as e:
            return e

    def _submit(self, images: list[bytes], names: list[str], chunk: range) -> list[Future]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="bincounter-decode")
        return [self._pool.submit(self._prepare, images[i], names[i]) for i in chunk]

    def forward(self, x: torch.Tensor, tta: bool) -> np.ndarray:
        """A batch of resized images, uint8 [N, 3, S, S] on the CPU -> probabilities [N, C] as float32 numpy.
        Normalised on the model's device (on CUDA a quarter of the bytes cross to it)."""
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = self.transform.normalize(x)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            return probabilities(self.model, x, tta).float().cpu().numpy()

    @torch.inference_mode()
    def calibrated(self, images: list[bytes], names: list[str] | None = None,
                   settings: Settings | None = None) -> tuple[np.ndarray, list[str | None]]:
        """As `probabilities`, at the training mix: the model's distribution and its temperature (unless not
        `calibrated`), no prior correction."""
        s = self.settings(settings)
        names = names or [f"row {i}" for i in range(len(images))]
        probs = np.full((len(images), len(self.classes)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(images)
        step = s.batch_size
        chunks = [range(k, min(k + step, len(images))) for k in range(0, len(images), step)]
        pending = self._submit(images, names, chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            ready = pending
            if k + 1 < len(chunks):  # decode the next chunk while the model runs on this one
                pending = self._submit(images, names, chunks[k + 1])
            idx, tensors = [], []
            for i, f in zip(chunk, ready):
                out = f.result()
                if isinstance(out, ImageError):
                    errors[i] = str(out)
                else:
                    idx.append(i)
                    tensors.append(out)
            if tensors:
                probs[idx] = calibration.apply_temperature(self.forward(torch.stack(tensors), s.tta),
                                                           self.temperature(s))
        return probs, errors


class Ensemble(BaseCounter):
    """Several bin counters answering as one: the mean of the members' calibrated probabilities (each member
    decodes with its own normalisation and resolution, and applies its own temperature), then the ensemble's
    own temperature, decision rule and thresholds (fitted on validation by the ensemble step), then the
    ensemble's prior correction (the members' own are not applied: the mix is moved once, last). The settings'
    tta (None: each member's own), calibrated and batch_size reach every member. The members' folders sit in
    `members/<i>/` beside the config, whose `members` lists their source URIs and run ids.
    Training mix: the config's `train_mix`, else the mean of the members' (none if one lacks it); target mix: the
    config's `target_mix`, else the first member's (as the decision rule), else `train`."""

    def __init__(self, members: list[BinCounter], config: dict):
        classes = [int(c) for c in config["classes"]]
        for m, source in zip(members, config["members"]):
            if m.classes != classes:
                raise ValueError(f"ensemble member {source['uri']} counts {m.classes}, the ensemble {classes}")
        mixes = [m.train_mix for m in members]
        train_mix = config.get("train_mix") or (
            None if any(t is None for t in mixes) else [float(x) for x in np.mean(mixes, axis=0)])
        target_mix = config.get("target_mix") or (
            members[0].target_mix if train_mix is not None else priors.TRAIN_MIX)
        super().__init__(config, train_mix, target_mix)
        self.members = members

    @classmethod
    def from_dir(cls, path: str | Path) -> "Ensemble":
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        return cls([BinCounter.from_dir(path / "members" / str(i)) for i in range(len(config["members"]))], config)

    def calibrated(self, images: list[bytes], names: list[str] | None = None,
                   settings: Settings | None = None) -> tuple[np.ndarray, list[str | None]]:
        """As BinCounter.calibrated: the members' mean under the same tta, calibrated and batch_size, then the
        ensemble's temperature; every member sees every image (they share the decoder, so the errors too)."""
        s = self.settings(settings)
        each = Settings(tta=s.tta, calibrated=s.calibrated, batch_size=s.batch_size)  # rule and mix: the ensemble's
        answers = [m.calibrated(images, names, each) for m in self.members]
        mean = np.mean([p for p, _ in answers], axis=0)
        return calibration.apply_temperature(mean, self.temperature(s)), answers[0][1]


def model_dir(model_uri: str, dst: str | Path) -> Path:
    """A model URI -> the local copy of its `model_dir` (weights + config, or an ensemble's members)."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    found = next((p.parent for p in local.rglob(CONFIG_FILE) if p.parent.name == "model_dir"), None)
    if found is None:
        raise ValueError(f"{model_uri} is not a bin counter model (no model_dir/{CONFIG_FILE})")
    return found


def logged_classes(model_uri: str) -> list[int]:
    """A logged bin counter's URI (`runs:/`, `models:/`) -> the counts it tells apart (its config's `classes`),
    reading its config alone where the model is laid out as log_model lays it out. ValueError naming the URI when
    it cannot be read or is not a bin counter."""
    try:
        try:  # the config alone, not the weights beside it
            config_uri = f"{model_uri.rstrip('/')}/artifacts/model_dir/{CONFIG_FILE}"
            return [int(c) for c in json.loads(mlflow.artifacts.load_text(config_uri))["classes"]]
        except (mlflow.exceptions.MlflowException, OSError):
            with tempfile.TemporaryDirectory() as tmp:  # another layout (a run's root): find the config
                config = json.loads((model_dir(model_uri, tmp) / CONFIG_FILE).read_text())
                return [int(c) for c in config["classes"]]
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise ValueError(f"{model_uri}: cannot read the model ({getattr(e, 'message', None) or e})") from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{model_uri}: its {CONFIG_FILE} lists no classes (not a bin counter model)") from None


def load(model_uri: str) -> BaseCounter:
    """A `runs:/`/`models:/` URI or a local model folder -> its BinCounter or Ensemble (through
    mlflow.pyfunc.load_model)."""
    pyfunc = load_pyfunc(model_uri)
    return pyfunc.unwrap_python_model().counter
