"""MLflow helpers shared by the steps: parameters, upstream runs and their artifacts."""
from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def str2bool(v: str | bool) -> bool:
    """'true'/'false' (any case, also 1/0, yes/no) -> bool; anything else is a clear argparse error."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "y"):
        return True
    if s in ("false", "0", "no", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def whole(v: str) -> int:
    """'42' or '42.0' (MLflow passes numbers as floats) -> 42; a clear argparse error otherwise."""
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if f != int(f):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}")
    return int(f)


def csv_ints(v: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; a clear argparse error otherwise."""
    try:
        return [int(x) for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {v!r}") from None


def finished_run(run_id: str, entry_point: str | None = None):
    """The run `run_id`, which must exist and be FINISHED (and, if given, come from `entry_point`)."""
    if not run_id:
        raise ValueError(f"an upstream {entry_point or ''} run id is required".replace("  ", " "))
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"run {run_id} not found: {e.message}") from None
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is {run.info.status}, not FINISHED: rerun that step first")
    step = run.data.tags.get("bincounter.step")
    if entry_point and step and step != entry_point:
        raise ValueError(f"run {run_id} is a {step!r} run, expected a {entry_point!r} run")
    return run


def download(run_id: str, artifact_path: str, dst: str | Path | None = None) -> Path:
    """An artifact of a run -> local path (downloaded through the tracking server, never read from its folder)."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst) if dst else None))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise ValueError(f"run {run_id} has no artifact {artifact_path!r}: {e}") from None


def download_uri(uri: str, dst: str | Path | None = None) -> Path:
    """A `runs:/...` URI or a local file -> local path."""
    if "://" not in uri and ":/" not in uri:
        p = Path(uri)
        if not p.exists():
            raise FileNotFoundError(f"{uri} does not exist")
        return p
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))


def start_step(step: str, args: argparse.Namespace, **run_kwargs):
    """Open (or join, under `mlflow run`) the step's run, tag it with the step and log all its parameters."""
    run = mlflow.start_run(**run_kwargs)
    mlflow.set_tag("bincounter.step", step)
    params = {k: ("" if v is None else v) for k, v in vars(args).items()}
    existing = mlflow.get_run(run.info.run_id).data.params
    # `mlflow run` has logged the entry point's parameters already; MLflow refuses to change a logged value
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    return run
