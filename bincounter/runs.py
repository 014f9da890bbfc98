"""MLflow helpers shared by the steps: parameters, upstream runs and their artifacts."""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import SourceType
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.default_context import _get_user
from mlflow.utils import mlflow_tags
from mlflow.utils.git_utils import get_git_commit

from bincounter.manifest import read_manifest, split_artifact


def csv_ints(v: str) -> list[int]:
    """'1,2,3' (a list as a run logs it) -> [1, 2, 3]; ValueError saying what it expected otherwise."""
    try:
        return [int(x) for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated whole numbers, got {v!r}") from None


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


def download(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """An artifact of a run -> its local copy under `dst` (downloaded through the tracking server, never read from
    its folder). The caller owns `dst`: MLflow's own default is a temporary folder nobody removes."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise ValueError(f"run {run_id} has no artifact {artifact_path!r}: {e}") from None


def read_split(run_id: str, split: str):
    """One part (train, val, test) of a split run -> its manifest as a DataFrame."""
    with tempfile.TemporaryDirectory(prefix="bincounter-") as tmp:
        return read_manifest(download(run_id, split_artifact(split), tmp))


def load_split(split_run_id: str):
    """What training needs of a FINISHED split run -> (its classes, train manifest, val manifest); ValueError when
    either part is empty."""
    split = finished_run(split_run_id, "split")
    classes = csv_ints(split.data.params["classes"])
    train_df, val_df = read_split(split_run_id, "train"), read_split(split_run_id, "val")
    if train_df.empty or val_df.empty:
        raise ValueError(f"split run {split_run_id} has an empty train or val split; ingest more images")
    return classes, train_df, val_df


def is_local(uri: str) -> bool:
    """Whether `uri` is a local path rather than a URI with a scheme (runs:/, models:/, s3://, ...)."""
    return "://" not in uri and ":/" not in uri


@contextmanager
def local_file(uri: str) -> Iterator[Path]:
    """A `runs:/...` (or other MLflow artifact) URI or a local path -> a local path for the `with` block (a local
    one as given: its reader says when it is missing); a download is removed after the block."""
    if is_local(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="bincounter-") as tmp:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))


def model_info(model_uri: str):
    """A model URI -> its MLflow ModelInfo (run_id, flavors, signature), read from its MLmodel alone, which is
    removed after (mlflow.models.get_model_info keeps each one in /tmp)."""
    with local_file(f"{model_uri.rstrip('/')}/MLmodel") as path:
        return mlflow.models.Model.load(str(path)).get_model_info()


def load_pyfunc(model_uri: str):
    """A model URI (`runs:/`, `models:/`, a folder) -> the loaded pyfunc. A bin counter holds its weights in memory
    once loaded, so the download is removed here (MLflow's default keeps every one in /tmp for good: ~90 MB a
    load for a served or scored model). A local folder is read where it is."""
    if is_local(model_uri):
        return mlflow.pyfunc.load_model(model_uri)
    with tempfile.TemporaryDirectory(prefix="bincounter-model-") as tmp:
        return mlflow.pyfunc.load_model(model_uri, dst_path=tmp)


# MLflow's UI opens an experiment tagged with this kind on its training runs (untagged: the GenAI overview)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _num(v, fmt: str = "g") -> str:
    """0.006 -> '0.006', 64.0 -> '64', '' -> ''; `fmt` '.3g' for 3 significant digits."""
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return str(v)


def _run_label(uri: str) -> str:
    """A model URI -> what it names: `runs:/<id>/model` -> that run's name, `models:/x/3` -> 'x/3'."""
    if uri.startswith("runs:/"):
        try:
            return MlflowClient().get_run(uri[len("runs:/"):].split("/")[0]).info.run_name or uri
        except mlflow.exceptions.MlflowException:
            return uri
    return uri.removeprefix("models:/")


def run_name(step: str, params: dict) -> str:
    """A step's parameters -> a run name saying what ran, e.g. 'train resnet18 64px lr=0.006'."""
    p = {k: ("" if v is None else v) for k, v in params.items()}
    model = f"{p.get('arch', '')} {_num(p.get('image_size', ''))}px"
    if step == "train":
        return f"train {model} lr={_num(p['lr'], '.3g') if p.get('lr', '') != '' else 'hpo best'}"
    if step == "hpo":
        return f"hpo {model} {_num(p.get('max_evals', ''))} trials"
    if step == "main":
        return f"main {p.get('source', '')} {model}"
    if step == "ingest":
        n = p.get("num_images") if p.get("source") == "synthetic" else (p.get("limit") or "all")
        return f"ingest {p.get('source', '')} {_num(n)}"
    if step == "split":
        return "split " + "/".join(_num(p.get(f"{s}_frac", "")) for s in ("train", "val", "test"))
    if step == "evaluate":
        return f"evaluate {_run_label(str(p.get('model_uri', '')))}"
    if step == "register":
        return f"register {p.get('name', '')}" + (f" {_run_label('runs:/' + p['run_id'])}" if p.get("run_id") else "")
    return step


# A saved view of the runs table (MLflow's shared view: an experiment tag the UI opens with
# ?viewStateShareKey=<key>): the columns to compare the step runs on. (Which rows are expanded is not part of a
# shared view: main's step runs stay folded under its row until its `+` is clicked.)
VIEW_KEY = "bincounter"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW = {"selectedColumns": ["attributes.`Dataset`", "metrics.`val_accuracy`", "metrics.`test_accuracy`",
                            "metrics.`test_rmse`", "params.`hp_lr`", "params.`arch`", "params.`image_size`",
                            "params.`epochs`"]}


def ui_url(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI page of the experiment's runs in the model-training view with the saved view.

    MLflow 3.17's UI opens in its GenAI view whatever the experiment's kind tag says (the choice is a global
    toggle) unless the URL asks for `workflowType=machine_learning`."""
    return (f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")


def _tag_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training (unless it has a kind) and give it the saved view (unless it has
    one): what the UI needs to open on the step runs."""
    client = MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if VIEW_TAG not in tags:
        client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(VIEW))


def start_step(step: str, params: Mapping, name: str | None = None, **run_kwargs):
    """Open (or join, under `mlflow run`) the step's run, tag it with the step, log all its parameters (`params`,
    e.g. `vars(args)`; None, a parameter not given, as empty) and name it (`name`, default `run_name(step,
    params)`); the experiment gets the model-training kind."""
    run = mlflow.start_run(**run_kwargs)
    mlflow.set_tag("bincounter.step", step)
    _tag_experiment(run.info.experiment_id)
    params = {k: ("" if v is None else v) for k, v in params.items()}
    existing = mlflow.get_run(run.info.run_id).data.params
    # `mlflow run` has logged the entry point's parameters already; MLflow refuses to change a logged value
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    # under `mlflow run` the run has a random name (`upset-quail-56`) that says nothing of what ran
    MlflowClient().update_run(run.info.run_id, name=name or run_name(step, params))
    return run


def create_project_run(entry_point: str, experiment_id: str, project_dir: str | Path) -> str:
    """Create the run that `mlflow run` would create for `entry_point` (child of the active run), without
    logging its parameters -> run id, to hand to `mlflow.projects.run(run_id=...)`.

    `mlflow run` logs each parameter as it goes into the shell command, quoted (an empty value as `''`, which the
    UI shows); in a run created here the step's `start_step` logs them as parsed instead."""
    tags = {mlflow_tags.MLFLOW_USER: _get_user(), mlflow_tags.MLFLOW_SOURCE_NAME: str(project_dir),
            mlflow_tags.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.PROJECT),
            mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT: entry_point}
    commit = get_git_commit(str(project_dir))
    if commit:
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = commit
    parent = mlflow.active_run()
    if parent:
        tags[mlflow_tags.MLFLOW_PARENT_RUN_ID] = parent.info.run_id
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=entry_point).info.run_id
