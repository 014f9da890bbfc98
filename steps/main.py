"""main: the whole chain, each step its own run under this one.

[select, when `labels` is given] -> ingest -> split -> hpo (skipped when max_evals is 0) -> train -> evaluate
[-> refit: train again with train's settings and best epoch count on train + validation -> evaluate] -> register.
Every train lever (LEVERS: the tunables, the levers for few images, data_path) is a main parameter too, empty by
default: train's own default. Given, it reaches train, and every hpo trial where hpo takes it (the tunables
are what hpo searches; an explicit one still wins in train). Bad training parameters are refused before any
step runs.
A step whose FINISHED run with the same entry point, parameters (compared as logged: `same`) and git commit exists
in the experiment is reused, not rerun; a changed parameter upstream gives new run ids, so everything
downstream reruns too. A failing step stops the chain and this run ends FAILED.
Logs: tags `<step>_run_id` for every step, and the final champion/challenger verdict from register.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import shlex
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from bincounter import trainer
from bincounter import entry
from bincounter.model import ARCHS
from bincounter.runs import create_project_run, start_step, str2bool, whole
from bincounter.training import MONITORS, TUNABLE, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENTRY_PARAMS = {name: e.get("parameters", {}) for name, e in
                yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"].items()}
# train's parameters that main passes on (empty: train's own default, its MLproject default)
LEVERS = (*TUNABLE, *trainer.lever_names(), "data_path", "calibrate", "target_accuracy", "max_review",
          "target_catch", "target_mix")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="s3", choices=["s3", "local", "synthetic"],
                   help="s3: the ABID bucket; local: a folder in its layout; synthetic: generated bins")
    p.add_argument("--labels", default="", help="run select on this label index (or `s3`) and ingest its list")
    p.add_argument("--file_list", default="file_list.json", help="ingest this list when `labels` is empty")
    p.add_argument("--data_dir", default="", help="source=local: the folder, or several, comma-separated (as ingest)")
    p.add_argument("--cache_dir", default="data", help="the local image cache")
    p.add_argument("--num_images", type=whole, default=1000, help="source=synthetic: how many bins to draw")
    p.add_argument("--limit", type=whole, default=0, help="ingest only this many (a seeded random pick); 0 = all")
    p.add_argument("--count_min", type=whole, default=1, help="smallest count (class)")
    p.add_argument("--count_max", type=whole, default=5, help="largest count (class)")
    p.add_argument("--max_evals", type=whole, default=8, help="hpo trials; 0 skips hpo")
    p.add_argument("--hpo_epochs", type=whole, default=1, help="epochs per hpo trial (keep `warmup_epochs` below it)")
    p.add_argument("--epochs", type=whole, default=10, help="most training epochs (early stopping may end sooner)")
    p.add_argument("--patience", type=whole, default=TrainConfig.patience,
                   help="epochs without a better `monitor` before training stops; 0 = never (the best epoch is kept "
                        "either way)")
    p.add_argument("--arch", default="resnet50", choices=list(ARCHS),
                   help="the EfficientNet-Lites have ImageNet weights offline")
    p.add_argument("--weights", default="imagenet", help="imagenet, none, a state-dict file or a model URI")
    p.add_argument("--image_size", type=whole, default=224, help="training and serving resolution")
    p.add_argument("--max_steps", type=whole, default=0, help="train batches per epoch; 0 = all")
    p.add_argument("--workers", type=whole, default=0,
                   help="data-loading processes; 0 = in the training process (best on a 2-core CPU)")
    p.add_argument("--monitor", default=TrainConfig.monitor, choices=list(MONITORS),
                   help="what hpo selects on and training keeps its best epoch by")
    p.add_argument("--model_name", default="bin-counter", help="registered model name")
    p.add_argument("--seed", type=whole, default=42, help="seeds everything")
    p.add_argument("--refit", type=str2bool, default=False,
                   help="after train, train again with its settings and best epoch count on train + validation "
                        "(train's refit_of); the refit is evaluated and registered")
    g = p.add_argument_group("train's levers, passed to train (and hpo where it takes them); empty: train's default")
    for name in LEVERS:
        g.add_argument(f"--{name}", default="",
                       help="as train" + (", and to every hpo trial" if name in ENTRY_PARAMS["hpo"] else ""))
    return p


def lever_params(entry_point: str, args: argparse.Namespace) -> dict:
    """The levers `entry_point` (train or hpo) declares: the given value, else its MLproject default (so that
    reuse compares them too)."""
    params = ENTRY_PARAMS[entry_point]
    return {k: getattr(args, k) if getattr(args, k) != "" else params[k]["default"] for k in LEVERS if k in params}


def check_training(args: argparse.Namespace) -> None:
    """ValueError (or argparse's exit) for parameters that train, or an hpo trial, would refuse."""
    classes = list(range(args.count_min, args.count_max + 1))
    fixed = [f"--{k}={getattr(args, k)}" for k in ("arch", "weights", "image_size", "max_steps", "seed")]
    runs = [("train", args.epochs)] + ([("hpo", args.hpo_epochs)] if args.max_evals > 0 else [])
    for entry_point, epochs in runs:
        given = [f"--{k}={v}" for k, v in lever_params(entry_point, args).items()]
        train_args = trainer.get_args_parser().parse_args(["--split_run_id=", f"--epochs={epochs}", *fixed, *given])
        try:
            trainer.config_from(train_args, classes)
        except ValueError as e:
            raise ValueError(f"{entry_point} with epochs={epochs}: {e}") from None


def _git_commit() -> str | None:
    from mlflow.projects.utils import get_git_commit
    return get_git_commit(str(ROOT))


def find_finished(entry_point: str, parameters: dict, experiment_id: str):
    """The newest FINISHED run of `entry_point` in the experiment with these parameters (as strings) and
    this git commit, or None."""
    commit = _git_commit()
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' "
                         f"and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    for run in runs:
        if commit and run.data.tags.get(mlflow_tags.MLFLOW_GIT_COMMIT) != commit:
            continue
        if all(same(run.data.params.get(k), v) for k, v in parameters.items()):
            return run
    return None


def same(logged: str | None, given) -> bool:
    """Whether a logged parameter holds `given`: as `mlflow run` logs it (shell-quoted, '' for an empty one) or
    as a step logs it parsed ("True" for "true", "1" for "1.0")."""
    if logged is None:
        return False
    text = str(given)
    if logged in (text, shlex.quote(text)):
        return True
    if {logged.lower(), text.lower()} <= {"true", "false"}:
        return logged.lower() == text.lower()
    try:
        return float(logged) == float(text)
    except ValueError:
        return False


def get_or_run(entry_point: str, parameters: dict, experiment_id: str) -> str:
    """-> the run id of a reusable FINISHED run, or of a new run of the step (raises if it fails)."""
    found = find_finished(entry_point, parameters, experiment_id)
    if found:
        print(f"main: reusing {entry_point} run {found.info.run_id}")
        return found.info.run_id
    print(f"main: running {entry_point} with {parameters}")
    submitted = mlflow.projects.run(str(ROOT), entry_point=entry_point, parameters=parameters,
                                    env_manager="local", experiment_id=experiment_id, synchronous=True,
                                    run_id=create_project_run(entry_point, experiment_id, ROOT))
    return submitted.run_id


def main(args: argparse.Namespace) -> dict[str, str]:
    check_training(args)  # before any step runs
    with start_step("main", args) as run:
        exp = run.info.experiment_id
        ids: dict[str, str] = {}

        def step(name: str, params: dict, key: str = "") -> str:
            key = key or name  # the tag and id key: a step may run twice (train and its refit)
            ids[key] = get_or_run(name, {k: str(v) for k, v in params.items()}, exp)
            mlflow.set_tag(f"{key}_run_id", ids[key])
            return ids[key]

        file_list = args.file_list
        if args.labels:
            select = step("select", dict(labels=args.labels, count_min=args.count_min, count_max=args.count_max,
                                         output="", seed=args.seed))
            file_list = f"runs:/{select}/file_list.json"
        ingest = step("ingest", dict(source=args.source, file_list=file_list, data_dir=args.data_dir,
                                     cache_dir=args.cache_dir, num_images=args.num_images, limit=args.limit,
                                     count_min=args.count_min, count_max=args.count_max, seed=args.seed))
        split = step("split", dict(ingest_run_id=ingest, seed=args.seed))
        fixed = dict(arch=args.arch, weights=args.weights, image_size=args.image_size, max_steps=args.max_steps,
                     workers=args.workers, seed=args.seed)
        hpo = step("hpo", dict(split_run_id=split, max_evals=args.max_evals, epochs=args.hpo_epochs,
                               metric=args.monitor, **fixed, **lever_params("hpo", args))) if args.max_evals > 0 else ""
        train = step("train", dict(split_run_id=split, hpo_run_id=hpo, epochs=args.epochs, patience=args.patience,
                                   monitor=args.monitor, **fixed, **lever_params("train", args)))
        step("evaluate", dict(model_uri=f"runs:/{train}/model", split_run_id=split))
        if args.refit:
            train = step("train", dict(split_run_id=split, refit_of=train), key="refit")
            step("evaluate", dict(model_uri=f"runs:/{train}/model", split_run_id=split), key="refit_evaluate")
        step("register", dict(run_id=train, name=args.model_name))
        print("main: " + ", ".join(f"{k} {v}" for k, v in ids.items()))
        return ids


if __name__ == "__main__":
    entry.run(main, get_args_parser())
