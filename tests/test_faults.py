"""Faults: ingest, train and hpo SIGKILLed (the whole `mlflow run` process group) at a random moment, then rerun:
each ends complete and equal to an uninterrupted run. Plus the narrow windows that random kills seldom hit, and a
smoke of the serving load bench.

The random moment is drawn from a seeded RNG within the uninterrupted run's duration, so a seed may land before
the run exists, mid-step, or after it finished; every case must end right. Uninterrupted references are made once
per module, in experiments of their own.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import ROOT, last_run, run_entry
from helpers_data import make_split_run
from mlflow.tracking import MlflowClient
from test_hpo import FakeTraining, Killed, children, hpo_args

from bincounter import hpo, training
from bincounter.manifest import read_manifest
from bincounter.train_config import TUNABLE
from steps import hpo as hpo_step

SEEDS = [1, 2]
TINY = {"arch": "resnet18", "weights": "none", "image_size": 32, "max_steps": 2, "workers": 0}
TRAIN = {**TINY, "epochs": 3, "batch_size": 8}
HPO = {**TINY, "max_evals": 3, "epochs": 1}
INGEST = {"source": "synthetic", "num_images": 120, "image_size": 64, "workers": 2, "seed": 7}
TRAIN_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_rmse", "val_mae")


# --- helpers ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def own_experiment(prefix: str):
    """Make a module fixture's runs in an experiment of their own (the test's autouse one is per test)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_EXPERIMENT_NAME", name)
        mlflow.set_experiment(name)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # `mlflow run` refuses it beside a name
        yield name


def timed_entry(entry: str, params: dict) -> float:
    """run_entry, timed -> seconds."""
    start = time.monotonic()
    run_entry(entry, params)
    return time.monotonic() - start


def kill_entry(entry: str, params: dict, delay: float = 600, line: str = "") -> int | None:
    """`mlflow run` as run_entry starts it, in a session of its own; SIGKILL its whole process group (the CLI,
    bash and the step) after `delay` s, or as soon as the step prints a line starting with `line`.
    -> None when killed, else the exit status it ended with first."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", os.environ["MLFLOW_EXPERIMENT_NAME"]]
    cmd += [a for k, v in params.items() for a in ("-P", f"{k}={v}")]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE if line else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          text=True, env=env, start_new_session=True) as proc:
        try:
            if not line:
                return proc.wait(delay)
            if not any(out.startswith(line) for out in proc.stdout):
                return proc.wait()  # it ended without printing the line
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def entry_runs(entry: str) -> list:
    """The test experiment's runs of `entry` (tagged by `mlflow run` when it creates the run), newest first."""
    return mlflow.search_runs(experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]], output_format="list",
                              filter_string=f"tags.`mlflow.project.entryPoint` = '{entry}'",
                              order_by=["attributes.start_time DESC"])


def kill_and_resume(entry: str, params: dict, seed: int, expected_s: float, describe) -> str:
    """Kill `entry` at a seeded random moment within `expected_s`, then rerun it into the killed run (`--run-id`),
    or afresh when the kill came before the run existed. describe(run_id) -> what the kill left, for the log.
    -> the run id that ended FINISHED."""
    delay = random.Random(f"{entry}-{seed}").uniform(0, expected_s)
    status = kill_entry(entry, params, delay)
    runs = entry_runs(entry)
    left = f"run {runs[0].info.status}, {describe(runs[0].info.run_id)}" if runs else "no run yet"
    print(f"\n{entry} seed {seed}: SIGKILL at {delay:.1f} s of ~{expected_s:.0f} s -> "
          f"{'killed' if status is None else f'had ended ({status})'}; {left}")
    assert len(runs) <= 1
    run_entry(entry, params, *(["--run-id", runs[0].info.run_id] if runs else []))
    [run] = entry_runs(entry)
    assert run.info.status == "FINISHED"
    return run.info.run_id


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def epochs_logged(run_id: str) -> str:
    ckpt = [f.path for f in MlflowClient().list_artifacts(run_id, "checkpoint")]
    return f"val_loss steps {[s for s, _ in history(run_id, 'val_loss')]}, checkpoint {bool(ckpt)}"


def trials_left(parent_id: str) -> str:
    return f"trial runs {[t.info.status for t in children(parent_id)]}"


def tunables(runs) -> list[dict]:
    return [{k: r.data.params[k] for k in TUNABLE} for r in runs]


def manifest_of(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="manifest.csv")
    return read_manifest(path).sort_values("image_id", ignore_index=True)[["image_id", "count", "sha256"]]


def check_train(run_id: str, ref) -> None:
    """Every epoch logged exactly once with the uninterrupted run's values; the same final val metrics."""
    for key in TRAIN_METRICS:
        got, want = history(run_id, key), history(ref.info.run_id, key)
        assert [s for s, _ in got] == [1, 2, 3], (key, got)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5), key
    final = mlflow.get_run(run_id).data.metrics
    val = {k: v for k, v in ref.data.metrics.items() if k.startswith(("val_", "best_val_"))}
    assert {k: final[k] for k in val} == pytest.approx(val, abs=1e-5)


def check_trials(parent_id: str, expected: list[dict]) -> None:
    """Exactly the expected trials FINISHED, in order; any other child run KILLED."""
    runs = children(parent_id)
    finished = [t for t in runs if t.info.status == "FINISHED"]
    assert {t.info.status for t in runs} <= {"FINISHED", "KILLED"}
    assert [t.data.tags["bincounter.trial"] for t in finished] == [str(i) for i in range(1, len(expected) + 1)]
    assert tunables(finished) == expected
    assert mlflow.get_run(parent_id).data.tags["best_run_id"] in {t.info.run_id for t in finished}


# --- uninterrupted references ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_run_id(store, tmp_path_factory) -> str:
    with own_experiment("faults-split"):
        return make_split_run(tmp_path_factory.mktemp("split"), n=40, size=48)


@pytest.fixture(scope="module")
def ingest_ref(store, tmp_path_factory):
    """-> (seconds, manifest) of an uninterrupted ingest into a fresh cache."""
    with own_experiment("faults-ingest-ref"):
        seconds = timed_entry("ingest", {**INGEST, "cache_dir": tmp_path_factory.mktemp("cache")})
        return seconds, manifest_of(entry_runs("ingest")[0].info.run_id)


@pytest.fixture(scope="module")
def train_ref(split_run_id):
    """-> (seconds, run) of an uninterrupted train run."""
    with own_experiment("faults-train-ref"):
        seconds = timed_entry("train", {**TRAIN, "split_run_id": split_run_id})
        return seconds, entry_runs("train")[0]


@pytest.fixture(scope="module")
def hpo_ref(split_run_id):
    """-> (seconds, [trial params]) of an uninterrupted search with the same seed."""
    with own_experiment("faults-hpo-ref"):
        seconds = timed_entry("hpo", {**HPO, "split_run_id": split_run_id})
        return seconds, tunables(children(entry_runs("hpo")[0].info.run_id))


# --- kills at random moments -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_ingest_killed_then_rerun_gives_the_same_manifest(seed, ingest_ref, tmp_path):
    """No `--run-id`: a new run over the killed one's cache finishes the job."""
    seconds, expected = ingest_ref
    params = {**INGEST, "cache_dir": tmp_path / "cache"}
    delay = random.Random(f"ingest-{seed}").uniform(0, seconds)
    status = kill_entry("ingest", params, delay)
    records = len(list((tmp_path / "cache").glob("records/*/*.json")))
    print(f"\ningest seed {seed}: SIGKILL at {delay:.1f} s of ~{seconds:.0f} s -> "
          f"{'killed' if status is None else f'had ended ({status})'}; {records} records cached")
    run_entry("ingest", params)
    run = entry_runs("ingest")[0]
    assert run.info.status == "FINISHED"
    assert manifest_of(run.info.run_id).equals(expected)
    assert pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="rejects.csv")).empty


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_then_resumed_matches_an_uninterrupted_run(seed, train_ref, split_run_id):
    seconds, ref = train_ref
    check_train(kill_and_resume("train", {**TRAIN, "split_run_id": split_run_id}, seed, seconds, epochs_logged), ref)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_hpo_killed_then_resumed_runs_the_same_trials(seed, hpo_ref, split_run_id):
    seconds, expected = hpo_ref
    check_trials(kill_and_resume("hpo", {**HPO, "split_run_id": split_run_id}, seed, seconds, trials_left), expected)


# --- kills at the worst moments ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_killed_between_an_epochs_metrics_and_its_checkpoint(train_ref, split_run_id):
    """Killed as soon as epoch 1 is printed (its metrics logged, its checkpoint not yet saved): the resumed run
    replays epoch 1 and must not log it twice."""
    _, ref = train_ref
    params = {**TRAIN, "split_run_id": split_run_id}
    assert kill_entry("train", params, line="train: epoch=1") is None
    [run] = entry_runs("train")
    assert epochs_logged(run.info.run_id) == "val_loss steps [1], checkpoint False"  # the window was hit
    run_entry("train", params, "--run-id", run.info.run_id)
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    check_train(run.info.run_id, ref)


def test_hpo_killed_between_a_trials_end_and_its_record(split_run_id, monkeypatch):
    """Trial 1's child run ended FINISHED, then the search died before trials.json recorded it (in-process, a
    BaseException in that save): the resumed search reruns trial 1 and closes the unrecorded child as KILLED."""
    monkeypatch.setattr(training, "train_run", FakeTraining())
    expected = tunables(children(hpo_step.main(hpo_args(split_run_id))))

    log_text, saves = mlflow.log_text, []

    def dying_log_text(text, artifact_file, *args, **kwargs):
        saves.append(artifact_file)
        if saves.count(hpo.TRIALS_FILE) == 2:  # the first save is before any trial; the second, after trial 1
            raise Killed()
        return log_text(text, artifact_file, *args, **kwargs)

    monkeypatch.setattr(mlflow, "log_text", dying_log_text)
    with pytest.raises(Killed):
        hpo_step.main(hpo_args(split_run_id))
    monkeypatch.setattr(mlflow, "log_text", log_text)
    parent = last_run("hpo").info.run_id
    assert [t.info.status for t in children(parent)] == ["FINISHED"] and hpo.load_trials(parent)["trials"] == []

    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    assert hpo_step.main(hpo_args(split_run_id)) == parent
    check_trials(parent, expected)
    assert [t.info.status for t in children(parent)].count("KILLED") == 1


# --- serving under load ------------------------------------------------------------------------------------------

def test_serve_load_bench_smoke(tmp_path):
    """bench/serve_load.py --requests 40: every good request counted, every bad one refused with a 4xx."""
    out = tmp_path / "serve_load.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the bench makes its own store
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--requests", "40", "--clients", "4",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["ok"] and res["served"]["good"]["n"] + res["served"]["bad"]["n"] == 40
    kinds = res["served"]["statuses_by_kind"]
    assert kinds.pop("good") == {"200": res["served"]["good"]["n"]}
    assert len(kinds) == 5 and all(400 <= int(s) < 500 for k in kinds.values() for s in k)
    assert res["baseline"]["good"]["n"] == res["served"]["good"]["n"]
