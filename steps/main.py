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
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from bincounter import entry, registry
from bincounter.runs import create_project_run, start_step
from bincounter.train_config import MONITORS, TUNABLE, TrainConfig
from steps import hpo as hpo_step
from steps import ingest as ingest_step
from steps import options
from steps import register as register_step
from steps import train as train_step
from steps.options import add_like, optional, str2bool

ROOT = Path(__file__).resolve().parents[1]
# train's parameters that main passes on (not given: train's own default)
LEVERS = (*TUNABLE, *options.lever_names(), "data_path", "calibrate", "target_accuracy", "max_review",
          "target_catch", "target_mix")


def step_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parsers of the steps main runs whose options it takes over (their defaults are main's)."""
    return {"ingest": ingest_step.get_args_parser(), "hpo": hpo_step.get_args_parser(),
            "train": train_step.get_args_parser(), "register": register_step.get_args_parser()}


def get_args_parser() -> argparse.ArgumentParser:
    steps = step_parsers()
    ingest, hpo, train = steps["ingest"], steps["hpo"], steps["train"]
    p = argparse.ArgumentParser(prog="main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_like(p, ingest, "source", choices=list(ingest_step.SOURCES),
             help="s3: the ABID bucket; local: a folder in its layout; synthetic: generated bins")
    p.add_argument("--labels", default="", help="run select on this label index (or `s3`) and ingest its list")
    add_like(p, ingest, "file_list", help="ingest this list when `labels` is empty")
    add_like(p, ingest, "data_dir", help="source=local: the folder, or several, comma-separated (as ingest)")
    add_like(p, ingest, "cache_dir")
    for name in ("num_images", "limit"):
        add_like(p, ingest, name)
    add_like(p, ingest, "count_min", help="smallest count (class)")
    add_like(p, ingest, "count_max", help="largest count (class)")
    add_like(p, hpo, "max_evals", help="hpo trials; 0 skips hpo")
    add_like(p, hpo, "epochs", "hpo_epochs", help="epochs per hpo trial (keep `warmup_epochs` below it)")
    add_like(p, train, "epochs", help="most training epochs (early stopping may end sooner)")
    add_like(p, train, "patience", help="epochs without a better `monitor` before training stops; 0 = never (the best "
                                        "epoch is kept either way)")
    add_like(p, train, "arch", help="the EfficientNet-Lites have ImageNet weights offline")
    add_like(p, train, "weights", help="imagenet, none, a state-dict file or a model URI")
    add_like(p, train, "image_size", help="training and serving resolution")
    add_like(p, train, "max_steps", help="train batches per epoch; 0 = all")
    add_like(p, train, "workers", help="data-loading processes; 0 = in the training process (best on a 2-core CPU)")
    p.add_argument("--monitor", default=TrainConfig.monitor, choices=list(MONITORS),
                   help="what hpo selects on and training keeps its best epoch by")
    add_like(p, steps["register"], "name", "model_name", help="registered model name")
    add_like(p, train, "seed", help="seeds everything")
    p.add_argument("--refit", type=str2bool, default=False,
                   help="after train, train again with its settings and best epoch count on train + validation "
                        "(train's refit_of); the refit is evaluated and registered")
    g = p.add_argument_group("train's levers, passed to train (and hpo where it takes them); empty: train's default")
    hpo_takes = {a.dest for a in hpo._actions}
    for name in LEVERS:  # train's type, read when given; None (not given): the step's own default
        kind = next(a.type for a in train._actions if a.dest == name)
        add_like(g, train, name, type=optional(kind or str), default=None, choices=None,
                 help="as train" + (", and to every hpo trial" if name in hpo_takes else ""))
    return p


def lever_params(entry_point: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The levers `entry_point` (train or hpo, whose parser is `parser`) declares, as parameter text: the given
    value, else the step's own default (so that reuse compares them too)."""
    defaults = {a.dest: a.default for a in parser._actions if a.option_strings}
    return {k: options.param_text(defaults[k] if getattr(args, k) is None else getattr(args, k))
            for k in LEVERS if k in defaults}


def check_training(args: argparse.Namespace) -> None:
    """ValueError (or argparse's exit) for parameters that train, or an hpo trial, would refuse."""
    steps = step_parsers()
    classes = list(range(args.count_min, args.count_max + 1))
    fixed = [f"--{k}={getattr(args, k)}" for k in ("arch", "weights", "image_size", "max_steps", "seed")]
    runs = [("train", args.epochs)] + ([("hpo", args.hpo_epochs)] if args.max_evals > 0 else [])
    for entry_point, epochs in runs:
        given = [f"--{k}={v}" for k, v in lever_params(entry_point, args, steps[entry_point]).items()]
        train_args = steps["train"].parse_args(["--split_run_id=", f"--epochs={epochs}", *fixed, *given])
        try:
            options.train_config(vars(train_args), classes)
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
    steps = step_parsers()
    with start_step("main", vars(args)) as run:
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
        hpo = (step("hpo", dict(split_run_id=split, max_evals=args.max_evals, epochs=args.hpo_epochs,
                                metric=args.monitor, **fixed, **lever_params("hpo", args, steps["hpo"])))
               if args.max_evals > 0 else "")
        train = step("train", dict(split_run_id=split, hpo_run_id=hpo, epochs=args.epochs, patience=args.patience,
                                   monitor=args.monitor, **fixed, **lever_params("train", args, steps["train"])))
        step("evaluate", dict(model_uri=f"runs:/{train}/model", split_run_id=split))
        if args.refit:
            train = step("train", dict(split_run_id=split, refit_of=train), key="refit")
            step("evaluate", dict(model_uri=f"runs:/{train}/model", split_run_id=split), key="refit_evaluate")
        register = step("register", dict(run_id=train, name=args.model_name))
        print("main: " + ", ".join(f"{k} {v}" for k, v in ids.items()))
        verdict(register, split, train)
        return ids


def verdict(register_run_id: str, split_run_id: str, train_run_id: str) -> None:
    """Say last, where nobody misses it, whether the new version serves; if the gate kept it a challenger, why
    and what to do (the gate's reason alone ends a long chain's output unnoticed)."""
    tags = mlflow.get_run(register_run_id).data.tags
    name, version = tags["bincounter.registered_model"], tags["bincounter.version"]
    if tags["bincounter.verdict"] == registry.CHAMPION:
        print(f"main: models:/{name}@champion is version {version}: `bincounter predict` and the served model use it")
        return
    print(f"main: {name} version {version} is NOT the champion (it stays @challenger), so `bincounter predict "
          f"--model models:/{name}@champion` still answers with the old champion. Why: "
          f"{tags['bincounter.gate_reason']}\n"
          f"  to compare on the same bins: mlflow run . -e evaluate --env-manager local "
          f"-P model_uri=models:/{name}@champion -P split_run_id={split_run_id}, then "
          f"mlflow run . -e register --env-manager local -P run_id={train_run_id} -P name={name}\n"
          f"  to serve it anyway: bincounter promote --name {name} --version {version}\n"
          f"  to keep it apart from that champion: rerun with -P model_name=<another name>")


if __name__ == "__main__":
    entry.run(main, get_args_parser())
