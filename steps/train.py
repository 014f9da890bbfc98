"""train: fit a bin counter (ResNet or EfficientNet-Lite, bincounter.model.ARCHS) on a split run's train/val data.

Reads: the split run's `splits/train.csv`, `splits/val.csv` and `classes`; optionally an hpo run's `best_*`.
Logs: params (the effective hyperparameters as `hp_*`), per-epoch `train_loss`, `train_accuracy`, `val_loss`,
`val_accuracy`, `val_rmse`, ... with step=epoch, `learning_curves.png`, `checkpoint/last.pt` after every epoch,
system metrics, and the best epoch's model (by `monitor`) as the pyfunc `model`.
Resume: rerun into the same run (`mlflow run ... --run-id <id>`); it continues after the last finished epoch.
Refit (`refit_of=<train run>`): that run's settings and best epoch count, trained on train + validation with
`calibration_frac` of the validation split kept back for calibration; tag `bincounter.refit_of`; the test split
stays untouched, so evaluate it as any train run.
backend=sagemaker: the same training as a SageMaker training job (bincounter.sagemaker_jobs, docs/sagemaker.md):
this step opens the run, hands its id to the job, which logs everything above into it; the step waits, prints
the job's status changes and fails with the job's FailureReason. Tags `bincounter.sagemaker_job`,
`bincounter.sagemaker_status`.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import tempfile

import mlflow

from bincounter import entry, trainer
from bincounter.runs import finished_run, run_name, start_step


def get_args_parser() -> argparse.ArgumentParser:
    return trainer.get_args_parser(__doc__)


def main(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        classes, train_df, val_df = trainer.load_split(args.split_run_id, tmp)
        if args.refit_of:  # the settings and epoch count another run chose on validation, on more bins
            args = trainer.refit_args(args)
            train_df, val_df = trainer.refit_data(train_df, val_df, args.calibration_frac, args.seed)
        hpo = finished_run(args.hpo_run_id, "hpo").data.params if args.hpo_run_id else None
        cfg = trainer.config_from(args, classes, hpo, keep_last=bool(args.refit_of))  # bad parameters fail here
        if args.backend != "sagemaker":
            return trainer.fit_and_log(args, cfg, train_df, val_df)
        from bincounter import sagemaker_jobs

        settings = trainer.sagemaker_settings(args).validate()  # before a run is opened and before any AWS call
        with start_step("train", args, run_name("train", {**vars(args), "lr": cfg.lr})) as run:
            mlflow.set_tag("bincounter.backend", "sagemaker")
            mlflow.log_params(trainer.effective_params(cfg))
            sagemaker_jobs.submit_and_wait(settings, trainer.job_params(args, cfg), run.info.run_id, classes,
                                           train_df, val_df)
            print(f"train: run {run.info.run_id} trained by SageMaker job "
                  f"{mlflow.get_run(run.info.run_id).data.tags.get('bincounter.sagemaker_job')}")
            return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
