"""Test data: a small FINISHED split run made in-process, without the ingest and split steps.

make_split_run(tmp_path) draws generated bins (bincounter.synthetic) as JPEGs under tmp_path, builds the
manifest (bincounter.manifest.COLUMNS), splits it stratified 60/20/20 and logs it the way steps/split.py
does: tag bincounter.step=split, param classes, artifacts splits/{train,val,test}.csv.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import mlflow
import pandas as pd

from bincounter.manifest import COLUMNS, stratified_split, write_csv
from bincounter.synthetic import draw_bin


def make_manifest(directory: Path, n: int = 60, size: int = 64, classes=(1, 2, 3, 4, 5), seed: int = 0,
                  name: str = "img{i:05d}") -> pd.DataFrame:
    """n generated bin photos (counts cycling through `classes`) as JPEGs in `directory` -> manifest rows.
    `name` makes each image id (and file name) from i (0..n-1), its count and k (its number within that count)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        count = classes[i % len(classes)]
        buf = io.BytesIO()
        draw_bin(count, seed * 100_000 + i, size).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        image_id = name.format(i=i, count=count, k=i // len(classes))
        path = directory / f"{image_id}.jpg"
        path.write_bytes(data)
        rows.append({"image_id": image_id, "count": count, "path": str(path),
                     "sha256": hashlib.sha256(data).hexdigest(), "width": size, "height": size,
                     "source": "synthetic"})
    return pd.DataFrame(rows, columns=COLUMNS)


def make_split_run(tmp_path: Path, n: int = 60, size: int = 64, classes=(1, 2, 3, 4, 5)) -> str:
    """Log a FINISHED split run (in the current experiment) over n generated images -> its run id."""
    df = make_manifest(Path(tmp_path) / "images", n, size, tuple(classes))
    splits = stratified_split(df, (0.6, 0.2, 0.2), seed=42)
    out = Path(tmp_path) / "splits"
    for name, part in splits.items():
        write_csv(part, out / f"{name}.csv")
    with mlflow.start_run(run_name="split (test data)", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tag("bincounter.step", "split")
        mlflow.log_params({"classes": ",".join(str(c) for c in classes), "train_frac": 0.6, "val_frac": 0.2,
                           "test_frac": 0.2, "seed": 42})
        mlflow.log_artifacts(str(out), "splits")
        for name, part in splits.items():
            mlflow.log_metric(f"{name}_size", len(part))
    return run.info.run_id
