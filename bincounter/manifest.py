"""The manifest: the table of verified, cached images that steps pass along as `manifest.csv`.

Columns: image_id (text, as the bucket names it), count, path (cached image on local disk), sha256 (of the
original object), width, height (of the original), source.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

COLUMNS = ["image_id", "count", "path", "sha256", "width", "height", "source"]
REJECT_COLUMNS = ["image_id", "reason", "detail"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    atomic_write_bytes(path, df.to_csv(index=False).encode())
    return Path(path)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """manifest.csv (or a split CSV) -> DataFrame with image_id kept as text. Raises on missing columns."""
    df = pd.read_csv(path, dtype={"image_id": str, "sha256": str, "path": str, "source": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {path}: missing columns {missing}")
    df["count"] = df["count"].astype(int)
    return df


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS)


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame(columns=REJECT_COLUMNS)
