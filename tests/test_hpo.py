"""The hpo step: search space, nested trial runs, failed trials, metric direction, seeding, resume, and the train
step taking the best parameters. Real training only where it matters (end to end, kill and resume); the other
tests replace training.train_run with a fast deterministic stand-in."""
from __future__ import annotations

import json

import mlflow
import pytest
import yaml
from conftest import ROOT, kill_env, last_run, run_entry
from helpers_data import make_split_run
from mlflow.tracking import MlflowClient

from bincounter import hpo, search_space, train_log, training
from bincounter.manifest import read_manifest
from bincounter.train_config import TUNABLE, TrainConfig
from steps import hpo as hpo_step
from steps import train as train_step

SMALL = {"arch": "resnet18", "weights": "none", "image_size": 32, "max_steps": 2, "workers": 0}


@pytest.fixture
def split_id(tmp_path) -> str:
    return make_split_run(tmp_path, n=40, size=64)


def hpo_args(split_run_id: str, **kw):
    params = {"split_run_id": split_run_id, "max_evals": 3, "epochs": 1, **SMALL, **kw}
    return hpo_step.get_args_parser().parse_args([f"--{k}={v}" for k, v in params.items()])


class FakeTraining:
    """Stands in for training.train_run: val metrics are a function of the drawn values (val_loss grows with lr,
    val_accuracy too, so the two metrics prefer different trials); raises on the calls listed in `fail`."""

    def __init__(self, fail=(), kill_at=None):
        self.calls, self.fail, self.kill_at = [], set(fail), kill_at

    def __call__(self, cfg, train_df, val_df, resume=True, checkpoint=True):
        self.calls.append(cfg)
        n = len(self.calls)
        if n == self.kill_at:
            raise Killed()
        if n in self.fail:
            raise FloatingPointError("loss is nan at step 0: lower lr or check the data")
        assert checkpoint is False and resume is False  # trials need no checkpoints
        row = {"epoch": 1, "val_loss": 10 * cfg.lr + cfg.weight_decay + (0.01 if cfg.freeze else 0),
               "val_accuracy": min(1.0, 5 * cfg.lr), "val_rmse": 1.0, "val_mae": 1.0, "val_within1_accuracy": 1.0}
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=1)
        return {"model": None, "best_epoch": 1, "history": [row], "best": row}


class Killed(BaseException):
    """An interruption (like Ctrl-C) in the middle of a trial."""


def children(parent_id: str):
    """The parent's trial runs, in trial order."""
    runs = MlflowClient().search_runs([mlflow.get_run(parent_id).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(runs, key=lambda r: (int(r.data.tags["bincounter.trial"]), r.info.start_time))


def trials_json(run_id: str) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/trials.json"))


def trial_params(run_id: str) -> list[dict]:
    return [t["params"] for t in trials_json(run_id)["trials"]]


def test_mlproject_hpo_parameters_match_the_cli():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["hpo"]
    actions = {a.dest: a for a in hpo_step.get_args_parser()._actions if a.dest != "help"}
    assert set(spec["parameters"]) == set(actions)
    for name, p in spec["parameters"].items():
        assert f"--{name} {{{name}}}" in spec["command"]
        if "default" in p:
            parse = actions[name].type or str
            assert parse(str(p["default"])) == actions[name].default, name


def test_search_space_is_declared_once_and_covers_the_tunables():
    assert set(search_space.SEARCH_SPACE) == set(TUNABLE)
    assert search_space.SEARCH_SPACE["lr"] == {"loguniform": [1e-4, 1e-1]}
    assert search_space.SEARCH_SPACE["batch_size"] == {"choice": [32, 64, 128, 256, 512]}
    assert set(search_space.SEARCH_SPACE["optimizer"]["choice"]) == {"sgd", "adamw"}
    params = {"lr": 0.001, "batch_size": 64, "weight_decay": 1e-5, "optimizer": "adamw", "freeze": True,
              "freeze_epochs": 1, "backbone_lr": 0.3, "bn": "frozen", "trainable_blocks": 2,
              "ema": 0.98, "mixup": 0.0}
    assert search_space.to_params(search_space.to_vals(params)) == params


def test_hpo_entry_point_end_to_end(split_id):
    run_entry("hpo", {"split_run_id": split_id, "max_evals": 3, "epochs": 1, "subset": 0.5, "metric": "val_loss",
                      **SMALL})
    parent = last_run("hpo")
    assert parent.info.status == "FINISHED"
    trials = children(parent.info.run_id)
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    client = MlflowClient()
    for t in trials:
        for name in TUNABLE:  # the drawn values, as hp_* (like the train step) and plain
            assert t.data.params[f"hp_{name}"] == t.data.params[name]
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val_loss")] == [1]  # per epoch
        assert client.list_artifacts(t.info.run_id) == []  # no model, no checkpoint
    best = min(trials, key=lambda t: t.data.metrics["best_val_loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.data.metrics["best_val_loss"])
    for name in TUNABLE:
        assert parent.data.params[f"best_{name}"] == best.data.params[name]
    train_df = read_manifest(mlflow.artifacts.download_artifacts(run_id=split_id, artifact_path="splits/train.csv"))
    assert parent.data.metrics["train_size"] == len(hpo.train_subset(train_df, 0.5, 42)) < len(train_df)
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.json", "trials.json", "trials.png"} <= files
    space = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/search_space.json"))
    # weights=none: a random backbone is never frozen, the rest of the space is SEARCH_SPACE
    assert space["space"] == json.loads(json.dumps(search_space.space_for("none", int(parent.data.metrics["train_size"]))))
    assert space["space"]["bn"] == {"choice": ["batch"]} and space["space"]["backbone_lr"] == {"choice": [1.0]}
    assert space["space"]["batch_size"] == {"choice": [32]}  # 18 training images: larger batches are dropped
    assert space["space"]["freeze"] == {"choice": [False]} and all(t.data.params["freeze"] == "False" for t in trials)
    assert space["space"]["trainable_blocks"] == {"choice": [0]}
    assert search_space.space_for("imagenet", epochs=2) == search_space.SEARCH_SPACE
    assert search_space.space_for("imagenet")["freeze_epochs"] == {"choice": [0]}  # one epoch: no head-first phase
    assert search_space.space_for("imagenet", 700)["batch_size"] == {"choice": [32, 64]}  # at least 10 steps an epoch
    assert search_space.space_for("none")["lr"] == {"loguniform": [1e-4, 1e-2]}  # from scratch, high rates diverge


def test_failed_trial_is_recorded_and_the_search_goes_on(split_id, monkeypatch):
    fake = FakeTraining(fail={2})
    monkeypatch.setattr(training, "train_run", fake)
    parent_id = hpo_step.main(hpo_args(split_id, max_evals=4))
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and len(fake.calls) == 4
    trials = children(parent_id)
    assert [t.info.status for t in trials] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    assert trials[1].data.tags["bincounter.failure_reason"].startswith("FloatingPointError: loss is nan")
    assert parent.data.tags["best_run_id"] != trials[1].info.run_id
    ok = [t for t in trials if t.info.status == "FINISHED"]
    # the default metric is training's default monitor
    assert parent.data.params["metric"] == TrainConfig.monitor == "val_accuracy"
    assert parent.data.metrics["best_val_accuracy"] == max(t.data.metrics["val_accuracy"] for t in ok)
    assert all(c.monitor == "val_accuracy" for c in fake.calls)  # trials keep their best epoch by it too
    assert [t["status"] for t in trials_json(parent_id)["trials"]] == ["ok", "fail", "ok", "ok"]


def test_all_trials_failing_fails_the_search(split_id, monkeypatch):
    monkeypatch.setattr(training, "train_run", FakeTraining(fail={1, 2}))
    with pytest.raises(RuntimeError, match="all 2 trials failed"):
        hpo_step.main(hpo_args(split_id, max_evals=2))
    assert last_run("hpo").info.status == "FAILED"


def test_metric_direction(split_id, monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(training, "train_run", fake)
    by_acc = mlflow.get_run(hpo_step.main(hpo_args(split_id, max_evals=4, metric="val_accuracy")))
    by_loss = mlflow.get_run(hpo_step.main(hpo_args(split_id, max_evals=4, metric="val_loss")))
    lrs = [p["lr"] for p in trial_params(by_acc.info.run_id)]
    assert lrs == [p["lr"] for p in trial_params(by_loss.info.run_id)]  # same seed, same trials
    assert {c.monitor for c in fake.calls[:4]} == {"val_accuracy"} and {c.monitor for c in fake.calls[4:]} == {"val_loss"}
    assert float(by_acc.data.params["best_lr"]) == max(lrs)  # accuracy: the higher the better
    assert float(by_loss.data.params["best_lr"]) == min(lrs)  # loss: the lower the better
    assert by_acc.data.metrics["best_val_accuracy"] == pytest.approx(min(1.0, 5 * max(lrs)))


@pytest.mark.parametrize("metric", ["test_accuracy", "train_loss", "val_f1"])
def test_selection_metric_must_be_a_validation_metric(split_id, metric):
    with pytest.raises(ValueError, match="validation"):
        hpo_step.main(hpo_args(split_id, metric=metric))


def test_same_seed_same_trials_other_seed_other_trials(split_id, monkeypatch):
    monkeypatch.setattr(training, "train_run", FakeTraining())
    a, b, c = (hpo_step.main(hpo_args(split_id, max_evals=4, seed=s)) for s in (7, 7, 8))
    assert trial_params(a) == trial_params(b)
    assert [{k: t.data.params[k] for k in TUNABLE} for t in children(a)] == \
           [{k: t.data.params[k] for k in TUNABLE} for t in children(b)]
    assert trial_params(a) != trial_params(c)


def test_resume_in_process_runs_only_the_remaining_trials(split_id, monkeypatch):
    n = hpo.STARTUP_TRIALS + 3  # the last trials are TPE's: they depend on the earlier results
    monkeypatch.setattr(training, "train_run", FakeTraining())
    uninterrupted = trial_params(hpo_step.main(hpo_args(split_id, max_evals=n)))

    monkeypatch.setattr(training, "train_run", FakeTraining(kill_at=4))
    with pytest.raises(Killed):
        hpo_step.main(hpo_args(split_id, max_evals=n))
    parent = last_run("hpo")
    assert parent.info.status == "FAILED" and len(trials_json(parent.info.run_id)["trials"]) == 3
    killed = children(parent.info.run_id)[3]
    assert killed.info.status == "KILLED"
    MlflowClient().update_run(killed.info.run_id, status="RUNNING")  # as a SIGKILL in mid-trial would leave it

    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    with pytest.raises(ValueError, match="other settings"):
        hpo_step.main(hpo_args(split_id, max_evals=n, seed=1))
    rest = FakeTraining()
    monkeypatch.setattr(training, "train_run", rest)
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)  # mlflow.start_run consumes (deletes) it
    assert hpo_step.main(hpo_args(split_id, max_evals=n)) == parent.info.run_id
    assert len(rest.calls) == n - 3
    assert trial_params(parent.info.run_id) == uninterrupted
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"
    statuses = [t.info.status for t in children(parent.info.run_id)]
    assert statuses.count("FINISHED") == n and statuses.count("KILLED") == 1
    assert mlflow.get_run(killed.info.run_id).data.tags["bincounter.failure_reason"].startswith("interrupted")


def test_resume_after_kill_through_mlflow_run(split_id, monkeypatch):
    params = {"split_run_id": split_id, "max_evals": 2, "epochs": 1, **SMALL}
    p = run_entry("hpo", params, check=False, env_extra=kill_env(after_trial=1))  # SIGKILL once trial 1 is saved
    assert p.returncode != 0
    parent = last_run("hpo")
    pid = parent.info.run_id
    assert parent.info.status == "FAILED"
    first = trials_json(pid)["trials"]
    assert len(first) == 1 and len(children(pid)) == 1

    run_entry("hpo", params, "--run-id", pid)
    assert mlflow.get_run(pid).info.status == "FINISHED"
    final = trials_json(pid)["trials"]
    assert final[0]["run_id"] == first[0]["run_id"]  # kept, not rerun
    assert len(final) == 2 and len(children(pid)) == 2  # only the remaining trial ran
    # an uninterrupted search draws the same trials; with max_evals <= STARTUP_TRIALS they do not depend on the
    # results, so a fast stand-in for training gives the uninterrupted sequence
    assert params["max_evals"] <= hpo.STARTUP_TRIALS
    monkeypatch.setattr(training, "train_run", FakeTraining())
    assert [t["params"] for t in final] == trial_params(hpo_step.main(hpo_args(split_id, max_evals=2)))
    assert "best_lr" in mlflow.get_run(pid).data.params


def test_train_takes_the_best_params_and_explicit_ones_win(split_id, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(training, "train_run", FakeTraining())
        hpo_id = hpo_step.main(hpo_args(split_id, max_evals=3))
    best = mlflow.get_run(hpo_id).data.params
    monkeypatch.setattr(train_log, "log_trained_model", lambda *a, **k: None)  # the model is not the point here

    def train(*extra):
        argv = ["--split_run_id", split_id, "--hpo_run_id", hpo_id, "--epochs", "1", "--arch", "resnet18",
                "--weights", "none", "--image_size", "32", "--max_steps", "1", "--workers", "0", *extra]
        return mlflow.get_run(train_step.main(train_step.get_args_parser().parse_args(argv))).data.params

    got = train()
    for name in TUNABLE:
        assert got[f"hp_{name}"] == best[f"best_{name}"], name
    got = train("--lr", "0.0042", "--optimizer", "sgd")
    assert float(got["hp_lr"]) == 0.0042 and got["hp_optimizer"] == "sgd"
    for name in ("batch_size", "weight_decay", "freeze"):
        assert got[f"hp_{name}"] == best[f"best_{name}"], name
