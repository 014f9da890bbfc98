"""Faults: ingest, train and hpo SIGKILLed (the whole `mlflow run` process group) at a random moment, then rerun:
each ends complete and equal to an uninterrupted run. Plus a smoke of the serving load bench.

The moment is drawn from a seeded RNG within the uninterrupted run's duration, so a seed may land before the
run exists, mid-step, or after it finished; every case must end right. Uninterrupted references are made once
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
from conftest import ROOT, run_entry
from helpers_data import make_split_run
from mlflow.tracking import MlflowClient

from bincounter.manifest import read_manifest
from bincounter.training import TUNABLE

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


def timed_entry(entry: str, params: dict, *extra: str) -> float:
    """run_entry, timed -> seconds."""
    start = time.monotonic()
    run_entry(entry, params, *extra)
    return time.monotonic() - start


def kill_entry(entry: str, params: dict, delay: float) -> int | None:
    """`mlflow run` as run_entry starts it, in a session of its own; SIGKILL its whole process group (the CLI,
    bash and the step) after `delay` s. -> None when killed, else the exit status it ended with first."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", os.environ["MLFLOW_EXPERIMENT_NAME"]]
    cmd += [a for k, v in params.items() for a in ("-P", f"{k}={v}")]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        return proc.wait(delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def entry_runs(entry: str) -> list:
    """The test experiment's runs of `entry` (tagged by `mlflow run` when it creates the run), newest first."""
    return mlflow.search_runs(experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]], output_format="list",
                              filter_string=f"tags.`mlflow.project.entryPoint` = '{entry}'",
                              order_by=["attributes.start_time DESC"])


def kill_and_resume(entry: str, params: dict, seed: int, expected_s: float) -> str:
    """Kill `entry` at a seeded random moment within `expected_s`, then rerun it into the killed run (`--run-id`),
    or afresh when the kill came before the run existed. -> the run id that ended FINISHED."""
    delay = random.Random(f"{entry}-{seed}").uniform(0, expected_s)
    status = kill_entry(entry, params, delay)
    runs = entry_runs(entry)
    state = runs[0].info.status if runs else "no run yet"
    print(f"\n{entry} seed {seed}: SIGKILL at {delay:.1f} s of ~{expected_s:.0f} s -> "
          f"{'killed' if status is None else f'had ended ({status})'}, run {state}")
    assert len(runs) <= 1
    run_entry(entry, params, *(["--run-id", runs[0].info.run_id] if runs else []))
    run = entry_runs(entry)[0]
    assert run.info.status == "FINISHED" and len(entry_runs(entry)) == 1
    return run.info.run_id


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def trials(parent_id: str) -> list:
    """The hpo parent's child runs, by trial number."""
    runs = MlflowClient().search_runs([mlflow.get_run(parent_id).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_id}'")
    return sorted(runs, key=lambda r: (int(r.data.tags["bincounter.trial"]), r.info.start_time))


def manifest_of(run_id: str):
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="manifest.csv")
    return read_manifest(path).sort_values("image_id", ignore_index=True)[["image_id", "count", "sha256"]]


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
        return seconds, [{k: t.data.params[k] for k in TUNABLE} for t in trials(entry_runs("hpo")[0].info.run_id)]


# --- the faults --------------------------------------------------------------------------------------------------

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
          f"{'killed' if status is None else f'had ended ({status})'}, {records} records cached")
    run_entry("ingest", params)
    run = entry_runs("ingest")[0]
    assert run.info.status == "FINISHED"
    assert manifest_of(run.info.run_id).equals(expected)
    rejects = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="rejects.csv")
    assert pd.read_csv(rejects).empty


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_then_resumed_matches_an_uninterrupted_run(seed, train_ref, split_run_id):
    seconds, ref = train_ref
    run_id = kill_and_resume("train", {**TRAIN, "split_run_id": split_run_id}, seed, seconds)
    for key in TRAIN_METRICS:  # every epoch logged exactly once, with the uninterrupted run's values
        got, want = history(run_id, key), history(ref.info.run_id, key)
        assert [s for s, _ in got] == [1, 2, 3], (key, got)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5), key
    final = mlflow.get_run(run_id).data.metrics
    val = {k: v for k, v in ref.data.metrics.items() if k.startswith(("val_", "best_val_"))}
    assert {k: final[k] for k in val} == pytest.approx(val, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_hpo_killed_then_resumed_runs_the_same_trials(seed, hpo_ref, split_run_id):
    seconds, expected = hpo_ref
    parent = kill_and_resume("hpo", {**HPO, "split_run_id": split_run_id}, seed, seconds)
    children = trials(parent)
    finished = [t for t in children if t.info.status == "FINISHED"]
    assert not [t for t in children if t.info.status == "RUNNING"]  # an interrupted trial is closed (KILLED)
    assert [{k: t.data.params[k] for k in TUNABLE} for t in finished] == expected
    assert [t.data.tags["bincounter.trial"] for t in finished] == ["1", "2", "3"]
    assert mlflow.get_run(parent).data.tags["best_run_id"] in {t.info.run_id for t in finished}


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
