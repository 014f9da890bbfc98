"""notebooks/bin_counter.ipynb runs top to bottom (nbclient, offline, tiny settings) and is committed clean."""
from __future__ import annotations

import json
import os
import re
import sys
import time

import nbformat

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "bin_counter.ipynb"
TINY = {"NB_NUM_IMAGES": "40", "NB_IMAGE_SIZE": "32", "NB_EPOCHS": "1", "NB_MAX_STEPS": "2", "NB_MAX_EVALS": "0",
        "NB_WORKERS": "0", "NB_MODEL_NAME": "bin-counter-notebook"}


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} have outputs or execution counts: clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_the_inventory_check_takes_the_models_own_threshold():
    """The reconcile cell uses the threshold the model carries (chosen on validation) and says what it promises,
    through the functions `bincounter reconcile` uses: no threshold typed into the notebook."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    literal = re.findall(r"^\s*\w*threshold\w*\s*=\s*[-+\d.]", code, re.I | re.M)
    assert not literal, f"the notebook sets a threshold by hand: {literal}"
    assert re.search(r"\bthreshold\w*\s*=\s*counter\.trust\.check_threshold\b", code, re.I), code
    assert re.search(r"\bcalibration\.describe_check\(counter\.trust, threshold\b", code), code


def _text(cell) -> str:
    """Everything a cell printed or displayed as text (stream, plain-text and HTML reprs)."""
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts += [o.data.get("text/plain", ""), o.data.get("text/html", "")]
    return "\n".join(parts)


def _by_tag(nb) -> dict:
    return {t: c for c in nb.cells for t in c.metadata.get("tags", [])}


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # the python3 kernel must be this environment's python (jupyter_client swaps a bare `python` for sys.executable)
    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable
    for k, v in {**TINY, "NB_CACHE_DIR": str(tmp_path / "data"), "NB_WORK_DIR": str(tmp_path / "work")}.items():
        monkeypatch.setenv(k, v)
    assert os.environ["MLFLOW_TRACKING_URI"] and os.environ["MLFLOW_EXPERIMENT_NAME"]  # conftest's store and experiment

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure
    print(f"notebook executed in {time.time() - t0:.0f} s ({tmp_path / 'executed.ipynb'})")

    cells = _by_tag(nb)
    assert "FINISHED" in _text(cells["chain"])
    assert "test_accuracy" in _text(cells["compare"])
    assert _images(cells["curves"]) >= 2  # learning curves and the confusion matrix
    gate = _text(cells["gate"])
    assert "CHAMPION" in gate or "CHALLENGER" in gate, gate
    assert "rolled back" in _text(cells["promote"])
    served = _text(cells["serve"])
    assert "count" in served and "confidence" in served and "p_5" in served, served
    assert "a request with a bad image: HTTP 200" in served and "row 1: not an image" in served, served
    assert "a request with no readable image: HTTP 400" in served, served
    reconciled = _text(cells["reconcile"])
    assert "bins_checked" in reconciled and '"bins_checked": 12' in reconciled, reconciled
    assert '"no_image": 1' in reconciled and '"outside_model_range": 1' in reconciled
    from bincounter import calibration, counters
    counter = counters.load(f"models:/{TINY['NB_MODEL_NAME']}@champion")  # the model the cell checked with
    threshold = counter.trust.check_threshold
    assert f'"threshold": {json.dumps(threshold)}' in reconciled, reconciled  # the model's own threshold
    assert calibration.describe_check(counter.trust, threshold, counter.target_mix) in reconciled, reconciled
    assert "report.html" in _text(cells["report"]) and "Bin inventory check" in _text(cells["report"])
    assert (tmp_path / "work" / "reconcile" / "report.html").is_file()

    import mlflow
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    champion = client.get_model_version_by_alias(TINY["NB_MODEL_NAME"], "champion")
    assert str(champion.version) in ("1", "2")  # the chain's version or the variant, whichever the gate chose
    steps = {r.data.tags.get("bincounter.step") for r in mlflow.search_runs(output_format="list")}
    assert {"main", "ingest", "split", "train", "evaluate", "register", "reconcile"} <= steps, steps
