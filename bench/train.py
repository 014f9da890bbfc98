"""Training and inference throughput of the project's code against bare loops on the same model, in one run.

Training, each a full step (forward, backward, optimizer) on the same model and batch size:
  bare    an AMP loop over one in-memory random batch (the compute limit);
  pil     the train step's loop as it was: JPEGs from a cache on disk, TrainPreset on PIL images in DataLoader
          workers (bincounter.data), bincounter.training.train_one_epoch;
  tensor  the same loop fed by bincounter.tensor_cache: images decoded once into a uint8 cache (built before
          timing; its build time is reported), TrainPreset's augmentations applied to whole batches on the device.
Inference: the pyfunc's code path (BinCounter.probabilities: parallel decode, one forward per chunk) on JPEG bytes
against bare `model(x)` forwards of the same chunks as ready tensors. Prints a table and writes bench/results/train.json.

    python bench/train.py --arch resnet50 --image_size 224 --batch_size 8 --steps 4

`--levers 0,2,3` measures instead what might make fine-tuning cheaper, each a full training step on one in-memory
batch (the compute, not the data path), in the same run, interleaved, best of the repeats: the train step's
(channels_last, every block training; on a CPU also contiguous tensors, what it used there before),
torch.compile (inductor; its compile time reported apart), and `trainable_blocks` at each value given
(levers.set_train_mode and make_optimizer, as a train run sets them), and with `--start_size` progressive
resizing: each epoch's size of train's schedule timed, and the schedule's rate over `--epochs` epochs (the
images of an epoch each at its epoch's rate). Writes bench/results/train_levers.json.

    OMP_NUM_THREADS=1 python bench/train.py --arch efficientnet_lite0 --image_size 224 --batch_size 8 --steps 3 --levers 0,2,3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincounter import synthetic, tensor_cache  # noqa: E402
from bincounter.data import ManifestDataset, make_loader  # noqa: E402
from bincounter.serving import BinCounter  # noqa: E402
from bincounter.counters import MAX_BATCH
from bincounter.model import build_model, get_arch  # noqa: E402
from bincounter.levers import epoch_size, make_optimizer, set_train_mode  # noqa: E402
from bincounter.train_config import TrainConfig  # noqa: E402
from bincounter.training import setup_device, train_one_epoch  # noqa: E402
from bincounter.transforms import TrainPreset  # noqa: E402


def make_cache(d: Path, n: int, size: int = 256) -> pd.DataFrame:
    """n generated bins as JPEGs at the ingest cache's size -> a manifest-like frame (with sha256, as ingest's)."""
    rows = []
    for i, (image_id, count) in enumerate(synthetic.synthetic_items(n, 1, 5, seed=0)):
        path = d / f"{image_id}.jpg"
        synthetic.draw_bin(count, synthetic.item_seed(0, i), size).save(path, quality=90)
        rows.append({"image_id": image_id, "count": count, "path": str(path),
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return pd.DataFrame(rows)


def timed(fn, images: int) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def levers(args, device) -> dict:
    """Training img/s of each fine-tuning lever against today's step (module doc) -> {"rows", "compile_s"}."""
    amp = device.type == "cuda"
    n = args.batch_size * args.steps
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 5, (args.batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def variant(blocks: int = 0, channels_last: bool = True, compiled: bool = False, size: int = args.image_size):
        cfg = TrainConfig(arch=args.arch, weights="none", lr=1e-3, batch_size=args.batch_size, trainable_blocks=blocks)
        net = build_model(args.arch, 5, "none").to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        set_train_mode(net, cfg, epoch=1)
        opt = make_optimizer(cfg, net)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        model = torch.compile(net) if compiled else net
        xb = (x if size == args.image_size else nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                                            antialias=True)).contiguous(memory_format=fmt)

        def run():
            for _ in range(args.steps):
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    loss = loss_fn(model(xb), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return run

    # the train step's loop uses channels_last on every device; on a CPU it used contiguous tensors before
    today = "train's step (channels_last)"
    runs = {} if amp else {"before: contiguous tensors": variant(channels_last=False)}
    runs[today] = variant()
    if args.compile:
        runs["torch.compile"] = variant(compiled=True)
    for blocks in args.levers:
        if blocks:
            runs[f"trainable_blocks={blocks}"] = variant(blocks)
    # progressive resizing: every epoch's size of the schedule (levers.epoch_size), timed at that size
    schedule = TrainConfig(image_size=args.image_size, epochs=args.epochs, start_size=args.start_size)
    sizes = [epoch_size(schedule, e) for e in range(1, args.epochs + 1)] if args.start_size else []
    for size in sorted(set(sizes) - {args.image_size}):
        runs[f"at {size} px"] = variant(size=size)
    compile_s = 0.0
    for name, run in runs.items():  # warm-up; torch.compile compiles here
        start = time.perf_counter()
        run()
        if name == "torch.compile":
            compile_s = time.perf_counter() - start
    best = dict.fromkeys(runs, 0.0)
    for _ in range(args.repeats):  # interleaved, best of the repeats: the machine may be shared
        for name, run in runs.items():
            best[name] = max(best[name], timed(run, n))
    print(f"\n{args.arch} {args.image_size}px batch {args.batch_size}, {n} images x {args.repeats} repeats, "
          f"device {device}, threads {torch.get_num_threads()}; torch.compile compiled in {compile_s:.0f} s")
    print(f"{'training step':<32}{'img/s':>10}{'vs train':>10}")
    if sizes:  # one epoch's images at each epoch's rate
        rate = {size: best[today] if size == args.image_size else best[f"at {size} px"] for size in sizes}
        best[f"start_size={args.start_size} ({args.epochs} epochs)"] = len(sizes) / sum(1 / rate[s] for s in sizes)
    for name, v in best.items():
        print(f"{name:<32}{v:>10.1f}{v / best[today]:>10.2f}")
    rows = [{"lever": name, "img_s": v, "ratio": v / best[today]} for name, v in best.items()]
    return {"rows": rows, "compile_s": compile_s}


def main(args) -> dict:
    """-> what it writes to bench/results/train.json (train_levers.json with --levers)."""
    device = setup_device()
    if args.levers is not None:
        out = ROOT / "bench" / "results" / "train_levers.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"args": vars(args), "device": str(device), **levers(args, device)}
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return result
    torch.manual_seed(0)
    model = build_model(args.arch, 5, "none").to(device, memory_format=torch.channels_last)  # as training.setup
    norm = (get_arch(args.arch).mean, get_arch(args.arch).std)
    cfg = TrainConfig(arch=args.arch, weights="none", lr=1e-3, batch_size=args.batch_size)
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    n = args.batch_size * args.steps
    classes = [1, 2, 3, 4, 5]
    with tempfile.TemporaryDirectory() as tmp:
        df = make_cache(Path(tmp), n)
        ds = ManifestDataset(df, classes, TrainPreset(args.image_size, "light", *norm))
        start = time.perf_counter()
        cache = tensor_cache.open_cache(df, args.image_size, Path(tmp) / "tensors")
        build_s = time.perf_counter() - start

        def train_pil():
            loader = make_loader(ds, args.batch_size, args.workers, shuffle=True, seed=0,
                                 pin_memory=device.type == "cuda")
            train_one_epoch(model, loader, loss_fn, opt, scaler, device)

        def train_tensor():
            batches = tensor_cache.TrainBatches(cache, df["count"], classes, args.batch_size, seed=0, device=device,
                                                     mean=norm[0], std=norm[1])
            train_one_epoch(model, batches, loss_fn, opt, scaler, device)

        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 5, (args.batch_size,), device=device)
        amp = device.type == "cuda"
        x = x.to(memory_format=torch.channels_last)  # as train_one_epoch

        def train_bare():
            model.train()
            for _ in range(args.steps):
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

        # inference: the pyfunc's own code path on JPEG bytes; the bare forward with the same precision and layout
        counter = BinCounter(model, {"arch": args.arch, "classes": classes, "image_size": args.image_size})
        jpegs = [Path(p).read_bytes() for p in df["path"]]

        def infer_pyfunc():
            counter.probabilities(jpegs)

        # the same forward the pyfunc makes (its chunks of up to counters.MAX_BATCH images), on ready tensors: what
        # is left between the two is decoding, preprocessing and the pyfunc's own work
        chunks = [torch.randn(len(c), 3, args.image_size, args.image_size, device=device)
                  for c in (range(s, min(s + MAX_BATCH, n)) for s in range(0, n, MAX_BATCH))]
        if amp:
            chunks = [c.to(memory_format=torch.channels_last) for c in chunks]

        @torch.inference_mode()
        def infer_bare():
            model.eval()
            for c in chunks:
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    model(c).float().softmax(1).cpu()

        train_bare()  # warm-up: allocator, kernels, first-touch, the decoding threads
        train_tensor()
        infer_pyfunc()
        rows = []
        for rep in range(args.repeats):  # interleaved, best of the repeats: the machine may be shared
            rows.append({"rep": rep, "train_bare": timed(train_bare, n), "train_pil": timed(train_pil, n),
                         "train_tensor": timed(train_tensor, n)})
        if not amp:  # as served: the pyfunc loads a contiguous model on a CPU (Module.to changes it in place)
            model.to(memory_format=torch.contiguous_format)
        for rep in range(args.repeats):
            rows[rep]["infer_bare"] = timed(infer_bare, n)
            rows[rep]["infer_pyfunc"] = timed(infer_pyfunc, n)
    best = {k: max(r[k] for r in rows) for k in rows[0] if k != "rep"}
    table = [  # what, img/s, the bare loop it is compared with, target ratio (on this kind of device)
        ("train bare AMP loop", best["train_bare"], best["train_bare"], None),
        ("train project, PIL", best["train_pil"], best["train_bare"], 0.9 if device.type == "cpu" else 0.8),
        ("train project, tensor", best["train_tensor"], best["train_bare"], 0.9 if device.type == "cpu" else 0.8),
        ("infer bare forward", best["infer_bare"], best["infer_bare"], None),
        ("infer pyfunc, batched", best["infer_pyfunc"], best["infer_bare"], 0.9 if device.type == "cpu" else 0.8),
    ]
    print(f"\n{args.arch} {args.image_size}px batch {args.batch_size}, {n} images x {args.repeats} repeats, "
          f"device {device}, threads {torch.get_num_threads()}, workers {args.workers}; "
          f"tensor cache built in {build_s:.1f} s")
    print(f"{'what':<24}{'img/s':>10}{'ratio':>8}{'target':>8}")
    for name, v, bare, target in table:
        print(f"{name:<24}{v:>10.1f}{v / bare:>8.2f}{'' if target is None else f'{target:.2f}':>8}")
    out = ROOT / "bench" / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "device": str(device), "cache_build_s": build_s, "runs": rows, "best": best,
              "ratios": {name: v / bare for name, v, bare, _ in table},
              "table": [{"what": name, "img_s": v, "ratio": v / bare} for name, v, bare, _ in table]}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes (the train step's default)")
    p.add_argument("--levers", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="measure the fine-tuning levers instead, with these trainable_blocks values (0 = all)")
    p.add_argument("--no_compile", dest="compile", action="store_false",
                   help="--levers without the torch.compile row (its compilation takes minutes on a CPU)")
    p.add_argument("--start_size", type=int, default=0,
                   help="--levers: also progressive resizing from this size (train's start_size) over --epochs epochs")
    p.add_argument("--epochs", type=int, default=8, help="--levers --start_size: the schedule's epochs")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
