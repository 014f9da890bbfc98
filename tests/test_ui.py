"""The user's MLflow UI workflow, in a real browser (headless Chromium through selenium).

A throw-away `mlflow server` is filled with a small chain on generated bins (main, a second train setting, its
evaluation and registration), then the pages a user compares and promotes on are opened and their rendered text
checked: the runs table, the compare view and the val_accuracy chart of the two train runs, an evaluate run's
confusion matrix, the hpo run's trials, the registered model's versions and aliases, the alias editor moving
`champion` (then `bincounter rollback`), and the `bincounter reconcile` report. Each page is saved as a PNG in
$BINCOUNTER_UI_SHOTS (scripts/ui_screenshots.py: docs/images/) or the test's tmp folder.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import browser
from browser import chromium, screenshot, shown_images, wait_text
from conftest import ROOT, run_entry
from tracking import free_port, mlflow_server, wait_for_server

from bincounter.runs import create_project_run, ui_url

MODEL = "bin-counter"
SMALL = dict(arch="resnet18", weights="none", image_size=32, max_steps=3, workers=0)
ML = "workflowType=machine_learning"  # MLflow 3.17's UI shows the GenAI pages unless asked for this


def test_a_server_that_is_not_up_fails_fast_naming_its_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"tracking server at {uri} is not up"):
        wait_for_server(uri, timeout=3)
    assert time.monotonic() - start < 15


def project_run(entry: str, params: dict, experiment_id: str) -> str:
    """Run an entry point the way main does, in a run created beforehand (so its parameters are logged as the
    step parsed them, not shell-quoted) -> run id."""
    run_id = create_project_run(entry, experiment_id, ROOT)
    run_entry(entry, params, "--run-id", run_id, timeout=900)
    return run_id


def by_step(experiment_id: str, step: str) -> list:
    return mlflow.search_runs([experiment_id], f"tags.`bincounter.step` = '{step}'", output_format="list",
                              order_by=["attributes.start_time ASC"])


def draw_bins(folder: Path) -> Path:
    """8 generated bin photos and an expected-quantity CSV in which 3 records are far off -> the CSV."""
    from bincounter.synthetic import draw_bin

    folder.mkdir(parents=True)
    rows = []
    for i, count in enumerate([1, 2, 3, 4, 5, 2, 3, 4]):
        image_id = f"bin{i:02d}"
        draw_bin(count, seed=500 + i, size=256).save(folder / f"{image_id}.jpg", "JPEG")
        rows.append((image_id, count if i < 5 else 12))  # 12 is no count the model knows: p_expected = 0
    expected = folder.parent / "expected.csv"
    with open(expected, "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "expected_quantity"), *rows])
    return expected


@pytest.fixture
def ui(tmp_path, monkeypatch):
    """A running server with the chain in experiment `bin-counter-ui` -> dict of what the pages should show."""
    why = browser.missing()
    if why:
        pytest.skip(why)
    previous = mlflow.get_tracking_uri()
    with mlflow_server(tmp_path / "server") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        mlflow.set_tracking_uri(uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "bin-counter-ui")
        exp = mlflow.set_experiment("bin-counter-ui").experiment_id
        monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        run_entry("main", dict(source="synthetic", num_images=100, cache_dir=tmp_path / "data", max_evals=2,
                               hpo_epochs=1, epochs=3, **SMALL), timeout=1200)
        split = by_step(exp, "split")[0].info.run_id
        train2 = project_run("train", dict(split_run_id=split, lr=0.01, epochs=3, **SMALL), exp)
        project_run("evaluate", dict(model_uri=f"runs:/{train2}/model", split_run_id=split), exp)
        project_run("register", dict(run_id=train2, name=MODEL), exp)
        expected = draw_bins(tmp_path / "bins" / "images")
        report = tmp_path / "bins" / "report.html"
        out = subprocess.run([sys.executable, "-m", "bincounter.cli", "reconcile", "--images",
                              str(expected.parent / "images"), "--expected", str(expected), "--report", str(report)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        yield dict(uri=uri, exp=exp, report=report, trains=by_step(exp, "train"), evaluate=by_step(exp, "evaluate")[0],
                   hpo=by_step(exp, "hpo")[0], trials=by_step(exp, "hpo_trial"),
                   shots=Path(os.environ.get("BINCOUNTER_UI_SHOTS") or tmp_path / "shots"))
    mlflow.set_tracking_uri(previous)


def close_assistant(d) -> None:
    """Close the MLflow Assistant side panel if it is open: it takes a third of the window."""
    from selenium.webdriver.common.by import By

    for b in d.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        if b.is_displayed():
            b.click()


def runs_table(d, ui) -> None:
    """1. The runs table opens on the step runs (saved view), with the columns to compare them on."""
    names = [t.info.run_name for t in ui["trains"]]
    d.get(ui_url(ui["uri"], ui["exp"]))
    wait_text(d, "Runs", "main synthetic resnet18 32px")
    close_assistant(d)
    # the table folds main's step runs under its row: open it with the row's expander, as a user does
    from selenium.webdriver.common.by import By

    d.find_element(By.XPATH, "//a[starts-with(normalize-space(.), 'main synthetic')]"
                             "/ancestor::div[contains(@class, 'ag-cell')][1]//button").click()
    page = wait_text(d, "val_accuracy", "test_accuracy", "Dataset", *names, "hpo resnet18 32px 2 trials",
                     "split 0.6/0.2/0.2", "ingest synthetic 100", f"evaluate {names[1]}", f"register {MODEL}")
    assert "Overview" not in page.split("Runs")[0]  # the model-training navigation, not GenAI's Overview
    screenshot(d, ui["shots"], "ui_runs")


def compare(d, ui) -> None:
    """2. The two train runs compared: the parameters that differ, and val_accuracy over the epochs."""
    from selenium.webdriver.common.by import By

    base, exp = ui["uri"], ui["exp"]
    names = [t.info.run_name for t in ui["trains"]]
    ids = [t.info.run_id for t in ui["trains"]]
    d.get(f"{base}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp])}&{ML}")
    wait_text(d, "Comparing 2 Runs", "Show diff only", *names)
    close_assistant(d)
    switch = d.find_element(By.CSS_SELECTOR, "button[aria-label='Parameters - Show diff only']")
    switch.click()
    d.execute_script("arguments[0].scrollIntoView()", switch)  # the screenshot shows the parameter table
    table = wait_text(d, "hp_lr", "0.01", "hpo_run_id")
    params = table[table.index("Parameters"):table.index("Metrics", table.index("Parameters"))]
    assert "arch" not in params.split()  # equal parameters are hidden
    assert "''" not in params, params  # values as parsed, not as shell-quoted by `mlflow run`
    screenshot(d, ui["shots"], "ui_compare")
    q = urllib.parse.quote
    d.get(f"{base}/#/metric?runs={json.dumps(ids)}&metric={q(json.dumps('val_accuracy'))}"
          f"&experiments={json.dumps([exp])}&plot_metric_keys={q(json.dumps(['val_accuracy']))}"
          f"&plot_layout={{}}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true"
          f"&deselected_curves=[]&last_linear_y_axis_range=[]&{ML}")
    chart = wait_text(d, "val_accuracy", "Step", *[f"{n} (val_accuracy)" for n in names])
    assert "(step=3)" in chart  # one point per epoch, the last at epoch 3
    assert d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace"), "no curve drawn"
    screenshot(d, ui["shots"], "ui_val_accuracy")


def confusion_matrix(d, ui) -> None:
    """3. An evaluate run's confusion matrix, displayed in the artifact viewer."""
    from selenium.webdriver.support.ui import WebDriverWait

    ev = ui["evaluate"]
    d.get(f"{ui['uri']}/#/experiments/{ui['exp']}/runs/{ev.info.run_id}/artifacts/confusion_matrix.png?{ML}")
    wait_text(d, ev.info.run_name, "confusion_matrix.png", "predictions.csv", "per_count.csv")
    close_assistant(d)
    WebDriverWait(d, 60).until(lambda d: any(s.startswith("blob:") for s in shown_images(d)))
    screenshot(d, ui["shots"], "ui_confusion_matrix")


def hpo_trials(d, ui) -> None:
    """4. The hpo run with its trials nested under it."""
    hpo = ui["hpo"]
    trial_names = [t.info.run_name for t in ui["trials"]]
    assert len(trial_names) == 2 and all(t.data.tags["mlflow.parentRunId"] == hpo.info.run_id for t in ui["trials"])
    d.get(f"{ui['uri']}/#/experiments/{ui['exp']}/runs/{hpo.info.run_id}?{ML}")
    wait_text(d, hpo.info.run_name, "Child runs", *trial_names, "best_lr", "Parent run")
    close_assistant(d)
    screenshot(d, ui["shots"], "ui_hpo")


def registry_and_promotion(d, ui) -> None:
    """5. The registered model with its versions and aliases; `champion` moved with the model version page's
    alias editor, resolved through `models:/bin-counter@champion`, and moved back by `bincounter rollback`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient()
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    challenger = client.get_model_version_by_alias(MODEL, "challenger").version
    d.get(f"{ui['uri']}/#/models/{MODEL}?{ML}")
    wait_text(d, "Registered Models", MODEL, "Version 1", "Version 2", "champion", "challenger")
    close_assistant(d)
    screenshot(d, ui["shots"], "ui_registry")

    other = "2" if champion == "1" else "1"
    d.get(f"{ui['uri']}/#/models/{MODEL}/versions/{other}?{ML}")
    wait_text(d, f"Version {other}", "Aliases")
    close_assistant(d)
    d.find_element(By.CSS_SELECTOR, "button[title='Add aliases'], button[title='Edit aliases']").click()
    dialog = WebDriverWait(d, 30).until(ec.visibility_of_element_located((By.CSS_SELECTOR, "[role='dialog']")))
    box = dialog.find_element(By.CSS_SELECTOR, "input[role='combobox']")
    box.send_keys("champion")
    box.send_keys(Keys.ENTER)
    wait_text(d, f'The "champion" alias is also being used on version {champion}')
    screenshot(d, ui["shots"], "ui_alias_editor")
    dialog.find_element(By.XPATH, ".//button[normalize-space(.)='Save aliases']").click()
    WebDriverWait(d, 30).until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "[role='dialog']")))
    assert client.get_model_version_by_alias(MODEL, "champion").version == other
    moved = mlflow.models.get_model_info(f"models:/{MODEL}@champion")
    assert moved.run_id == client.get_model_version(MODEL, other).run_id
    assert client.get_model_version_by_alias(MODEL, "challenger").version == challenger  # untouched
    out = subprocess.run([sys.executable, "-m", "bincounter.cli", "rollback", "--name", MODEL],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"rolled back to version {champion} (was {other})" in out.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion


def reconcile_report(d, ui) -> None:
    """6. The `bincounter reconcile` report: the flagged bins with their thumbnails."""
    d.get(ui["report"].as_uri())
    page = wait_text(d, "Flagged bins", "bin05", "bin06", "bin07")
    assert len(shown_images(d, "img[src^='data:image/jpeg']")) >= 3, page
    screenshot(d, ui["shots"], "ui_reconcile")


PAGES = [runs_table, compare, confusion_matrix, hpo_trials, registry_and_promotion, reconcile_report]


@pytest.mark.slow
def test_ui_workflow(ui):
    names = [t.info.run_name for t in ui["trains"]]
    assert names[1] == "train resnet18 32px lr=0.01" and names[0].startswith("train resnet18 32px lr=")
    with chromium() as d:
        for page in PAGES:
            page(d, ui)
