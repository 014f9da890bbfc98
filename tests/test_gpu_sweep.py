"""bench/gpu_sweep.py with tiny settings on a CPU: it takes a sample folder along, and its one call runs the
benches and an hpo of the Lite0 recipe on it and writes its table (what a GPU machine runs at full size); the
wheels it carries (bench/gpu_bundle.py) are this venv's versions, install the way the GPU machine installs them,
and a missing one stops the call at once, named."""
import csv
import json
import os
import sys
import zipfile
from importlib import metadata

import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_bundle  # noqa: E402
import gpu_sweep  # noqa: E402

from bincounter import synthetic  # noqa: E402


def bucket_folder(d, n=30):
    """n generated bins in the bucket's layout with labels.csv, 400x300 px, and two the sweep must leave out."""
    (d / "bin-images").mkdir(parents=True)
    rows = []
    for i, (image_id, count) in enumerate(synthetic.synthetic_items(n, 1, 5, seed=0)):
        synthetic.draw_bin(count, synthetic.item_seed(0, i), 300).resize((400, 300)).save(d / "bin-images" / f"{image_id}.jpg")
        rows.append((image_id, count))
    synthetic.draw_bin(7, 1, 64).save(d / "bin-images" / "many.jpg")  # count 7: outside 1-5
    rows += [("many", 7), ("missing", 2)]  # listed without a photo
    with open(d / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "count"), *rows])
    return rows[:n]


def test_gpu_sweep_takes_the_sample_and_writes_its_table_on_a_cpu(tmp_path):
    rows = bucket_folder(tmp_path / "src")
    dst = tmp_path / "taken"
    assert gpu_bundle.take(tmp_path / "src", dst) == len(rows)
    taken = {p.stem for p in (dst / "bin-images").glob("*.jpg")}
    assert taken == {i for i, _ in rows}
    with Image.open(dst / "bin-images" / f"{rows[0][0]}.jpg") as im:
        assert min(im.size) == 256 and im.size == (341, 256)  # shrunk like ingest's cache, aspect kept
    assert (dst / "labels.csv").read_text().splitlines()[0] == "image_id,count"

    out = tmp_path / "out"
    args = gpu_sweep.get_args_parser().parse_args(["--tiny", f"--sample={dst}", f"--out={out}", "--trials=2"])
    result = gpu_sweep.main(args)
    assert result["smoke"]["status"] == "skipped"  # no CUDA here
    h = result["hpo"]
    assert h["returncode"] == 0 and not h["cut"] and len(h["trials"]) == 2
    assert all(t["status"] == "ok" and 0 <= t["value"] <= 1 for t in h["trials"])
    assert {"trainable_blocks", "bn", "backbone_lr"} <= set(h["trials"][0]["params"])  # the Lite levers searched
    levers = [r["lever"] for r in result["bench"]["levers"]["rows"]]
    assert levers == ["before: contiguous tensors", "train's step (channels_last)", "trainable_blocks=2"]
    text = (out / "gpu_sweep.md").read_text()
    assert "## bench/cuda_smoke.py: skipped" in text and "| resnet18 | 32 | 4 | train project, PIL |" in text
    assert "| trainable_blocks=2 |" in text and "## hpo: 2 trials finished of 2" in text
    assert text.count("| val_accuracy |") == 1 and len([ln for ln in text.splitlines() if ln.startswith("| 1 |")]) == 1
    assert json.loads((out / "gpu_sweep.json").read_text())["hpo"]["run_id"] == h["run_id"]


def test_the_carried_wheels_are_this_venvs_versions():
    pinned = {dist: version for dist, version, _ in gpu_bundle.PIN}
    assert {dist: metadata.version(dist) for dist in pinned} == pinned  # a venv upgrade must update PIN too
    assert len(pinned) == len(gpu_bundle.PIN)  # one version of each, or the install there stops


def test_a_missing_package_stops_the_sweep_naming_the_wheel_to_add(monkeypatch):
    monkeypatch.setitem(sys.modules, "hyperopt", None)  # import hyperopt now raises ModuleNotFoundError
    with pytest.raises(SystemExit, match=r"importing hyperopt needs the module hyperopt.*add hyperopt==0\.3\.0"):
        gpu_bundle.check_packages(["numpy", "hyperopt"])
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(SystemExit, match="add opentelemetry-api==1.45.2 and opentelemetry-sdk==1.45.2 and"):
        gpu_bundle.check_packages(["opentelemetry"])
    with pytest.raises(SystemExit, match="add the wheel that brings the module no_such_module to PIN"):
        gpu_bundle.check_packages(["no_such_module"])


def test_a_package_too_old_for_a_carried_wheel_stops_the_sweep_with_its_import_error(tmp_path, monkeypatch):
    (tmp_path / "needs_new_name.py").write_text("from json import name_of_a_newer_json\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit, match="importing needs_new_name failed .*name_of_a_newer_json.* differs"):
        gpu_bundle.check_packages(["needs_new_name"])


def make_wheel(d, name="gpu_sweep_probe", version="1.0"):
    """A minimal pure-Python wheel whose module holds VALUE = 42."""
    d.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    path = d / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{name}/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_wheels_install_into_the_site_folder_first_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    with pytest.raises(SystemExit, match="no .whl files there; `make gpu-bundle`"):
        gpu_bundle.install_wheels(tmp_path / "empty", tmp_path / "site")
    make_wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    try:
        assert gpu_bundle.install_wheels(tmp_path / "wheels", site) == ["gpu_sweep_probe-1.0-py3-none-any.whl"]
        import gpu_sweep_probe
        assert gpu_sweep_probe.VALUE == 42 and gpu_sweep_probe.__file__.startswith(str(site))
    finally:
        sys.modules.pop("gpu_sweep_probe", None)
    assert sys.path[0] == str(site)
    # the processes it starts (cuda_smoke, the hpo step) see the wheels and the checkout
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(site), str(ROOT), "/elsewhere"]


def test_what_a_call_carries_is_the_tree_and_the_bundle(tmp_path):
    extra = tmp_path / "bundle"
    extra.mkdir()
    (extra / "one.bin").write_bytes(b"\0" * 2**20)
    size = gpu_bundle.travelling_mib(extra)
    assert size["bundle"] == 1.0 and 0.5 < size["tree"] < gpu_bundle.TRAVEL_LIMIT_MIB
    assert size["total"] == size["tree"] + 1.0


def test_the_sweep_stops_before_anything_runs_without_the_sample(tmp_path):
    args = gpu_sweep.get_args_parser().parse_args(["--tiny", f"--sample={tmp_path / 'none'}",
                                                   f"--out={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="no sample at .*make gpu-bundle"):
        gpu_sweep.main(args)
    assert not (tmp_path / "out").exists()


def test_a_failing_phase_leaves_the_next_one_and_fails_the_call(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("the bench broke")

    monkeypatch.setattr(gpu_sweep, "bench", broken)
    monkeypatch.setattr(gpu_sweep, "sweep", lambda *a: {"run_id": "r1", "trials": [], "cut": True, "returncode": None})
    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "labels.csv").write_text("image_id,count\n")
    out = tmp_path / "out"
    args = gpu_sweep.get_args_parser().parse_args(["--tiny", f"--sample={sample}", f"--out={out}", "--trials=3"])
    with pytest.raises(SystemExit, match="failed: bench "):
        gpu_sweep.main(args)
    saved = json.loads((out / "gpu_sweep.json").read_text())
    assert "RuntimeError: the bench broke" in saved["bench"]["error"] and saved["hpo"]["run_id"] == "r1"
    text = (out / "gpu_sweep.md").read_text()
    assert "## bench/train.py: failed" in text and "RuntimeError: the bench broke" in text
    assert "## hpo: 0 trials finished of 3 (stopped at the time limit), 0 ok; run r1" in text
