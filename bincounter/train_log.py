"""A train run in MLflow: what it trains on beyond the split (a refit's bins) and what it logs. `fit_and_log` is
what a local train step and a SageMaker training job both do once they have their data: open (or join) the train
run, log its inputs and settings, train (bincounter.training), fit how far to trust the model
(bincounter.calibration) and log the model."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd

from bincounter import calibration, counters, metrics, priors, serving, training
from bincounter.manifest import stratified_split
from bincounter.model import check_classes, input_config
from bincounter.runs import run_name, start_step
from bincounter.train_config import TUNABLE, TrainConfig

CALIBRATION_BINS = "splits/calibration.csv"  # a refit's kept-back validation bins: what no part of it trained on


def refit_data(train_df: pd.DataFrame, val_df: pd.DataFrame, calibration_frac: float, seed: int):
    """-> (train + the validation bins not kept back, the kept-back calibration bins), stratified by count."""
    parts = stratified_split(val_df, (1 - calibration_frac, 0, calibration_frac), seed) if calibration_frac < 1 \
        else {"train": val_df.iloc[:0], "test": val_df}
    return pd.concat([train_df, parts["train"]], ignore_index=True), parts["test"]


def check_weights(weights: str, classes: list[int]) -> None:
    """Before training: `weights` that name an earlier model (`runs:/`, `models:/`) must count `classes`, the
    split's; ValueError naming both otherwise (model.check_classes). Other weights are not checked."""
    if weights.startswith(("runs:/", "models:/")):
        check_classes(weights, counters.logged_classes(weights), classes)


def effective_params(cfg: TrainConfig) -> dict:
    """What the run trains with where a parameter may defer to the hpo run: `hp_<tunable>`, `hp_monitor`."""
    return {**{f"hp_{k}": getattr(cfg, k) for k in TUNABLE}, "hp_monitor": cfg.monitor}


def log_trained_model(result: dict, cfg: TrainConfig, example_path: str, trust: calibration.Trust | None = None,
                      train_mix: list[float] | None = None, target_mix: str = priors.TRAIN_MIX):
    """Log the best model as the pyfunc `model` with a real image as its input example; its config carries the
    input settings, the decision rule and what `trust` fitted (temperature, review and check thresholds; none:
    the model loads with calibration's defaults, as models logged before calibration do), the mix of counts it
    learned from (`train_mix`, priors.train_mix) and the one it answers for (`target_mix`; none: the model
    loads as models logged before prior correction do, uncorrected)."""
    config = {"arch": cfg.arch, "classes": cfg.classes, "image_size": cfg.image_size, "fit": cfg.fit,
              **input_config(cfg.arch),
              "tta": cfg.tta, "decision": cfg.decision, "monitor": cfg.monitor, "best_epoch": result["best_epoch"],
              **(trust.config() if trust else {})}
    if train_mix is not None:
        config["train_mix"], config["target_mix"] = train_mix, target_mix
    priors.prior_weights(train_mix, target_mix, cfg.classes)  # refused here rather than when it loads
    return serving.log_model(result["model"], config, Path(example_path).read_bytes())


def fit_and_log(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, params: Mapping, *,
                resume: bool = True, refit_of: str = "", target_mix: str = priors.TRAIN_MIX,
                targets: calibration.TrustTargets = calibration.TrustTargets()) -> str:
    """Open (or join: MLFLOW_RUN_ID) the train run, log `params` (the step's parameters) and what `cfg` resolved,
    train (resuming from the run's checkpoint when `resume`), log curves, fit the trust thresholds aiming at
    `targets` and log the model answering for `target_mix` -> run id. `refit_of`: the train run this one refits
    (tagged; `val_df` is then its kept-back calibration bins, logged as CALIBRATION_BINS)."""
    name = ("refit " if refit_of else "") + run_name("train", {**params, "lr": cfg.lr})
    mix = priors.train_mix(train_df["count"], cfg.classes, cfg.balanced)
    priors.prior_weights(mix, target_mix, cfg.classes)  # a count never trained on: refused before training
    with start_step("train", params, name, log_system_metrics=True) as run:
        mlflow.log_params({**effective_params(cfg), "train_mix": priors.format_mix(cfg.classes, mix)})
        if refit_of:  # `mlflow run` logged the parameters as given: say what the refit took instead
            mlflow.set_tag("bincounter.refit_of", refit_of)
            mlflow.log_params({"refit_epochs": cfg.epochs, "refit_seed": cfg.seed})
            mlflow.log_text(val_df.to_csv(index=False), CALIBRATION_BINS)
        mlflow.log_input(mlflow.data.from_pandas(train_df, name="train"), context="training")
        mlflow.log_input(mlflow.data.from_pandas(val_df, name="val"), context="validation")
        result = training.train_run(cfg, train_df, val_df, resume=resume, val_predictions=True)
        metrics.log_figure(metrics.plot_curves(result["history"]), "learning_curves.png")
        trust = calibration.fit_and_log(result["val_probs"], result["val_labels"], cfg.classes, cfg.decision, targets)
        log_trained_model(result, cfg, val_df["path"].iloc[0], trust, mix, target_mix)
        print(f"train: run {run.info.run_id}, best epoch {result['best_epoch']} by {cfg.monitor}, "
              f"val_accuracy {result['best']['val_accuracy']:.3f}, val_rmse {result['best']['val_rmse']:.3f}")
        return run.info.run_id
