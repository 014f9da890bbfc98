"""ABID metadata, file lists and label indexes.

Image ids are strings exactly as the bucket names them: `00523` and `523` are different images.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path, PurePosixPath

BUCKET = "aft-vbi-pds"
IMAGE_PREFIX = "bin-images/"
METADATA_PREFIX = "metadata/"

# The natural mix of counts 1-5 in ABID: images per EXPECTED_QUANTITY in the 407,648-image label index
# `../shared/abid-labels/expected_quantity.csv` (every row counted once, counts 0 and 6+ left out), as
# `collections.Counter(read_label_index(path).values())`; tests/test_priors.py recounts the file when it is there.
# NATURAL_MIX is these counts over their sum (351,066): about 11.7 / 21.9 / 25.7 / 22.9 / 17.8 %. It is the
# `natural` target mix of the prior correction (priors.resolve_mix).
NATURAL_COUNTS = {1: 41_147, 2: 76_863, 3: 90_058, 4: 80_550, 5: 62_448}
NATURAL_MIX = {c: n / sum(NATURAL_COUNTS.values()) for c, n in NATURAL_COUNTS.items()}


class MetadataError(ValueError):
    """Metadata that cannot be read or has no usable EXPECTED_QUANTITY."""


def image_key(image_id: str) -> str:
    return f"{IMAGE_PREFIX}{image_id}.jpg"


def metadata_key(image_id: str) -> str:
    return f"{METADATA_PREFIX}{image_id}.json"


def id_from_key(key: str) -> str:
    """`metadata/00123.json`, `data/metadata/523.json` or `bin-images/7.jpg` -> the id (its stem, as written)."""
    stem = PurePosixPath(str(key).strip()).stem
    if not stem:
        raise ValueError(f"cannot take an image id from {key!r}")
    return stem


def parse_metadata(raw: bytes | str, source: str = "metadata") -> int:
    """ABID metadata JSON -> EXPECTED_QUANTITY (a non-negative int). Raises MetadataError naming `source`."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError(f"{source}: malformed JSON ({e})") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    if "EXPECTED_QUANTITY" not in doc:
        raise MetadataError(f"{source}: no EXPECTED_QUANTITY field")
    return quantity(doc["EXPECTED_QUANTITY"], f"{source}: EXPECTED_QUANTITY")


def quantity(value, where: str) -> int:
    """An expected quantity, as a JSON value or a CSV cell (text) -> a non-negative int. The one rule for
    metadata and label CSVs alike; raises MetadataError `<where> is blank | is 'abc', not a whole number |
    is negative (-2)`."""
    q = value
    if isinstance(value, str):
        if not value.strip():
            raise MetadataError(f"{where} is blank")
        try:
            q = float(value)
        except ValueError:
            raise MetadataError(f"{where} is {value!r}, not a whole number") from None
    # bool is an int subclass; a float like 3.0 is accepted, 3.5, NaN or inf is not
    if isinstance(q, bool) or not isinstance(q, (int, float)) or (isinstance(q, float) and not (math.isfinite(q) and q == int(q))):
        raise MetadataError(f"{where} is {value!r}, not a whole number")
    if q < 0:
        raise MetadataError(f"{where} is negative ({value})")
    return int(q)


def read_file_list(path: str | Path) -> dict[str, int]:
    """A file_list.json (`{"3": ["metadata/00123.json", ...]}`, also the reference capstone's
    `data/metadata/...` form) -> {image_id: count from its key}. An id listed under two counts is an error."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"file list {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"file list {path}: malformed JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"file list {path}: expected an object of count -> list of metadata keys")
    out: dict[str, int] = {}
    for k, keys in doc.items():
        try:
            count = int(k)
        except ValueError:
            raise ValueError(f"file list {path}: key {k!r} is not a count") from None
        if not isinstance(keys, list):
            raise ValueError(f"file list {path}: entry {k!r} is not a list")
        for key in keys:
            image_id = id_from_key(key)
            if out.get(image_id, count) != count:
                raise ValueError(f"file list {path}: image {image_id} is listed under counts {out[image_id]} and {count}")
            out[image_id] = count
    return out


def write_file_list(selection: dict[int, list[str]], path: str | Path) -> None:
    """{count: [image_id, ...]} -> file_list.json with metadata keys, counts ascending, ids in given order."""
    doc = {str(c): [metadata_key(i) for i in selection[c]] for c in sorted(selection)}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def read_label_index(path: str | Path) -> dict[str, int]:
    """CSV with `image_id` and `expected_quantity` (or `count`) columns -> {image_id: count}; ids kept as text."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        col = "expected_quantity" if "expected_quantity" in cols else "count" if "count" in cols else None
        if "image_id" not in cols or col is None:
            raise ValueError(f"label index {path}: needs columns image_id and expected_quantity (has {cols})")
        out = {}
        for n, row in enumerate(reader, start=2):
            try:
                out[row["image_id"].strip()] = int(row[col])
            except (TypeError, ValueError):
                raise ValueError(f"label index {path} line {n}: count {row[col]!r} is not a whole number") from None
    return out


def select_subset(labels: dict[str, int], per_count: dict[int, int], seed: int) -> dict[int, list[str]]:
    """Choose, for each count, up to per_count[count] ids at random (seeded) from {image_id: count}.
    Ids come out sorted within each count so that the file is stable and diffs are readable."""
    import random

    rng = random.Random(seed)
    by_count: dict[int, list[str]] = {c: [] for c in per_count}
    for image_id, c in sorted(labels.items()):
        if c in by_count:
            by_count[c].append(image_id)
    out = {}
    for c, n in per_count.items():
        pool = by_count[c]
        out[c] = sorted(rng.sample(pool, min(n, len(pool))))
    return out
