"""train: fit a bin counter (ResNet or EfficientNet-Lite, bincounter.model.ARCHS) on a split run's train/val data.

Reads: the split run's `splits/train.csv`, `splits/val.csv` and `classes`; optionally an hpo run's `best_*`.
Fine-tune (`weights=models:/bin-counter@champion` or `runs:/<id>/model`): start from that model, which must
count the split's classes (refused before training otherwise). On a split that kept the champion's test bins
(`split -P keep_test_of=...`), evaluate both on it and register's gate compares them on the same bins.
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

import mlflow

from bincounter import entry, priors, train_log
from bincounter.runs import finished_run, load_split, run_name, start_step
from steps import options
from steps.options import (add_calibration_options, add_config_option, add_lever_options, add_model_options,
                           add_monitor_option, add_sagemaker_options, add_tunable_options, fraction, str2bool)


def get_args_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The train step's options (also what a SageMaker training job parses, with its own `description`)."""
    p = argparse.ArgumentParser(prog="train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split_run_id", required=True, help="a FINISHED split run")
    p.add_argument("--hpo_run_id", default="", help="take lr, batch_size, ... from this hpo run's best trial")
    add_config_option(p, "epochs", "most epochs (early stopping may end sooner)")
    add_tunable_options(p)
    add_model_options(p)
    add_config_option(p, "patience", "epochs without a better monitor before stopping; 0 = never")
    add_monitor_option(p)
    p.add_argument("--resume", type=str2bool, default=True, help="continue from this run's checkpoint if it has one")
    add_lever_options(p)
    g = p.add_argument_group("refit: the final model on every labelled bin outside the test split")
    g.add_argument("--refit_of", default="",
                   help="a FINISHED train run on the same split whose validation chose the settings: train again with "
                        "its settings for its best epoch count on train + validation (no early stopping), keeping "
                        "`calibration_frac` of the validation split back to calibrate; tag `bincounter.refit_of`")
    g.add_argument("--calibration_frac", type=fraction, default=0.5,
                   help="refit: the share of the validation split kept back to fit the temperature and thresholds")
    add_calibration_options(p)
    p.add_argument("--target_mix", type=options.target_mix, default=priors.TRAIN_MIX,
                   help="the mix of counts the model answers for, kept in its config (evaluate, predict and "
                        "reconcile may override it): train (as trained, no correction), natural (ABID's mix of "
                        "counts 1-5) or shares of every count like 1:0.12,2:0.22,3:0.26,4:0.23,5:0.17; the "
                        "probabilities are divided by the training mix and multiplied by this one")
    p.add_argument("--backend", default="local", choices=["local", "sagemaker"],
                   help="local: train here; sagemaker: the same training as a SageMaker training job "
                        "(docs/sagemaker.md)")
    add_sagemaker_options(p)
    return p


def fit_and_log(args: argparse.Namespace, cfg, train_df, val_df) -> str:
    """train_log.fit_and_log with this step's parsed options -> the train run's id (also the SageMaker job's)."""
    return train_log.fit_and_log(cfg, train_df, val_df, vars(args), resume=args.resume, refit_of=args.refit_of,
                                 target_mix=args.target_mix, targets=options.trust_targets(vars(args)))


def main(args: argparse.Namespace) -> str:
    classes, train_df, val_df = load_split(args.split_run_id)
    if args.refit_of:  # the settings and epoch count another run chose on validation, on more bins
        args = options.refit_args(args, get_args_parser())
        train_df, val_df = train_log.refit_data(train_df, val_df, args.calibration_frac, args.seed)
    hpo = finished_run(args.hpo_run_id, "hpo").data.params if args.hpo_run_id else None
    cfg = options.train_config(vars(args), classes, hpo, keep_last=bool(args.refit_of))  # bad ones fail here
    train_log.check_weights(cfg.weights, classes)  # a model of other counts: refused before training
    if args.backend != "sagemaker":
        return fit_and_log(args, cfg, train_df, val_df)
    from bincounter import sagemaker_jobs

    settings = options.sagemaker_settings(vars(args)).validate()  # before a run is opened and any AWS call
    with start_step("train", vars(args), run_name("train", {**vars(args), "lr": cfg.lr})) as run:
        mlflow.set_tag("bincounter.backend", "sagemaker")
        mlflow.log_params(train_log.effective_params(cfg))
        sagemaker_jobs.submit_and_wait(settings, options.job_params(vars(args), cfg), run.info.run_id, classes,
                                       train_df, val_df)
        print(f"train: run {run.info.run_id} trained by SageMaker job "
              f"{mlflow.get_run(run.info.run_id).data.tags.get('bincounter.sagemaker_job')}")
        return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
