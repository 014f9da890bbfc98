"""Shared fixtures: one throw-away MLflow store for the session, one experiment per test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from datetime import date, timedelta
from pathlib import Path

import mlflow
import pytest

# Under pytest-xdist (`make test` runs two workers) each worker and the steps it starts get their share of the
# cores: torch threads oversubscribed across workers run slower than one thread each (training reads this too).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "abid-sample"
LABELS = ROOT.parent / "shared" / "abid-labels"
needs_sample = pytest.mark.skipif(not (SAMPLE / "labels.csv").exists(),
                                  reason=f"the real ABID sample is not at {SAMPLE}")


def stamped_today(dates) -> bool:
    """Whether `dates` are one day, today's (yesterday's, should the test have crossed midnight since the step
    stamped them)."""
    days = {str(d) for d in dates}
    now = date.today()
    return len(days) == 1 and days <= {now.isoformat(), (now - timedelta(days=1)).isoformat()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def temporary_files(tmp_path_factory) -> Path:
    """The session's temporary files, the steps' it starts included, go under pytest's own folder, never into the
    system's: removed with it after a passing session (tmp_path_retention_policy), kept after a failing one."""
    d = tmp_path_factory.mktemp("tmp")
    os.environ["TMPDIR"] = str(d)
    tempfile.tempdir = str(d)
    return d


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """A session-wide sqlite tracking store; artifacts live beside it."""
    d = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
    os.environ["GIT_PYTHON_REFRESH"] = "quiet"
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return d


@pytest.fixture(autouse=True)
def experiment(store, monkeypatch, request) -> str:
    """Each test logs into an experiment of its own (artifacts under the session store)."""
    name = f"{request.node.name[:60]}-{uuid.uuid4().hex[:6]}"
    exp_id = mlflow.create_experiment(name, artifact_location=(store / "artifacts" / name).as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    mlflow.set_experiment(name)
    # set_experiment also exports MLFLOW_EXPERIMENT_ID, which `mlflow run` refuses beside a name
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield name
    while mlflow.active_run():
        mlflow.end_run()


def run_entry(entry: str, params: dict, *extra: str, check: bool = True, timeout: int = 900,
              env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`mlflow run <repo> -e entry --env-manager local -P k=v ...` in the test's experiment."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", os.environ["MLFLOW_EXPERIMENT_NAME"], *extra]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env_extra or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def kill_env(after_epoch: int | None = None, after_trial: int | None = None) -> dict:
    """Environment for run_entry's env_extra that SIGKILLs the step after training saved epoch `after_epoch`, or
    after hpo saved trial `after_trial` (tests/faults/sitecustomize.py)."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")])}
    if after_epoch is not None:
        env["BINCOUNTER_TEST_KILL_AFTER_EPOCH"] = str(after_epoch)
    if after_trial is not None:
        env["BINCOUNTER_TEST_KILL_AFTER_TRIAL"] = str(after_trial)
    return env


def last_run(step: str):
    """The newest run of `step` in the test's experiment."""
    runs = mlflow.search_runs(experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]],
                              filter_string=f"tags.`bincounter.step` = '{step}'", output_format="list",
                              order_by=["attributes.start_time DESC"])
    assert runs, f"no {step} run"
    return runs[0]
