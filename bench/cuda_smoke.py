"""The CUDA path end to end on a GPU machine: train_run with mixed precision and channels_last on generated
bins, the model logged as the pyfunc and loaded back on the CPU, predictions equal between the two; the tensor
cache's batch augmentation on CUDA equal to its CPU kernels for the same draws, and an epoch trained from it.

    MLFLOW_TRACKING_URI=file:///tmp/mlruns python bench/cuda_smoke.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers_data import make_manifest  # noqa: E402

from bincounter.manifest import stratified_split  # noqa: E402
from bincounter.model import build_model, get_arch  # noqa: E402
from bincounter.tensor_cache import DeviceAugment, TrainBatches, open_cache  # noqa: E402
from bincounter.serving import BinCounter  # noqa: E402
from bincounter.levers import CountLoss, make_optimizer  # noqa: E402
from bincounter.train_config import TrainConfig  # noqa: E402
from bincounter.train_log import log_trained_model  # noqa: E402
from bincounter.training import train_one_epoch, train_run  # noqa: E402


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0), torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        df = make_manifest(Path(tmp) / "img", n=400, size=128)
        parts = stratified_split(df, (0.6, 0.2, 0.2), seed=0)
        cfg = TrainConfig(arch="resnet50", weights="none", image_size=128, epochs=3, batch_size=64, workers=4)
        mlflow.set_experiment("cuda-smoke")
        with mlflow.start_run() as run:
            start = time.perf_counter()
            result = train_run(cfg, parts["train"], parts["val"])
            print(f"train_run on CUDA: {time.perf_counter() - start:.1f} s, history:")
            for row in result["history"]:
                print("  ", {k: round(v, 4) for k, v in row.items()})
            info = log_trained_model(result, cfg, parts["val"]["path"].iloc[0])
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)  # weights saved from CUDA, loaded on CPU
        images = [Path(p).read_bytes() for p in parts["test"]["path"]]
        served = pyfunc.predict(pd.DataFrame({"image": images}))
        gpu = BinCounter(result["model"].cuda(), {"arch": cfg.arch, "classes": cfg.classes, "image_size": cfg.image_size})
        probs, errors = gpu.probabilities(images)
        assert not any(errors)
        diff = abs(served[[f"p_{c}" for c in cfg.classes]].to_numpy() - probs).max()
        print(f"pyfunc (CPU) vs CUDA probabilities: max abs diff {diff:.2e}; "
              f"same counts: {(served['count'].to_numpy() == gpu.table(probs)['count'].to_numpy()).mean():.3f}")
        assert diff < 1e-3, diff
        tensor_path(cfg, parts["train"], Path(tmp) / "tensors")
        print("cuda smoke OK, run", run.info.run_id)


def tensor_path(cfg: TrainConfig, train, cache_dir: Path) -> None:
    """Batch augmentation on CUDA against the same kernels on the CPU, then one epoch from the tensor cache."""
    norm = (get_arch(cfg.arch).mean, get_arch(cfg.arch).std)
    cache = open_cache(train, cfg.image_size, cache_dir)
    aug = DeviceAugment(cfg.image_size, "strong", *norm)
    torch.manual_seed(0)
    params = aug.draw(64)
    x = cache.batch(range(min(64, len(train))))
    diff = (aug.apply(x.cuda(), params[:len(x)]).cpu() - aug.apply(x, params[:len(x)])).abs()
    print(f"tensor path: CUDA vs CPU augmentation, mean abs diff {diff.mean():.2e}, "
          f"share over 0.01: {(diff > 0.01).float().mean():.2e}")
    assert diff.mean() < 1e-3 and (diff > 0.01).float().mean() < 1e-3
    device = torch.device("cuda")
    model = build_model(cfg.arch, len(cfg.classes), "none").to(device, memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda")
    batches = TrainBatches(cache, train["count"], cfg.classes, cfg.batch_size, seed=0, device=device, mean=norm[0], std=norm[1])
    start = time.perf_counter()
    tr = train_one_epoch(model, batches, CountLoss(cfg.classes).to(device), make_optimizer(cfg, model), scaler, device)
    print(f"tensor path: one epoch of {len(train)} images in {time.perf_counter() - start:.1f} s, {tr}")
    assert tr["loss"] == tr["loss"]  # finite (train_one_epoch raises on inf)


if __name__ == "__main__":
    main()
