"""hpo: hyperopt TPE search over lr, batch size, weight decay, optimizer, freeze, the transfer levers
freeze_epochs, backbone_lr, bn, trainable_blocks, and the regularisers ema and mixup
(bincounter.search_space.SEARCH_SPACE, narrowed by space_for). Every trial trains with the same levers for few
images (label_smoothing, augment, warmup_epochs, tta, decision, start_size, ...).

Reads: a FINISHED split run's `splits/train.csv` (a stratified `subset` of it per trial), `splits/val.csv` (the
selection metric) and `classes`; never the test split.
Logs: one nested child run per trial (params hp_* and plain names, per-epoch metrics; FAILED with tag
`bincounter.failure_reason` when the trial fails), `search_space.json`, `trials.json` (after every trial),
`trials.png`, params `best_<tunable>` for each of them (what `train -P hpo_run_id=...` reads, with `metric` as
its monitor), metric `best_<metric>`, tag `best_run_id`. Each trial keeps its best epoch by `metric` too.
Resume: rerun into the same run with the same parameters (`mlflow run . -e hpo --run-id <id> -P ...`); the
finished trials are kept and only the remaining ones run.
backend=sagemaker: each trial is a SageMaker training job (the train step's job, docs/sagemaker.md) that logs
into its child run; `parallel_trials` of them run at once. Data and code are uploaded once per search.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse

import mlflow
from mlflow.tracking import MlflowClient

from bincounter import entry, hpo, train_log
from bincounter.runs import load_split, start_step
from bincounter.search_space import space_for
from bincounter.train_config import MONITORS, TrainConfig
from steps import options
from steps import train as train_step
from steps.options import add_lever_options, add_model_options, add_sagemaker_options, whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split_run_id", required=True, help="a FINISHED split run")
    p.add_argument("--max_evals", type=whole, default=8, help="number of trials")
    p.add_argument("--epochs", type=whole, default=1, help="epochs per trial")
    p.add_argument("--subset", type=float, default=1.0,
                   help="fraction of the train split per trial (stratified, seeded)")
    p.add_argument("--metric", default=TrainConfig.monitor,
                   help=f"selection metric, one of {', '.join(MONITORS)} (rmse, mae, loss minimised; the others "
                        "maximised); each trial also keeps its best epoch by it")
    add_model_options(p)  # the train step's, passed through to every trial
    add_lever_options(p)
    p.add_argument("--backend", default="local", choices=["local", "sagemaker"],
                   help="local, or sagemaker: every trial a SageMaker training job (docs/sagemaker.md)")
    p.add_argument("--parallel_trials", type=whole, default=1,
                   help="trials running at once; more than 1 needs backend=sagemaker")
    add_sagemaker_options(p)
    return p


# the train step's parameters that every trial takes from this step
FIXED = ("split_run_id", "epochs", "arch", "weights", "image_size", "max_steps", "workers", "data_path", "seed",
         *options.lever_names())
NOT_SETTINGS = ("workers", "parallel_trials", *options.SAGEMAKER_OPTS)


def trial_runner(args: argparse.Namespace, settings, train_args: argparse.Namespace, make_config, classes,
                 train_df, val_df, staged):
    """-> runner(number, params, child_run_id) -> the trial's best_<metric>, trained by a SageMaker job."""
    from bincounter import sagemaker_jobs

    key = f"best_{args.metric}"

    def run(number: int, params: dict, child_id: str) -> float:
        job = {**options.job_params(vars(train_args), make_config(params)), "hpo_trial": True}
        sagemaker_jobs.submit_and_wait(settings, job, child_id, classes, train_df, val_df, staged=staged,
                                       log=lambda m: print(f"hpo: trial {number}: {m}", flush=True))
        metrics = MlflowClient().get_run(child_id).data.metrics
        if key not in metrics:
            raise RuntimeError(f"the job completed but logged no {key} into run {child_id}")
        return metrics[key]

    return run


def main(args: argparse.Namespace) -> str:
    hpo.check_options(args.metric, args.max_evals, args.subset)  # bad parameters fail before a run is opened
    if args.parallel_trials < 1 or (args.parallel_trials > 1 and args.backend != "sagemaker"):
        raise ValueError(f"parallel_trials must be at least 1, and more than 1 needs backend=sagemaker; "
                         f"got {args.parallel_trials} with backend={args.backend}")
    sm = options.sagemaker_settings(vars(args)).validate() if args.backend == "sagemaker" else None
    classes, train_df, val_df = load_split(args.split_run_id)
    # a trial is configured exactly as the train step would be with these fixed parameters and its draws
    train_args = train_step.get_args_parser().parse_args(
        [f"--{k}={options.param_text(getattr(args, k))}" for k in FIXED] + [f"--monitor={args.metric}"])
    options.train_config(vars(train_args), classes)  # validates the fixed parameters
    train_log.check_weights(args.weights, classes)  # a model of other counts: refused before any trial

    def make_config(draws: dict):
        return options.train_config(vars(train_args), classes, **draws)

    with start_step("hpo", vars(args)) as run:
        mlflow.log_input(mlflow.data.from_pandas(val_df, name="val"), context="validation")
        runner = None
        if sm:
            from bincounter import sagemaker_jobs

            mlflow.set_tag("bincounter.backend", "sagemaker")
            sub = hpo.train_subset(train_df, args.subset, args.seed)  # what search trains every trial on
            staged = sagemaker_jobs.stage(sm, f"hpo-{run.info.run_id}", args.arch, classes, sub, val_df)
            runner = trial_runner(args, sm, train_args, make_config, classes, sub, val_df, staged)
        hpo.search(make_config, train_df, val_df, metric=args.metric, max_evals=args.max_evals,
                   subset=args.subset, seed=args.seed,
                   # workers and where the trials run: speed only (parallel_trials: search adds it when > 1)
                   settings={k: v for k, v in vars(args).items() if k not in NOT_SETTINGS},
                   space=space_for(args.weights, len(hpo.train_subset(train_df, args.subset, args.seed)),
                                   args.epochs),
                   parallel=args.parallel_trials, trial_runner=runner)
        return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
