"""Test data: a small FINISHED split run made in-process, without the ingest and split steps; folders in the
bucket's layout.

make_split_run(tmp_path) draws generated bins (bincounter.synthetic) as JPEGs under tmp_path, builds the
manifest (bincounter.manifest.COLUMNS), splits it stratified 60/20/20 and logs it the way steps/split.py
does: tag bincounter.step=split, param classes, artifacts splits/{train,val,test}.csv.
make_abid_folder(root, ...) writes generated bins as `bin-images/<id>.jpg` with `metadata/<id>.json` and a
`labels.csv` for the ids asked, as ../shared/abid-* are laid out (a source=local data_dir).
"""
from __future__ import annotations

import hashlib
import io
import json
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
                     "source": "synthetic", "count_from": "labels"})
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


def make_abid_folder(root: Path, bins: dict[str, int], metadata: dict[str, int] | None = None,
                     labels: dict[str, int] | None = None, seed: int = 0, size: int = 48) -> Path:
    """A folder in the bucket's layout: `bin-images/<id>.jpg` for each of `bins` ({image_id: count drawn}),
    `metadata/<id>.json` with EXPECTED_QUANTITY for each of `metadata` ({image_id: count}) and a `labels.csv`
    (image_id,count) of `labels` when given. `seed` makes the photos: two folders with different seeds hold
    different photos under the same id. -> root"""
    (root / "bin-images").mkdir(parents=True, exist_ok=True)
    for n, (image_id, count) in enumerate(sorted(bins.items())):
        buf = io.BytesIO()
        draw_bin(count, seed * 100_000 + n, size).save(buf, format="JPEG", quality=90)
        (root / "bin-images" / f"{image_id}.jpg").write_bytes(buf.getvalue())
    for image_id, count in (metadata or {}).items():
        (root / "metadata").mkdir(exist_ok=True)
        doc = {"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}
        (root / "metadata" / f"{image_id}.json").write_text(json.dumps(doc))
    if labels is not None:
        (root / "labels.csv").write_text("image_id,count\n" + "".join(f"{i},{c}\n" for i, c in sorted(labels.items())))
    return root
