"""The CUDA path end to end on a GPU machine: train_run with mixed precision and channels_last on generated
bins, the model logged as the pyfunc and loaded back on the CPU, predictions equal between the two.

    MLFLOW_TRACKING_URI=file:///tmp/mlruns python bench/cuda_smoke.py
"""
from __future__ import annotations

import io
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
from bincounter.serving import BinCounter  # noqa: E402
from bincounter.training import TrainConfig, train_run  # noqa: E402
from steps.train import log_trained_model  # noqa: E402


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
        print("cuda smoke OK, run", run.info.run_id)


if __name__ == "__main__":
    main()
