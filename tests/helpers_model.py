"""A tiny logged bin counter shared by the registry, serving, CLI and deploy tests.

Test modules import the `tiny_model` fixture (or call `build_tiny_model` from a wider-scoped fixture, and
`log_tiny_model` for more train runs). Training happens once per pytest process: the result is cached at module
level because a session fixture imported into several modules would be built once per module.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from helpers_data import make_manifest

CLASSES = [1, 2, 3, 4, 5]


@dataclass(frozen=True)
class TinyModel:
    run_id: str          # the "train" run holding the pyfunc `model`
    model_uri: str       # runs:/<run_id>/model
    images: Path         # a folder of generated bins: <count>-<k>.jpg, two per count
    torch_model: object  # the trained module, to log more runs cheaply


def log_tiny_model(torch_model, example: Path, experiment_id: str | None = None) -> str:
    """Log `torch_model` as the pyfunc `model` of a new FINISHED train run (in the active experiment unless
    given) -> run id."""
    from bincounter.train_config import TrainConfig
    from bincounter.train_log import log_trained_model

    cfg = TrainConfig(arch="resnet18", weights="none", image_size=32, classes=CLASSES)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tag("bincounter.step", "train")
        log_trained_model({"model": torch_model, "best_epoch": 1}, cfg, str(example))
    return run.info.run_id


@functools.cache
def build_tiny_model(root: Path) -> TinyModel:
    """Train and log the tiny model once (under `root`, in experiment `tiny-model`)."""
    from bincounter.train_config import TrainConfig
    from bincounter.training import train_run

    df = make_manifest(root / "bins", n=2 * len(CLASSES), size=64, classes=CLASSES, name="{count}-{k}")
    cfg = TrainConfig(arch="resnet18", weights="none", image_size=32, epochs=1, batch_size=16, workers=0,
                      max_steps=2, patience=0, classes=CLASSES)
    exp_id = mlflow.create_experiment("tiny-model")  # not the test's experiment: tests count their own runs
    with mlflow.start_run(experiment_id=exp_id):
        result = train_run(cfg, df, df, checkpoint=False)
    run_id = log_tiny_model(result["model"], Path(df["path"][0]), exp_id)
    return TinyModel(run_id, f"runs:/{run_id}/model", root / "bins", result["model"])


@pytest.fixture
def tiny_model(store) -> TinyModel:
    """The shared tiny model (built on first use, in the session store)."""
    return build_tiny_model(store / "tiny-model")
