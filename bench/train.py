"""Training and inference throughput of the project's code against bare loops on the same model.

Training: the train step's loop (JPEGs from a cache on disk, TrainPreset augmentation, DataLoader workers,
forward, backward, step: bincounter.training.train_one_epoch) against a bare loop over in-memory random
tensors (the compute limit). Inference: the logged pyfunc on JPEG bytes against a bare `model(x)` forward.
Same arch, batch size, image size and threads in one run. Prints a table and writes bench/results/train.json.

    python bench/train.py --arch resnet50 --image_size 128 --batch_size 16 --steps 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincounter import synthetic  # noqa: E402
from bincounter.data import ManifestDataset, make_loader  # noqa: E402
from bincounter.model import build_model  # noqa: E402
from bincounter.training import make_optimizer, setup_device, train_one_epoch, TrainConfig  # noqa: E402
from bincounter.transforms import TrainPreset  # noqa: E402


def make_cache(d: Path, n: int, size: int = 256) -> pd.DataFrame:
    """n generated bins as JPEGs at the ingest cache's size -> a manifest-like frame."""
    rows = []
    for i, (image_id, count) in enumerate(synthetic.synthetic_items(n, 1, 5, seed=0)):
        path = d / f"{image_id}.jpg"
        synthetic.draw_bin(count, synthetic.item_seed(0, i), size).save(path, quality=90)
        rows.append({"image_id": image_id, "count": count, "path": str(path)})
    return pd.DataFrame(rows)


def timed(fn, images: int) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main(args):
    device = setup_device()
    torch.manual_seed(0)
    model = build_model(args.arch, 5, "none").to(device)
    cfg = TrainConfig(arch=args.arch, weights="none", lr=1e-3, batch_size=args.batch_size)
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    n = args.batch_size * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        df = make_cache(Path(tmp), n)
        ds = ManifestDataset(df, [1, 2, 3, 4, 5], TrainPreset(args.image_size))

        def project_train():
            loader = make_loader(ds, args.batch_size, args.workers, shuffle=True, seed=0,
                                 pin_memory=device.type == "cuda")
            train_one_epoch(model, loader, loss_fn, opt, scaler, device)

        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 5, (args.batch_size,), device=device)
        amp = device.type == "cuda"
        if amp:
            x = x.to(memory_format=torch.channels_last)

        def bare_train():
            model.train()
            for _ in range(args.steps):
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

        # inference: the pyfunc's own code path (BinCounter: decode, EvalPreset, forward) on JPEG bytes
        from bincounter.serving import BinCounter
        counter = BinCounter(model, {"arch": args.arch, "classes": [1, 2, 3, 4, 5], "image_size": args.image_size})
        jpegs = [Path(p).read_bytes() for p in df["path"]]

        def project_infer():
            counter.probabilities(jpegs)

        @torch.inference_mode()
        def bare_infer():
            model.eval()
            for _ in range(args.steps):
                model(x)

        bare_train()  # warm-up: allocator, kernels, first-touch
        rows = []
        for rep in range(args.repeats):
            rows.append({"rep": rep, "train_bare": timed(bare_train, n), "train_project": timed(project_train, n)})
        model.eval()
        bare_infer()
        for rep in range(args.repeats):
            rows[rep]["infer_bare"] = timed(bare_infer, n)
            rows[rep]["infer_pyfunc"] = timed(project_infer, n)
    best = {k: max(r[k] for r in rows) for k in rows[0] if k != "rep"}
    table = [
        ("training (img/s)", best["train_project"], best["train_bare"], best["train_project"] / best["train_bare"], 0.9),
        ("inference (img/s)", best["infer_pyfunc"], best["infer_bare"], best["infer_pyfunc"] / best["infer_bare"], 0.85),
    ]
    print(f"\n{args.arch} {args.image_size}px batch {args.batch_size}, {n} images x {args.repeats} repeats, "
          f"device {device}, threads {torch.get_num_threads()}, workers {args.workers}")
    print(f"{'what':<20}{'project':>10}{'bare':>10}{'ratio':>8}{'target':>8}")
    for name, p, b, r, t in table:
        print(f"{name:<20}{p:>10.1f}{b:>10.1f}{r:>8.2f}{t:>8.2f}")
    out = ROOT / "bench" / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": str(device), "runs": rows, "best": best}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes (the train step's default)")
    main(p.parse_args())
