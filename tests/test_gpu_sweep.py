"""bench/gpu_sweep.py with tiny settings on a CPU: it takes a sample folder along, and its one call runs the
benches and an hpo of the Lite0 recipe on it and writes its table (what a GPU machine runs at full size)."""
import csv
import json
import sys

from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
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
    assert gpu_sweep.take(tmp_path / "src", dst) == len(rows)
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
