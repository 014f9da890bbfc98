"""The manifest: the table of verified, cached images that steps pass along as `manifest.csv`.

Columns: image_id (text, as the bucket names it), count, path (cached image on local disk), sha256 (of the
original object), width, height (of the original), source (where the bin came from: a local folder's name such as
`abid-more`, or the object's URI: `s3://<bucket>/bin-images/<id>.jpg`, `synthetic://seed=<seed>/bin-images/<id>`),
count_from (`metadata`: the count is the metadata's EXPECTED_QUANTITY; `labels`: the item list's count, from
labels.csv, file_list.json, a folder per count, a CSV or the generator; `recount`: a person's recount, from a
filled recount sheet), original (the photo as it was found: `3/IMG_0042.JPG` relative to a folder or a CSV's folder,
`bin-images/7.PNG`, a recount sheet's path or URI; empty for the bucket and the generator), recounted_on (the date
of a recount, `2024-05-31`; empty for other bins). Manifests made before count_from, original or recounted_on
existed lack them; they still read.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pandas as pd

REQUIRED = ["image_id", "count", "path", "sha256", "width", "height", "source"]  # what every manifest has
COLUMNS = [*REQUIRED, "count_from", "original", "recounted_on"]
REJECT_COLUMNS = ["image_id", "reason", "detail"]
SPLITS = ("train", "val", "test")  # a split run's parts, each logged as split_artifact(part)


def split_artifact(split: str) -> str:
    """A split run's artifact path of one part: `splits/<split>.csv`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return f"splits/{split}.csv"


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.
    `fsync=False` skips forcing the data to disk: still all-or-nothing when the process is killed, not after a
    power cut; for files checked when they are read (the ingest cache verifies each file's sha256)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
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
    df = pd.read_csv(path, dtype={"image_id": str, "sha256": str, "path": str, "source": str, "count_from": str,
                                  "original": str, "recounted_on": str})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {path}: missing columns {missing}")
    df["count"] = df["count"].astype(int)
    return df


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame(columns=COLUMNS)


def from_rows(rows: list[dict]) -> pd.DataFrame:
    """Manifest rows (dicts; a row may lack the optional columns) -> the manifest, COLUMNS, its optional text
    columns typed as read_manifest reads them back (text, missing where empty; also where no row has one)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("count_from", "original", "recounted_on"):
        df[c] = pd.Series(df[c].tolist(), index=df.index, dtype=str)
    return df


def check_fractions(train: float, val: float, test: float) -> None:
    """Each fraction in [0, 1], train and test above 0, summing to 1; else ValueError saying which."""
    for name, f in (("train_frac", train), ("val_frac", val), ("test_frac", test)):
        if not 0 <= f <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {f}")
    if train <= 0 or test <= 0:
        raise ValueError(f"train_frac and test_frac must be above 0, got {train} and {test}")
    total = train + val + test
    if abs(total - 1) > 1e-6:
        raise ValueError(f"train_frac + val_frac + test_frac must be 1, got {train} + {val} + {test} = {total:g}")


def source_group(source: str) -> str:
    """A manifest row's `source` -> the collection the bin came from: `s3://<bucket>/bin-images/<id>.jpg` ->
    `s3://<bucket>`, `synthetic://seed=3/bin-images/<id>` -> `synthetic://seed=3`, a folder name as it is (and
    the `<folder>/bin-images/<id>.jpg` paths of manifests made before local sources were named -> `<folder>`)."""
    head, sep, _ = str(source).rpartition("/bin-images/")
    return head if sep else str(source)


def source_groups(df: pd.DataFrame) -> pd.Series:
    """source_group of every row ("" where a table has no source)."""
    if "source" not in df.columns:
        return pd.Series("", index=df.index)
    return df["source"].fillna("").map(source_group)


def metric_key(name: str) -> str:
    """A source's name as it goes into metric names (`ingested_<key>`, `test_size_<key>`): `abid-more` stays,
    `s3://aft-vbi-pds` -> `s3_aft-vbi-pds`; every run of characters other than letters, digits, `_` and `-`
    becomes `_` (the rule evaluate's per-source prefixes follow)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "unknown"


def stratified_split(df: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> dict[str, pd.DataFrame]:
    """Split rows per (count, source) in the given train/val/test fractions (seeded) -> {"train", "val", "test"}.
    Each source (source_group) keeps its share of every count in every split, within a row per group; with one
    source this is the split per count alone. A group too small for a row in val or test goes to train.
    Within each group the rows are sorted by image_id first, so the result depends on the rows, not their order."""
    import numpy as np

    check_fractions(*fractions)
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    df = df.sort_values("image_id")
    # groups in (count, source) order: with one source the permutations are drawn exactly as by count alone
    for _, group in df.groupby([df["count"], source_groups(df)], sort=True):
        idx = rng.permutation(len(group))
        n_val = int(round(len(group) * fractions[1]))
        n_test = int(round(len(group) * fractions[2]))
        n_train = len(group) - n_val - n_test
        parts["train"].append(group.iloc[idx[:n_train]])
        parts["val"].append(group.iloc[idx[n_train:n_train + n_val]])
        parts["test"].append(group.iloc[idx[n_train + n_val:]])
    return {k: (pd.concat(v).sort_values("image_id").reset_index(drop=True) if v else empty_manifest())
            for k, v in parts.items()}


def source_table(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """{split: manifest} -> one row per (source, count): source, count, then how many bins each split has and
    their total; sorted by source and count."""
    table = pd.concat({k: pd.DataFrame({"source": source_groups(v), "count": v["count"]}) for k, v in splits.items()},
                      names=["split", None]).reset_index(level="split")
    out = table.groupby(["source", "count", "split"]).size().unstack("split", fill_value=0)
    out = out.reindex(columns=list(splits), fill_value=0)
    out["total"] = out.sum(axis=1)
    return out.reset_index().rename_axis(columns=None)


def keep_test(df: pd.DataFrame, old_test: pd.DataFrame, train_frac: float, val_frac: float,
              seed: int) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """A manifest and an earlier split's test part -> ({train, val, test}, the ids of the old test bins the manifest
    lacks). test: exactly the old test bins, each the manifest's row where it has one (its label may be a
    recount), else the old row; train and val: every other bin of the manifest, stratified by count and source
    (as stratified_split) in the ratio train_frac:val_frac."""
    if old_test.empty:
        raise ValueError("keep_test_of: that split run's test part is empty: nothing to keep")
    kept = set(old_test["image_id"])
    missing = sorted(kept - set(df["image_id"]))
    test = pd.concat([df[df["image_id"].isin(kept)], old_test[old_test["image_id"].isin(missing)]],
                     ignore_index=True).sort_values("image_id", ignore_index=True)
    rest = df[~df["image_id"].isin(kept)]
    if val_frac > 0 and not rest.empty:  # stratified_split's "test" share is the val part here
        share = val_frac / (train_frac + val_frac)
        parts = stratified_split(rest, (1 - share, 0, share), seed)
        train, val = parts["train"], parts["test"]
    else:
        train, val = rest.sort_values("image_id", ignore_index=True), empty_manifest()
    return {"train": train, "val": val, "test": test}, missing
