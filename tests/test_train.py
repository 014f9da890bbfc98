"""train and evaluate: train through `mlflow run`, resume after a kill, bad parameters, unreadable images."""
import json
import os
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import kill_env, last_run, run_entry
from helpers_data import make_split_run

TINY = dict(arch="resnet18", weights="none", image_size=32, epochs=2, max_steps=2, workers=0, batch_size=8)


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def artifacts(run_id: str, path: str = "") -> set[str]:
    return {f.path for f in MlflowClient().list_artifacts(run_id, path)}


def test_train_then_evaluate_through_mlflow_run(tmp_path):
    split = make_split_run(tmp_path, n=60, size=64)
    run_entry("train", dict(split_run_id=split, **TINY))
    train = last_run("train")
    assert train.info.status == "FINISHED"
    assert [s for s, _ in history(train.info.run_id, "val_loss")] == [1, 2]
    for key in ("train_loss", "train_accuracy", "val_accuracy", "val_rmse"):
        assert len(history(train.info.run_id, key)) == 2, key
    assert train.data.params["hp_lr"] == "0.001" and train.data.params["hp_optimizer"] == "adamw"
    assert {"checkpoint", "learning_curves.png"} <= artifacts(train.info.run_id)
    assert "checkpoint/last.pt" in artifacts(train.info.run_id, "checkpoint")
    # 10 validation bins are too few to fit a temperature: kept at 1, and the run says so
    assert train.data.metrics["temperature"] == 1.0
    assert "only 10 validation images" in train.data.tags["bincounter.calibration"]
    info = mlflow.models.get_model_info(f"runs:/{train.info.run_id}/model")  # MLflow 3: a LoggedModel of the run
    assert info.run_id == train.info.run_id and info.flavors.keys() >= {"python_function"}

    # the logged model loads and predicts in a fresh process from its own files only
    model_uri = f"runs:/{train.info.run_id}/model"
    image = pd.read_csv(tmp_path / "splits" / "val.csv")["path"].iloc[0]
    code = ("import sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(m.metadata.signature.inputs.to_dict()); "
            "print(m.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read()]})).to_json(orient='records'))")
    out = subprocess.run([sys.executable, "-c", code, model_uri, image], capture_output=True, text=True,
                         check=True, cwd="/", env=dict(os.environ, PYTHONPATH="")).stdout
    assert "'type': 'any', 'name': 'image'" in out  # bytes or base64 text (serving's contract)
    row = json.loads(out.splitlines()[-1])[0]
    assert row["count"] in range(1, 6) and 0 < row["confidence"] <= 1
    assert sum(row[f"p_{c}"] for c in range(1, 6)) == pytest.approx(1, abs=1e-4)

    # evaluate in-process: its `mlflow run` parameter passing is test_main's and test_levers' (through MLproject)
    from steps import evaluate
    evaluate.main(evaluate.get_args_parser().parse_args(["--model_uri", model_uri, "--split_run_id", split]))
    ev = last_run("evaluate")
    for k in ("test_accuracy", "test_rmse", "test_mae", "test_within1_accuracy", "baseline_accuracy", "baseline_rmse"):
        assert k in ev.data.metrics, k
    assert ev.data.metrics["test_unreadable"] == 0
    assert {"predictions.csv", "per_count.csv", "confusion_matrix.png", "samples.png", "reliability.png",
            "coverage.png"} <= artifacts(ev.info.run_id)
    assert {"test_ece", "test_nll", "test_brier", "test_check_auc"} <= ev.data.metrics.keys()


def train_in_process(params: dict, monkeypatch, run_id: str = "") -> None:
    """The train step's main(args) in this process; with run_id, into that run as `mlflow run --run-id` does."""
    from steps import train

    with monkeypatch.context() as m:
        if run_id:
            m.setenv("MLFLOW_RUN_ID", run_id)  # what `mlflow run --run-id` hands the step
        train.main(train.get_args_parser().parse_args([f"--{k}={v}" for k, v in params.items()]))


@pytest.mark.parametrize("data_path, levers", [
    ("pil", {}), ("tensor", {}),
    # the levers with state or draws of their own: the weights' average, mixup's pairs, the epoch's resolution
    ("pil", {"ema": 0.9, "mixup": 0.4, "image_size": 48, "start_size": 32}),
])
def test_training_killed_after_an_epoch_resumes_to_the_same_result(tmp_path, data_path, levers, monkeypatch):
    """The kill is a process (`mlflow run`, SIGKILLed after epoch 1); the resume into the killed run and the
    uninterrupted reference run in-process (`mlflow run --run-id` itself: test_hpo's kill, test_faults)."""
    split = make_split_run(tmp_path, n=40, size=48)
    params = dict(split_run_id=split, **{**TINY, **levers}, data_path=data_path)
    killed = run_entry("train", params, check=False, env_extra=kill_env(after_epoch=1))
    assert killed.returncode != 0
    run_id = last_run("train").info.run_id
    assert [s for s, _ in history(run_id, "val_loss")] == [1]
    train_in_process(params, monkeypatch, run_id)
    resumed = mlflow.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert [s for s, _ in history(run_id, "val_loss")] == [1, 2]

    train_in_process(params, monkeypatch)
    straight = last_run("train")
    assert straight.info.run_id != run_id
    for key in ("val_loss", "train_loss", "val_accuracy"):
        resumed_h, straight_h = history(run_id, key), history(straight.info.run_id, key)
        assert [s for s, _ in resumed_h] == [s for s, _ in straight_h] == [1, 2]
        assert [v for _, v in resumed_h] == pytest.approx([v for _, v in straight_h], rel=1e-5), key


@pytest.mark.parametrize("override, message", [
    (["--lr", "-1"], "lr must be a positive number"),
    (["--optimizer", "rmsprop"], "optimizer must be one of"),
    (["--batch_size", "0"], "batch_size must be at least 1"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--image_size", "16"], "image_size must be at least 32"),
    (["--weights", "/no/such/file.pt"], "is not imagenet, none, a model URI or an existing file"),
    (["--ordinal_weight", "-1"], "ordinal_weight must be >= 0"),
    (["--label_smoothing", "1"], "label_smoothing must be in"),
    (["--warmup_epochs", "10"], "warmup_epochs must be >= 0 and below epochs"),
    (["--ema", "1"], r"ema must be in \[0, 1\)"),
    (["--mixup", "-0.2"], "mixup must be >= 0"),
    (["--start_size", "300"], r"start_size must be 0 \(off\) or in 32..image_size \(224\)"),
    (["--augment", "trivial", "--data_path", "tensor"], "augment=trivial has no batch kernel"),
])
def test_bad_parameters_fail_before_training_with_a_clear_message(tmp_path, override, message):
    from bincounter.model import WeightsUnavailable
    from steps import train

    split = make_split_run(tmp_path, n=20, size=32)
    args = train.get_args_parser().parse_args(["--split_run_id", split, "--weights", "none", *override])
    with pytest.raises((ValueError, WeightsUnavailable), match=message):
        train.main(args)
    assert not mlflow.search_runs(filter_string="tags.`bincounter.step` = 'train'", output_format="list")


def test_a_tunable_that_is_not_a_value_fails_when_the_arguments_are_parsed(capsys):
    """A tunable is read at the parser (empty: not given), so a wrong one is argparse's one-line error."""
    from bincounter import entry
    from steps import train

    with pytest.raises(SystemExit) as e:
        entry.run(train.main, train.get_args_parser(), ["--split_run_id", "x", "--lr", "fast"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("train: error: argument --lr: expected a number or nothing, got "
                                               "'fast' (--help lists the options)")


def test_imagenet_weights_offline_fail_at_once_saying_what_to_do():
    from bincounter.model import WeightsUnavailable, build_model

    start = time.monotonic()
    try:
        build_model("resnet18", 5, weights="imagenet")
    except WeightsUnavailable as e:
        assert "weights=none" in str(e) and "torch hub cache" in str(e)
        assert time.monotonic() - start < 60
    else:  # a machine with internet (or a filled torch cache) gets the real weights
        pass


def test_wrong_upstream_run_is_refused(tmp_path):
    from steps import train

    with mlflow.start_run() as other:
        mlflow.set_tag("bincounter.step", "ingest")
    args = train.get_args_parser().parse_args(["--split_run_id", other.info.run_id, "--weights", "none"])
    with pytest.raises(ValueError, match="is a 'ingest' run, expected a 'split' run"):
        train.main(args)


def test_evaluate_counts_unreadable_images_and_goes_on(tmp_path):
    from steps import evaluate

    split = make_split_run(tmp_path, n=30, size=32)
    with mlflow.start_run() as run:
        from bincounter.runs import load_split
        from bincounter.train_config import TrainConfig
        from bincounter.train_log import log_trained_model
        from bincounter.training import train_run

        classes, train_df, val_df = load_split(split)
        cfg = TrainConfig(**{**TINY, "epochs": 1, "classes": classes})
        result = train_run(cfg, train_df, val_df, checkpoint=False)
        log_trained_model(result, cfg, val_df["path"].iloc[0])
    test = pd.read_csv(tmp_path / "splits" / "test.csv", dtype={"image_id": str})
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = pd.DataFrame([{**test.iloc[0].to_dict(), "image_id": "bad1", "path": str(corrupt)},
                        {**test.iloc[0].to_dict(), "image_id": "bad2", "path": str(tmp_path / "missing.jpg")}])
    manifest = tmp_path / "mixed.csv"
    pd.concat([test, bad]).to_csv(manifest, index=False)
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--model_uri", f"runs:/{run.info.run_id}/model", "--manifest", str(manifest)]))
    ev = last_run("evaluate")
    assert ev.data.metrics["test_unreadable"] == 2
    assert ev.data.metrics["test_size"] == len(test)
    preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, artifact_path="predictions.csv",
                                                            dst_path=str(tmp_path / "p")))
    errors = dict(zip(preds["image_id"], preds["error"]))
    assert any(s in errors["bad1"] for s in ("cannot decode", "not an image", "unreadable image header"))
    assert "cannot read" in errors["bad2"]


def test_training_can_start_from_an_earlier_model(tmp_path):
    """weights=runs:/<id>/model (or models:/...) starts from a logged bin counter: backbone and head."""
    import torch

    from bincounter.model import build_model
    from bincounter.runs import load_split
    from bincounter.train_config import TrainConfig
    from bincounter.train_log import log_trained_model
    from bincounter.training import train_run

    split = make_split_run(tmp_path, n=20, size=32)
    classes, train_df, val_df = load_split(split)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "classes": classes})
    with mlflow.start_run() as run:
        result = train_run(cfg, train_df, val_df, checkpoint=False)
        log_trained_model(result, cfg, val_df["path"].iloc[0])
    start = build_model("resnet18", len(classes), weights=f"runs:/{run.info.run_id}/model")
    for k, v in result["model"].state_dict().items():
        assert torch.equal(start.state_dict()[k], v), k
    other = build_model("resnet18", 3, weights=f"runs:/{run.info.run_id}/model")  # new classes: a fresh head
    assert other.fc.out_features == 3
    assert torch.equal(other.layer1[0].conv1.weight, result["model"].layer1[0].conv1.weight)


def test_fine_tuning_from_a_model_of_other_counts_is_refused_before_training(tmp_path):
    """A champion counting 0-4 and data counting 1-5: same head size, other meanings. train and hpo refuse it,
    naming the model and both lists, before a run opens; a model of the data's counts passes."""
    from bincounter import train_log
    from bincounter.model import build_model
    from bincounter.train_config import TrainConfig
    from bincounter.train_log import log_trained_model
    from steps import hpo, train

    split = make_split_run(tmp_path, n=20, size=32)  # counts 1-5
    example = pd.read_csv(tmp_path / "splits" / "val.csv")["path"].iloc[0]
    uris = {}
    for classes in ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5]):
        cfg = TrainConfig(**{**TINY, "classes": classes})
        with mlflow.start_run() as run:
            mlflow.set_tag("bincounter.step", "train")
            log_trained_model({"model": build_model("resnet18", 5), "best_epoch": 1}, cfg, example)
        uris[classes[0]] = f"runs:/{run.info.run_id}/model"
    version = mlflow.register_model(uris[0], "counts-from-zero")
    MlflowClient().set_registered_model_alias("counts-from-zero", "champion", version.version)

    message = (r"weights {} counts 0, 1, 2, 3, 4, but the data's counts are 1, 2, 3, 4, 5: fine-tune it on data of "
               r"its counts \(ingest with count_min=0 count_max=4\), or start from weights=imagenet or none")
    for uri in ("models:/counts-from-zero@champion", uris[0]):
        args = train.get_args_parser().parse_args(["--split_run_id", split, "--weights", uri, "--epochs", "1"])
        with pytest.raises(ValueError, match=message.format(uri)):
            train.main(args)
    args = hpo.get_args_parser().parse_args(["--split_run_id", split, "--weights", "models:/counts-from-zero@champion"])
    with pytest.raises(ValueError, match=message.format("models:/counts-from-zero@champion")):
        hpo.main(args)
    assert len(mlflow.search_runs(output_format="list")) == 3  # the split's and the two models': nothing trained
    train_log.check_weights(uris[1], [1, 2, 3, 4, 5])  # the same counts: fine-tuning goes ahead
    train_log.check_weights("none", [7, 8])  # not a model: nothing to compare
    with pytest.raises(ValueError, match="runs:/0123456789abcdef/model: cannot read the model"):
        train_log.check_weights("runs:/0123456789abcdef/model", [1, 2])


def test_resume_with_another_monitor_is_refused_saying_so(tmp_path):
    """A resumed run keeps what it started with: a changed monitor is an error naming it, before any training."""
    from bincounter.runs import load_split
    from bincounter.train_config import TrainConfig
    from bincounter.training import train_run

    split = make_split_run(tmp_path, n=20, size=32)
    classes, train_df, val_df = load_split(split)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "classes": classes, "monitor": "val_loss"})
    with mlflow.start_run() as run:
        train_run(cfg, train_df, val_df)
    with mlflow.start_run(run_id=run.info.run_id):
        with pytest.raises(ValueError, match=r"checkpoint made with other settings \(monitor: 'val_loss' -> "
                                             r"'val_rmse'\)"):
            train_run(TrainConfig(**{**TINY, "epochs": 1, "classes": classes, "monitor": "val_rmse"}),
                      train_df, val_df)
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1]


def test_early_stopping_and_the_kept_epoch_follow_the_monitor(tmp_path, monkeypatch):
    """val_loss rising while val_accuracy improves (an overconfident model): monitor=val_accuracy keeps training
    and keeps the most accurate epoch; monitor=val_loss stops after `patience` and keeps epoch 1."""
    from bincounter import training
    from bincounter.runs import load_split
    from bincounter.train_config import TrainConfig

    split = make_split_run(tmp_path, n=20, size=32)
    classes, train_df, val_df = load_split(split)
    scripted = iter([])

    def evaluate(*args, **kwargs):
        return next(scripted)

    monkeypatch.setattr(training, "evaluate", evaluate)
    for monitor, epochs_run, best in (("val_accuracy", 4, 4), ("val_loss", 3, 1)):
        scripted = iter({"loss": 1.0 + e, "accuracy": 0.2 + 0.1 * e, "rmse": 2.0 - 0.2 * e, "mae": 1.0,
                         "within1_accuracy": 0.5} for e in range(4))
        cfg = TrainConfig(**{**TINY, "epochs": 4, "patience": 2, "classes": classes, "monitor": monitor})
        with mlflow.start_run():
            result = training.train_run(cfg, train_df, val_df, checkpoint=False)
        assert (len(result["history"]), result["best_epoch"]) == (epochs_run, best), monitor
