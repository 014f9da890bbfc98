"""The SageMaker training job's entry (run by the job's `sm_entry.py`; not an MLproject entry point): the train
step's fit-and-log on the channels' data, in the MLflow run the local step made (bincounter.sagemaker_jobs).

Reads: SM_CHANNEL_SPLITS (train.csv, val.csv with paths relative to the image channels, classes.json),
SM_CHANNEL_TRAIN / SM_CHANNEL_VAL (the images); the train step's options as the job's hyperparameters, plus
`mlflow_run_id` and `hpo_trial`. Logs into that run what the train step logs (an hpo trial: metrics and
checkpoints only, no model). Under torchrun, ranks other than 0 train their share and log nothing.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import json
import os
import sys
from pathlib import Path

import mlflow
import torch.distributed as dist

from bincounter import entry
from bincounter.manifest import read_manifest
from bincounter.training import train_run
from steps import options
from steps import train as train_step


def channel_frames() -> tuple[list[int], dict]:
    """-> (classes, {"train": df, "val": df}) with paths into the image channels."""
    splits = Path(os.environ.get("SM_CHANNEL_SPLITS", "/opt/ml/input/data/splits"))
    classes = json.loads((splits / "classes.json").read_text())
    frames = {}
    for split in ("train", "val"):
        df = read_manifest(splits / f"{split}.csv")
        images = Path(os.environ.get(f"SM_CHANNEL_{split.upper()}", f"/opt/ml/input/data/{split}"))
        frames[split] = df.assign(path=[str(images / r) for r in df["path"]])
    return classes, frames


def main(argv: list[str] | None = None) -> str:
    p = train_step.get_args_parser(__doc__)
    p.add_argument("--mlflow_run_id", default="")
    p.add_argument("--hpo_trial", default="false", help="true: an hpo trial (no model; bincounter.hpo scores it)")
    args, unknown = p.parse_known_args(argv)
    trial = args.hpo_trial.lower() == "true"
    del args.hpo_trial
    if unknown:
        print(f"sm_entry: ignoring {unknown}", file=sys.stderr)
    run_id = args.mlflow_run_id or os.environ.get("MLFLOW_RUN_ID", "")
    del args.mlflow_run_id
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    args.backend = "local"
    classes, frames = channel_frames()
    cfg = options.train_config(vars(args), classes)
    try:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other processes: train their share, log nothing
            train_run(cfg, frames["train"], frames["val"], resume=args.resume)
            return run_id
        if trial:  # the trial's child run, made by the hpo step: metrics (best_<metric>) and checkpoints only
            with mlflow.start_run(run_id=run_id):
                train_run(cfg, frames["train"], frames["val"], resume=True)
            return run_id
        return train_step.fit_and_log(args, cfg, frames["train"], frames["val"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    entry.run(main)
