"""register: register a trained model as a version of `name` and run the promotion gate.

Reads: `run_id` (a train run, or an evaluate run) or, when empty, the best FINISHED evaluate run of the
experiment by `metric`; see bincounter/registry.py for the rules.
Logs: tags `bincounter.registered_model`, `bincounter.version`, `bincounter.verdict` (champion | challenger)
and `bincounter.gate_reason`; the version gets alias `challenger` and, through the gate (or `force`),
`champion` (plus `stage` when given); the version's tag `gate` says why.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bincounter import registry
from bincounter import entry
from bincounter.runs import finished_run, model_info, start_step
from steps.options import str2bool


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_id", default="", help="train or evaluate run; empty: the best evaluate run by metric")
    p.add_argument("--metric", default="test_accuracy",
                   help="gate metric, e.g. test_accuracy, test_check_auc, test_ece (min for *rmse/*mae/*loss/*ece/"
                        "*nll/*brier, else max)")
    p.add_argument("--name", default="bin-counter", help="registered model name")
    p.add_argument("--min_delta", type=float, default=0.0, help="how much better than the champion a version must be")
    p.add_argument("--force", type=str2bool, default=False, help="make the version champion whatever the gate says")
    p.add_argument("--stage", default="", help="also move the new champion to this stage (e.g. Production)")
    return p


def check_has_model(run_id: str) -> None:
    """Refuse, before a run is opened, a run_id that names neither an evaluate run nor a run with a model."""
    step = finished_run(run_id).data.tags.get("bincounter.step")
    if step == "evaluate":
        return
    try:
        model_info(f"runs:/{run_id}/model")
    except (MlflowException, OSError):
        raise ValueError(f"run_id {run_id}: a {step or 'untagged'!r} run has no model to register: give a train or "
                         "ensemble run, or an evaluate run") from None


def main(args: argparse.Namespace) -> str:
    if args.stage not in registry.STAGES:
        raise ValueError(f"stage must be one of {registry.STAGES[1:]} or empty, got {args.stage!r}")
    if args.min_delta < 0:
        raise ValueError(f"min_delta must be >= 0, got {args.min_delta}")
    if not args.metric:
        raise ValueError("metric must not be empty")
    if args.run_id:
        check_has_model(args.run_id)
    with start_step("register", vars(args)) as run:
        candidate = registry.choose(args.run_id, args.metric, run.info.experiment_id)
        mv = registry.register(candidate, args.name)
        promote, reason = registry.gate(args.name, mv, candidate, args.metric, args.min_delta, args.force)
        if promote:
            registry.set_champion(args.name, mv.version, args.stage)
        MlflowClient().set_model_version_tag(args.name, mv.version, "gate", reason)
        verdict = registry.CHAMPION if promote else registry.CHALLENGER
        mlflow.set_tags({"bincounter.registered_model": args.name, "bincounter.version": mv.version,
                         "bincounter.verdict": verdict, "bincounter.gate_reason": reason})
        print(f"register: {args.name} version {mv.version} from run {candidate.run_id} is {verdict}: {reason}")
        return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
