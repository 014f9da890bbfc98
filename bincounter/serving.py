"""The served model: an MLflow pyfunc (models-from-code) that turns image bytes into counts.

Contract: a row per image with `count`, `confidence`, `review`, `p_<count>` (null where the image is bad) and `error` (null where good); only a request malformed as a whole, or with no readable image, is refused (400).

Input: a DataFrame with a column `image` of JPEG/PNG bytes or their base64 text (the signature types it `any`,
so that MLflow's server hands the text over undecoded and text that is not base64 is an error of its own row,
not of the request). Output dtypes survive nulls (Int64, Float64, string): JSON `null`, Spark nulls.
The artifact holds only a state dict (`weights.pt`, loaded with weights_only=True) and `model_config.json`;
the code is this package, shipped with the model through `code_paths`.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from bincounter import calibration
from bincounter.model import IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_FILE, build_model, decide, get_arch, probabilities
from bincounter.transforms import EvalPreset, ImageError, decode_image

CONFIG_FILE = "model_config.json"
INPUT_COLUMN = "image"
MAX_BATCH = 64  # images per forward pass: bounds memory whatever the request size
DECODE_THREADS = min(8, os.cpu_count() or 1)  # decoding threads per loaded model
PACKAGE_DIR = Path(__file__).resolve().parent


def _as_bytes(value, i: int) -> bytes:
    """One `image` cell -> image bytes. Raises ImageError naming row `i`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        # base64 text may come as bytes; image files always hold bytes outside the base64 alphabet (JPEG/PNG
        # signatures), so valid base64 can only be such text
        try:
            return base64.b64decode(bytes(value), validate=True)
        except (binascii.Error, ValueError):
            return bytes(value)
    if isinstance(value, str):
        try:  # MLflow's own encoder wraps base64 lines at 76 characters
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"row {i}: text that is not base64 ({len(value)} characters; {e})",
                             "not_an_image") from None
    raise ImageError(f"row {i}: expected image bytes or base64 text, got {type(value).__name__}", "not_an_image")


class BinCounter:
    """A loaded bin counter: bytes in, counts and probabilities out. The one inference path of the project: the
    pyfunc, evaluate and the CLI all call `probabilities`. A request's images are decoded in parallel (a thread
    pool: PIL releases the GIL while it decodes and resizes), the next chunk while the model runs on this one;
    one forward per chunk of MAX_BATCH; on CUDA with mixed precision and channels_last.

    `target_mix` (the config's, or set on the object: evaluate, predict and reconcile override it) moves the
    answers from the mix of counts the model was trained on (`train_mix`) to another (calibration.prior_weights);
    `train` leaves them as they are."""

    def __init__(self, model: torch.nn.Module, config: dict, decode_threads: int = DECODE_THREADS):
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.model = model.eval().to(memory_format=torch.channels_last) if self.cuda else model.eval()
        self.config = config
        self.classes = [int(c) for c in config["classes"]]
        # models logged before the input settings travelled in the config were all torchvision ResNets
        # ... and before `fit`, all cropped
        self.transform = EvalPreset(int(config["image_size"]), config.get("mean", IMAGENET_MEAN),
                                    config.get("std", IMAGENET_STD), config.get("fit", "crop"))
        # models logged before these options existed: no test-time augmentation, the most likely count
        self.tta = bool(config.get("tta", False))
        self.decision = config.get("decision", "argmax")
        # models logged before calibration: temperature 1, no review threshold, reconcile's old 0.2
        self.trust = calibration.Trust.from_config(config)
        # models logged before prior correction: no training mix, target_mix train (no correction)
        self.train_mix = config.get("train_mix")
        self.target_mix = config.get("target_mix", calibration.TRAIN_MIX)
        self.decode_threads = decode_threads
        self._pool: ThreadPoolExecutor | None = None  # made on first use: a served model may be loaded, then forked

    @property
    def target_mix(self) -> str:
        """The mix of counts the answers are moved to: `train` (none), `natural` or `count:share,...`."""
        return self._target_mix

    @target_mix.setter
    def target_mix(self, spec: str) -> None:
        # checked against the model's counts and training mix here, so a bad mix is refused before any image
        self._prior = calibration.prior_weights(self.train_mix, spec, self.classes)
        self._target_mix = spec

    @classmethod
    def from_dir(cls, path: str | Path) -> "BinCounter":
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

    def forward(self, x: torch.Tensor) -> np.ndarray:
        """A batch of resized images, uint8 [N, 3, S, S] on the CPU -> probabilities [N, C] as float32 numpy.
        Normalised on the model's device (on CUDA a quarter of the bytes cross to it)."""
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = self.transform.normalize(x)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
            return probabilities(self.model, x, self.tta).float().cpu().numpy()

    def probabilities(self, images: list[bytes], names: list[str] | None = None) -> tuple[np.ndarray, list[str | None]]:
        """Image bytes (and a name for each, for the messages) -> (probabilities [N, C], one error message or
        None per image). A bad image gets a NaN row and its error; it never stops the others.
        Order: the model's distribution, its temperature, then the prior correction. The temperature was fitted on
        validation bins, which hold the training mix: it makes the probabilities honest at that mix, and only
        honest probabilities can be moved to another mix by Bayes' rule (p · target / train), so the prior comes
        last. `table` decides on the model's own distribution with the same prior (see there)."""
        probs, errors = self.calibrated(images, names)
        return calibration.apply_prior(probs, self._prior), errors

    @torch.inference_mode()
    def calibrated(self, images: list[bytes], names: list[str] | None = None) -> tuple[np.ndarray, list[str | None]]:
        """As `probabilities`, at the training mix: the model's distribution and its temperature, no prior
        correction (what an ensemble averages before its own temperature and prior)."""
        names = names or [f"row {i}" for i in range(len(images))]
        probs = np.full((len(images), len(self.classes)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(images)
        chunks = [range(s, min(s + MAX_BATCH, len(images))) for s in range(0, len(images), MAX_BATCH)]
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
                probs[idx] = calibration.apply_temperature(self.forward(torch.stack(tensors)), self.trust.temperature)
        return probs, errors

    def table(self, probs: np.ndarray) -> pd.DataFrame:
        """`probabilities`' output -> count (the decision rule on the model's own distribution, prior-corrected),
        confidence (that count's probability as given), review (confidence below the model's review threshold: a
        person should look), p_<count> columns."""
        # the count is the model's own answer: calibration changes how sure it says it is, not what it answers
        # (the median of a softened distribution drifts towards the middle count). The prior does change the
        # answer: so take the prior out, undo the temperature, and put the prior back on the model's own
        # distribution (p_model · target / train) before deciding; without it the counts would never move.
        own = calibration.apply_temperature(calibration.apply_prior(probs, self._unprior()), 1 / self.trust.temperature)
        best = decide(calibration.apply_prior(own, self._prior), self.decision)
        confidence = probs[np.arange(len(best)), best].astype("float64")
        out = pd.DataFrame({"count": np.asarray(self.classes)[best].astype("int64"), "confidence": confidence,
                            "review": confidence < self.trust.review_confidence})
        for j, c in enumerate(self.classes):
            out[f"p_{c}"] = probs[:, j].astype("float64")
        return out

    def _unprior(self) -> np.ndarray | None:
        """The weights that take the prior correction out again (none when there is none)."""
        return None if self._prior is None else 1.0 / self._prior


class Ensemble(BinCounter):
    """Several bin counters answering as one: the mean of the members' calibrated probabilities (each member
    decodes with its own normalisation and resolution, and applies its own temperature), then the ensemble's
    own temperature, decision rule and thresholds (fitted on validation by the ensemble step), then the
    ensemble's prior correction (the members' own are not applied: the mix is moved once, last). The members'
    folders sit in `members/<i>/` beside the config, whose `members` lists their source URIs and run ids.
    Training mix: the config's `train_mix`, else the mean of the members' (none if one lacks it); target mix: the
    config's `target_mix`, else the first member's (as the decision rule), else `train`."""

    def __init__(self, members: list[BinCounter], config: dict):
        self.members, self.config = members, config
        self.classes = [int(c) for c in config["classes"]]
        self.decision = config.get("decision", "argmax")
        self.trust = calibration.Trust.from_config(config)
        for m, source in zip(members, config["members"]):
            if m.classes != self.classes:
                raise ValueError(f"ensemble member {source['uri']} counts {m.classes}, the ensemble {self.classes}")
        mixes = [m.train_mix for m in members]
        self.train_mix = config.get("train_mix") or (
            None if any(t is None for t in mixes) else [float(x) for x in np.mean(mixes, axis=0)])
        self.target_mix = config.get("target_mix") or (
            members[0].target_mix if self.train_mix is not None else calibration.TRAIN_MIX)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Ensemble":
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        return cls([BinCounter.from_dir(path / "members" / str(i)) for i in range(len(config["members"]))], config)

    def calibrated(self, images: list[bytes], names: list[str] | None = None) -> tuple[np.ndarray, list[str | None]]:
        """As BinCounter.calibrated (BinCounter.probabilities adds the ensemble's prior correction); every member
        sees every image (they share the decoder, so the errors too)."""
        answers = [m.calibrated(images, names) for m in self.members]
        mean = np.mean([p for p, _ in answers], axis=0)
        return calibration.apply_temperature(mean, self.trust.temperature), answers[0][1]


class BinCounterModel(PythonModel):
    """The pyfunc wrapper: per-row answers (see the contract at the top); a bad image costs only its own row."""

    def load_context(self, context):
        self.counter = BinCounter.from_dir(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            cols = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise MlflowException(f"expected a column {INPUT_COLUMN!r} of image bytes, got {cols}",
                                  error_code=INVALID_PARAMETER_VALUE)
        cells = model_input[INPUT_COLUMN]
        if len(cells) == 1 and isinstance(cells.iloc[0], (list, np.ndarray)):
            cells = list(cells.iloc[0])  # MLflow makes `{"inputs": {"image": [...]}}` one row holding the list
        if len(cells) == 0:
            raise MlflowException("no images in the request", error_code=INVALID_PARAMETER_VALUE)
        images, errors = [], []
        for i, v in enumerate(cells):
            try:
                images.append(_as_bytes(v, i))
                errors.append(None)
            except ImageError as e:
                images.append(b"")  # decodes to an error of its own, overridden by this one below
                errors.append(str(e))
        probs, decode_errors = self.counter.probabilities(images)
        errors = [e or d for e, d in zip(errors, decode_errors)]
        bad = [e for e in errors if e]
        if len(bad) == len(images):
            raise MlflowException(f"none of the {len(images)} images could be read: " + "; ".join(bad[:5])
                                  + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""),
                                  error_code=INVALID_PARAMETER_VALUE)
        return rows(self.counter.table(probs), errors)


def rows(table: pd.DataFrame, errors: list[str | None]) -> pd.DataFrame:
    """BinCounter.table's output and one error or None per row -> the served rows: count (Int64), confidence
    and p_<c> (Float64) and review (boolean) null where the row has an error, and the `error` column (string)."""
    bad = pd.Series([e is not None for e in errors], index=table.index)
    out = table.copy()
    out["count"] = out["count"].astype("Int64").mask(bad)
    out["review"] = out["review"].astype("boolean").mask(bad)
    for c in ["confidence", *[c for c in out.columns if c.startswith("p_")]]:
        out[c] = out[c].astype("Float64").mask(bad)
    out["error"] = pd.array(errors, dtype="string")
    return out


def signature(classes: list[int]) -> ModelSignature:
    """In: `image` (any: bytes or base64 text, see the module docstring). Out: the per-row contract; `count` and
    the probabilities are optional (null for a bad image), as is `error` (null for a good one)."""
    out = [ColSpec("long", "count", required=False), ColSpec("double", "confidence", required=False),
           ColSpec("boolean", "review", required=False),  # a person should look: below the review threshold
           *[ColSpec("double", f"p_{c}", required=False) for c in classes], ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), INPUT_COLUMN)]), outputs=Schema(out))


def log_model(model: torch.nn.Module, config: dict, example_image: bytes, name: str = "model", **kwargs):
    """Log `model` as the pyfunc `name` in the active run: state dict + config as artifacts, this package as
    code, a signature and an input example made from `example_image`. -> the ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model_dir"
        d.mkdir()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / WEIGHTS_FILE)
        return _log_dir(d, config, example_image, [config["arch"]], name, **kwargs)


def log_ensemble(member_dirs: list[Path], config: dict, example_image: bytes, name: str = "model", **kwargs):
    """Log an ensemble as the pyfunc `name`: the members' model folders (copied in `config["members"]`'s order)
    and the ensemble's config. -> the ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model_dir"
        for i, src in enumerate(member_dirs):
            shutil.copytree(src, d / "members" / str(i))
        archs = [json.loads((m / CONFIG_FILE).read_text()).get("arch", "resnet18") for m in member_dirs]
        return _log_dir(d, config, example_image, archs, name, **kwargs)


def _log_dir(d: Path, config: dict, example_image: bytes, archs: list[str], name: str, **kwargs):
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PACKAGE_DIR / "pyfunc_model.py"),
        artifacts={"model_dir": str(d)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(config["classes"]),
        input_example=pd.DataFrame({INPUT_COLUMN: [example_image]}),
        pip_requirements=_requirements(archs),
        **kwargs,
    )


def _requirements(archs: list[str]) -> list[str]:
    """Pins of what the served model imports (timm for the EfficientNet-Lites); local build tags (+cu130)
    dropped, since serving images install from PyPI. mlflow by its own version: mlflow-skinny installs have no
    `mlflow` distribution. The weights travel in the model, so no weights wheel is needed."""
    from importlib.metadata import version
    extra = sorted({p for arch in archs for p in get_arch(arch).requires})
    packages = ["torch", "torchvision", "pillow", "pandas", "numpy", *extra]
    pins = [f"{p}=={version(p).split('+')[0]}" for p in packages]
    return [f"mlflow=={mlflow.__version__}", *pins]


def model_dir(model_uri: str, dst: str | Path) -> Path:
    """A model URI -> the local copy of its `model_dir` (weights + config, or an ensemble's members)."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    found = next((p.parent for p in local.rglob(CONFIG_FILE) if p.parent.name == "model_dir"), None)
    if found is None:
        raise ValueError(f"{model_uri} is not a bin counter model (no model_dir/{CONFIG_FILE})")
    return found


def load(model_uri: str) -> BinCounter:
    """A `runs:/`/`models:/` URI or a local model folder -> BinCounter (through mlflow.pyfunc.load_model)."""
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    return pyfunc.unwrap_python_model().counter
