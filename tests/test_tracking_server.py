"""The pipeline against a team's tracking server: mlflow server over PostgreSQL (scripts/tracking_server.sh)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT, run_entry
from tracking import api, free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))),
                                 reason="PostgreSQL is not installed (apt-get install postgresql)")]
SCRIPT = ROOT / "scripts" / "tracking_server.sh"


@pytest.fixture
def server(tmp_path, monkeypatch):
    previous = mlflow.get_tracking_uri()  # restored after: the next test's fixtures log to the session store
    port = free_port()
    d = tmp_path / "tracking"
    out = subprocess.run([str(SCRIPT), "start", str(d), str(port)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PGPORT_MLFLOW=str(free_port()),
                                  PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert out.returncode == 0, out.stdout + out.stderr
    uri = f"http://127.0.0.1:{port}"
    assert f"export MLFLOW_TRACKING_URI={uri}" in out.stdout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    mlflow.set_experiment("team")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield uri
    mlflow.set_tracking_uri(previous)
    subprocess.run([str(SCRIPT), "remove", str(d)], timeout=120)  # its database too: nothing is left behind


def test_pipeline_logs_to_the_tracking_server(server, tmp_path):
    run_entry("main", dict(source="synthetic", num_images=40, cache_dir=tmp_path / "data", arch="resnet18",
                           weights="none", image_size=32, max_evals=2, max_steps=2, epochs=1, workers=0,
                           model_name="bin-counter-team"), timeout=1800)
    exp = api(server, "experiments/get-by-name?experiment_name=team")["experiment"]
    runs = api(server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_step = {}
    for r in runs:
        tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        by_step.setdefault(tags.get("bincounter.step"), []).append(r)
        assert r["info"]["status"] == "FINISHED", tags.get("bincounter.step")
    for step in ("main", "ingest", "split", "hpo", "train", "evaluate", "register"):
        assert len(by_step.get(step, [])) == 1, step
    assert len(by_step["hpo_trial"]) == 2  # the trials wrote to the server as nested runs
    main_id = by_step["main"][0]["info"]["run_id"]
    for r in runs:
        if r["info"]["run_id"] != main_id and r not in by_step["hpo_trial"]:
            tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
            assert tags["mlflow.parentRunId"] == main_id
    champion = api(server, "registered-models/alias?name=bin-counter-team&alias=champion")["model_version"]
    train_id = by_step["train"][0]["info"]["run_id"]
    assert champion["run_id"] == train_id
    # the artifacts went through the server into its artifact root
    assert list((tmp_path / "tracking" / "artifacts").rglob("manifest.csv"))
