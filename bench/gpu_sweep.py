"""The GPU sweep: one call of at most 10 minutes on a GPU machine that has no network and keeps nothing between
calls. It
1. takes the real sample and the missing wheels along (bench/gpu_bundle.py): `make gpu-bundle` (here, before
   the call; it runs `--bundle ../shared/abid-sample`) copies the sample's labelled bins (counts 1-5), shrunk to
   the ingest cache's 256 px at JPEG quality 60, and their labels into .gpu_sweep/abid-sample, and downloads into
   .gpu_sweep/wheels the wheels (CPython 3.12, manylinux x86_64) of what the GPU image lacks (PIN: mlflow-skinny
   and what it imports, hyperopt, boto3 for the ingest step, the Lite0 weights; the sweep tracks into a file
   store); all of it in .gpu_sweep, a folder git ignores, copied with the checkout to the GPU machine, under
   64 MiB with the tracked tree (the bundle step measures it);
2. there, `--wheels .gpu_sweep/wheels` installs those wheels first (pip, no index, no dependencies, into
   /tmp/site, put first on the path and on PYTHONPATH for the processes it starts), then checks that every
   package the sweep imports (NEEDED) is there, and stops at once naming the wheel to add when one is not;
3. runs bench/cuda_smoke.py (the CUDA paths end to end; skipped without CUDA) and bench/train.py at GPU sizes
   (the project's training and inference against bare loops) and its `--levers` table (channels_last,
   torch.compile, trainable_blocks);
4. ingests and splits that sample (steps in-process) and runs the hpo step on it: `--trials` (40) trials of the
   EfficientNet-Lite0 recipe (ImageNet weights, label smoothing 0.1, warm-up 1, median answer, TTA) over the
   search space (lr, batch size, weight decay, optimizer, freeze, freeze_epochs, backbone_lr, bn,
   trainable_blocks), stopped at the time left (trials.json keeps the finished ones);
5. writes its tables to `--out` (gpu_sweep.md, gpu_sweep.json).
`--tiny` runs the same on a CPU with tiny settings (what tests/test_gpu_sweep.py runs on generated bins).
The project itself needs no install there: it runs from the checkout's root (bincounter/, steps/ import from it).

    make gpu-bundle                                                           # here
    python3 bench/gpu_sweep.py --wheels .gpu_sweep/wheels --out $OUT          # there (docs/benchmarks.md: the call)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bundle import PIN, QUALITY, SAMPLE, SITE, bundle, check_packages, install_wheels, take  # noqa: E402

# what the sweep imports, the image's and the carried packages, then the project's modules that import the rest
NEEDED = ["torch", "torchvision", "timm", "numpy", "pandas", "PIL", "matplotlib", "tqdm", "yaml",
          *dict.fromkeys(m for _, _, m in PIN), "mlflow.pyfunc", "mlflow.store.tracking.file_store",
          "bincounter.hpo", "bincounter.serving", "bincounter.tensor_cache", "steps.ingest", "steps.split",
          "steps.hpo"]


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
                           timeout=min(max(left(deadline) - 60, 30), 300), cwd=ROOT)  # a hung one leaves the hpo time
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
        ["--source=local", f"--data_dir={sample}", "--file_list=all", f"--cache_dir={cache_dir}", "--downloads=8"]))
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
    """The sweep's results so far (a phase not reached is left out; a failed one shows its error) -> markdown."""
    lines = [f"# GPU sweep ({result['mode']})", "",
             f"{result['device']}, torch {result['torch']}, {result.get('seconds', 0):.0f} s in all", ""]
    if "smoke" in result:
        s = result["smoke"]
        lines += [f"## bench/cuda_smoke.py: {s['status']} ({s['seconds']:.0f} s)", ""]
        if s["status"] == "failed":
            lines += ["```", s["tail"][-1500:], "```", ""]
    b = result.get("bench")
    if b and "error" in b:
        lines += ["## bench/train.py: failed", "", "```", b["error"], "```", ""]
    elif b:
        lines += ["## bench/train.py", "", "| arch | px | batch | what | img/s | ratio to the bare loop |",
                  "|---|---|---|---|---|---|"]
        for run in b["train"]:
            lines += [f"| {run['arch']} | {run['image_size']} | {run['batch_size']} | {r['what']} | {r['img_s']:.1f} | "
                      f"{r['ratio']:.2f} |" for r in run["table"]]
        levers = b["levers"]
        a = levers["args"]
        lines += ["", f"## Fine-tuning levers: {a['arch']} {a['image_size']} px, batch {a['batch_size']} "
                  f"(torch.compile compiled in {levers['compile_s']:.0f} s)", "",
                  "| training step | img/s | vs the train step |", "|---|---|---|"]
        lines += [f"| {r['lever']} | {r['img_s']:.1f} | {r['ratio']:.2f} |" for r in levers["rows"]]
        lines.append("")
    h = result.get("hpo")
    if h and "error" in h:
        lines += ["## hpo: failed", "", "```", h["error"], "```"]
    elif h:
        ok = sorted((t for t in h["trials"] if t["status"] == "ok"), key=lambda t: t["loss"])
        lines += [f"## hpo: {len(h['trials'])} trials finished of {result['trials']}"
                  f"{' (stopped at the time limit)' if h['cut'] else ''}, {len(ok)} ok; run {h['run_id']}, exit "
                  f"status {h['returncode']}", ""]
        if ok:
            names = list(ok[0]["params"])
            lines += ["| trial | " + " | ".join(names) + " | val_accuracy |", "|---" * (len(names) + 2) + "|"]
            for t in ok:
                shown = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in t["params"].values()]
                lines.append(f"| {t['number']} | " + " | ".join(shown) + f" | {t['value']:.3f} |")
    return "\n".join(lines) + "\n"


def guarded(fn, *args) -> dict:
    """fn(*args), or {"error": the traceback's tail} when it raises: one phase failing on the GPU machine must
    not cost the phases after it (the call cannot be repeated cheaply)."""
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()[-3000:]}


def save(out: Path, result: dict, start: float) -> None:
    """Write the results so far to `out` (after every phase: a call stopped at its limit keeps what it did)."""
    result["seconds"] = time.monotonic() - start
    (out / "gpu_sweep.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_sweep.md").write_text(table(result))


def sweep(sample: Path, trials: int, sizes: dict, deadline: float) -> dict:
    """Ingest and split `sample` (its cache in a temporary folder), then the hpo step on it (module doc, 4) -> hpo's
    result."""
    with tempfile.TemporaryDirectory(prefix="gpu-sweep-data-") as tmp:
        split_id = data(sample, Path(tmp))
        return hpo(split_id, trials, sizes["hpo"], deadline - 15)


def main(args: argparse.Namespace) -> dict:
    """Bundle (--bundle, --take: here), or run the sweep (module doc) -> the results it writes to args.out.
    SystemExit before anything runs when a package or the sample is missing, and at the end when a phase failed."""
    if args.bundle:
        return bundle(Path(args.bundle), args.python_version, args.quality)
    if args.take:
        take(Path(args.take), quality=args.quality)
        return {}
    start = time.monotonic()  # the budget counts installing the wheels too
    deadline = start + args.budget_s
    if args.wheels:
        install_wheels(Path(args.wheels), Path(args.site))
    check_packages(NEEDED)
    sample = Path(args.sample)
    if not (sample / "labels.csv").is_file():
        raise SystemExit(f"gpu_sweep: no sample at {sample} (labels.csv): `make gpu-bundle` here puts it in "
                         f"{SAMPLE.relative_to(ROOT)} and the call carries .gpu_sweep")
    import torch

    sizes = SIZES["tiny" if args.tiny else "gpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-sweep-") as tmp:
        # a store of its own unless one is given (the GPU machine keeps nothing anyway); a file store, since the
        # call carries no sqlalchemy (PIN), which mlflow refuses (maintenance mode) unless allowed
        if "MLFLOW_TRACKING_URI" not in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = Path(tmp, "mlruns").as_uri()
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "gpu-sweep")
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment exports it; the hpo process takes the name
        result = {"mode": "tiny" if args.tiny else "gpu", "trials": args.trials, "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}
        result["smoke"] = cuda_smoke(deadline)
        print(f"gpu_sweep: cuda smoke {result['smoke']['status']} ({time.monotonic() - start:.0f} s)", flush=True)
        save(out, result, start)
        result["bench"] = guarded(bench, sizes, not args.tiny)
        print(f"gpu_sweep: bench {'failed' if 'error' in result['bench'] else 'done'} "
              f"({time.monotonic() - start:.0f} s)", flush=True)
        save(out, result, start)
        result["hpo"] = guarded(sweep, sample, args.trials, sizes, deadline)
    save(out, result, start)
    print(table(result))
    failed = [k for k in ("bench", "hpo") if "error" in result[k]] + (["smoke"] if result["smoke"]["status"] ==
                                                                        "failed" else [])
    if failed:
        raise SystemExit(f"gpu_sweep: failed: {', '.join(failed)} (tables in {out})")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="", help="here: take this sample folder and download the wheels into "
                                                ".gpu_sweep, print what a call carries, and stop (make gpu-bundle)")
    p.add_argument("--take", default="", help="copy this sample folder into .gpu_sweep/abid-sample and stop")
    p.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality of the taken sample (--bundle, --take)")
    p.add_argument("--python_version", default="3.12", help="the CPython the wheels are for (the GPU image's 3.12)")
    p.add_argument("--wheels", default="", help="there: install the wheels of this folder first (into --site)")
    p.add_argument("--site", default=str(SITE), help="where --wheels installs them")
    p.add_argument("--sample", default=str(SAMPLE), help="the folder (bucket layout, labels.csv) to sweep on")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_sweep"), help="where the tables go")
    p.add_argument("--trials", type=int, default=40, help="hpo trials")
    p.add_argument("--budget_s", type=float, default=570, help="the hpo stops when this many seconds have passed")
    p.add_argument("--tiny", action="store_true", help="tiny settings, for a CPU (tests/test_gpu_sweep.py)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
