"""What the MLflow UI shows of a step run: its name, the experiment's kind and saved view, unquoted parameters;
and what reading a run's artifacts leaves behind."""
import json
import tempfile

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from bincounter import counters
from bincounter.model import build_model
from bincounter.runs import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, VIEW_TAG, create_project_run, local_file,
                             model_info, read_split, run_name, start_step, ui_url)
from conftest import ROOT
from helpers_data import make_manifest
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)


def test_run_names_say_what_ran():
    common = dict(arch="resnet18", image_size=64, seed=42)
    assert run_name("train", dict(common, lr=0.00612345)) == "train resnet18 64px lr=0.00612"
    assert run_name("train", dict(common, lr="")) == "train resnet18 64px lr=hpo best"
    assert run_name("train", dict(common, lr=None)) == "train resnet18 64px lr=hpo best"  # not given
    assert run_name("hpo", dict(common, max_evals=8)) == "hpo resnet18 64px 8 trials"
    assert run_name("main", dict(common, source="synthetic")) == "main synthetic resnet18 64px"
    assert run_name("ingest", dict(source="synthetic", num_images=1500, limit=0)) == "ingest synthetic 1500"
    assert run_name("ingest", dict(source="s3", num_images=1000, limit=0)) == "ingest s3 all"
    assert run_name("split", dict(train_frac=0.6, val_frac=0.2, test_frac=0.2)) == "split 0.6/0.2/0.2"
    assert run_name("evaluate", dict(model_uri="models:/bin-counter/3")) == "evaluate bin-counter/3"
    assert run_name("deploy", {}) == "deploy"


def test_start_step_names_the_run_and_tags_the_experiment_once(experiment):
    params = dict(arch="resnet18", image_size=32, lr=0.01, hpo_run_id=None)  # a step's vars(args)
    with start_step("train", params) as run:
        pass
    got = mlflow.get_run(run.info.run_id)
    assert got.info.run_name == "train resnet18 32px lr=0.01"
    assert got.data.params["hpo_run_id"] == ""
    exp = MlflowClient().get_experiment(run.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    view = json.loads(exp.tags[VIEW_TAG])
    assert "metrics.`val_accuracy`" in view["selectedColumns"] and "metrics.`test_accuracy`" in view["selectedColumns"]
    # a kind or view someone chose is kept
    MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    with start_step("evaluate", {"model_uri": f"runs:/{run.info.run_id}/model"}) as ev:
        pass
    assert MlflowClient().get_experiment(exp.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert mlflow.get_run(ev.info.run_id).info.run_name == "evaluate train resnet18 32px lr=0.01"
    assert ui_url("http://127.0.0.1:5000/", exp.experiment_id) == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=bincounter")


def test_a_project_run_created_for_main_has_its_tags_and_no_parameters(experiment):
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    with mlflow.start_run() as parent:
        run_id = create_project_run("split", exp_id, ROOT)
    run = mlflow.get_run(run_id)
    assert run.data.tags[mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT] == "split"
    assert run.data.tags[mlflow_tags.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
    assert run.data.tags[mlflow_tags.MLFLOW_SOURCE_TYPE] == "PROJECT"
    assert run.data.params == {}
    MlflowClient().set_terminated(run_id)


def test_models_and_artifacts_read_from_runs_leave_no_temporary_files(tiny_model, tmp_path, monkeypatch):
    """MLflow downloads into a new temporary folder that nobody removes unless told where: ~90 MB a model load, for
    every served, scored or evaluated model. Everything the library reads from a run must clean up after itself."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where tempfile and MLflow put temporary folders
    with mlflow.start_run() as split:
        make_manifest(tmp_path / "bins", n=4, size=32, classes=CLASSES).to_csv(tmp_path / "test.csv", index=False)
        mlflow.log_artifact(str(tmp_path / "test.csv"), "splits")

    assert counters.load(tiny_model.model_uri).classes == CLASSES
    assert counters.logged_classes(tiny_model.model_uri) == CLASSES
    assert model_info(tiny_model.model_uri).run_id == tiny_model.run_id
    assert build_model("resnet18", len(CLASSES), weights=tiny_model.model_uri) is not None
    assert len(read_split(split.info.run_id, "test")) == 4
    with local_file(f"runs:/{split.info.run_id}/splits/test.csv") as path:
        assert path.is_file()
    assert not path.exists()
    assert sorted(p.name for p in scratch.iterdir()) == []
