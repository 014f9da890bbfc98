"""ResNet builder and weights loading: `imagenet` (torchvision), `none` (random), a state-dict file, or an
earlier model (`runs:/<id>/model`, `models:/name@alias`)."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models

ARCHS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
}
WEIGHTS_FILE = "weights.pt"  # the state dict inside a logged model's artifacts
DECISIONS = ("argmax", "median")


class WeightsUnavailable(RuntimeError):
    """The asked-for weights cannot be had (offline, missing file)."""


def _imagenet_state(arch: str) -> dict:
    weights = ARCHS[arch][1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # urllib has no timeout of its own: never hang on a dead network
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, timeout, hash mismatch
        raise WeightsUnavailable(
            f"cannot get ImageNet weights for {arch} ({e.__class__.__name__}: {e}). Without internet use "
            f"weights=none, or put {Path(weights.url).name} at {cached} (the torch hub cache), or pass "
            f"weights=<path to a state dict>") from None
    finally:
        socket.setdefaulttimeout(old)


def _state_from(weights: str) -> dict:
    """A state-dict file or an MLflow model URI -> state dict (loaded with weights_only=True)."""
    if weights.startswith(("runs:/", "models:/")):
        import mlflow
        try:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=weights))
        except Exception as e:
            raise WeightsUnavailable(f"weights {weights}: cannot download ({e})") from None
        found = sorted(root.rglob(WEIGHTS_FILE))
        if not found:
            raise WeightsUnavailable(f"weights {weights}: no {WEIGHTS_FILE} in that model")
        path = found[0]
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"weights {weights!r} is not imagenet, none, a model URI or an existing file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    return state


def build_model(arch: str, num_classes: int, weights: str = "none", freeze: bool = False) -> nn.Module:
    """A torchvision ResNet with a fresh `num_classes` head. Backbone weights per `weights`; a head of the
    right shape in the given weights is kept (fine-tuning an earlier bin counter), otherwise it is new."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    model = ARCHS[arch][0](weights=None)
    if weights not in ("none", ""):
        state = _imagenet_state(arch) if weights == "imagenet" else _state_from(weights)
        head = {k: v for k, v in state.items() if k.startswith("fc.")}
        model.fc = nn.Linear(model.fc.in_features, state["fc.weight"].shape[0]) if "fc.weight" in head else model.fc
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsUnavailable(f"weights {weights} do not fit {arch}: {str(e)[:300]}") from None
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model


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
