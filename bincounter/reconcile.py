"""The inventory check: does each bin hold the quantity the inventory record expects?

For every bin with both a photo and an expected quantity: the predicted count, and `p_expected`, the model's
probability of the expected quantity. A bin is flagged when p_expected < threshold: the photo makes the record
unlikely, someone should look. Expected quantities come from ABID metadata (`<id>.json` with EXPECTED_QUANTITY)
or a CSV `image_id,expected_quantity`, under one rule (`read_expected`). Every bin gets a status (STATUSES):
a quantity the model has no class for is `outside_model_range` (not judged, not flagged, out of the agreement
rate); photos without an expected quantity, expectations without a photo, unreadable photos and bad metadata
are reported per bin, never fatal.

The library for other front ends (the CLI, batch scoring): `read_expected` (optionally for given ids), `check`
(a predictions table -> the per-bin table), `reconcile` (photos -> the per-bin table, through
predict.predict_bins), `summary`, `problems` (console lines). The HTML report and the MLflow run of a check are
bincounter.report's.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from bincounter import abid
from bincounter.predict import Predictor, predict_bins

STATUSES = ("checked", "outside_model_range", "no_expected_quantity", "no_image", "unreadable", "bad_metadata")
COLUMNS = ["image_id", "path", "expected_quantity", "predicted", "confidence", "p_expected", "flagged", "status",
           "error"]


def read_expected(path: str | Path, image_ids=None) -> tuple[dict[str, int], dict[str, str]]:
    """A folder of ABID `<id>.json` metadata or a CSV `image_id,expected_quantity` (or `count`) -> ({id: quantity},
    {id: why its expected quantity is unusable}). One rule for both (abid.quantity): a blank, negative or
    non-whole value is a problem of its bin, never of the whole file. `image_ids`: only these bins (a folder is
    then not listed: one file is opened per id)."""
    path = Path(path)
    wanted = None if image_ids is None else set(image_ids)
    if path.is_dir():
        expected, problems = {}, {}
        files = sorted(path.glob("*.json")) if wanted is None else [path / f"{i}.json" for i in sorted(wanted)]
        for f in files:
            try:
                expected[f.stem] = abid.parse_metadata(f.read_bytes(), f.name)
            except FileNotFoundError:
                continue  # a wanted bin without metadata: no expected quantity
            except OSError as e:
                problems[f.stem] = f"{f.name}: cannot read ({e.strerror or e})"
            except abid.MetadataError as e:
                problems[f.stem] = str(e)
        return expected, problems
    if path.is_file():
        return _read_csv(path, wanted)
    raise FileNotFoundError(f"expected quantities: {path} is neither a metadata folder nor a CSV file")


def _read_csv(path: Path, wanted: set | None) -> tuple[dict[str, int], dict[str, str]]:
    """The CSV half of read_expected. Only a file that is not a CSV of these columns is an error as a whole."""
    expected, problems = {}, {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets start with a BOM
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            col = "expected_quantity" if "expected_quantity" in cols else "count" if "count" in cols else None
            if "image_id" not in cols or col is None:
                raise ValueError(f"expected quantities {path}: needs columns image_id and expected_quantity "
                                 f"(has {cols})")
            for n, row in enumerate(reader, start=2):
                image_id = (row["image_id"] or "").strip()
                if not image_id:  # a problem without a bin: reported under its line
                    problems[f"line {n}"] = f"{path.name} line {n}: no image_id"
                    continue
                if wanted is not None and image_id not in wanted:
                    continue
                try:
                    q = abid.quantity(row[col] or "", f"{path.name} line {n}: {col}")
                except abid.MetadataError as e:
                    problems[image_id] = str(e)
                    continue
                if expected.get(image_id, q) != q:
                    problems[image_id] = f"{path.name} line {n}: {image_id} is listed again, with {q} after {expected[image_id]}"
                elif image_id not in problems:
                    expected[image_id] = q
    except UnicodeDecodeError as e:
        raise ValueError(f"expected quantities {path}: not a UTF-8 text file ({e})") from None
    for image_id in problems:
        expected.pop(image_id, None)
    return expected, problems


def reconcile(images: list[Path], expected: dict[str, int], bad_metadata: dict[str, str], predictor: Predictor,
              threshold: float) -> pd.DataFrame:
    """Photos, expectations and a model -> the per-bin table (see `check`). Only photos with an expected quantity
    go to the model."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    return check(predict_bins(images, expected, predictor), expected, bad_metadata, threshold)


def check(preds: pd.DataFrame, expected: dict[str, int], bad_metadata: dict[str, str], threshold: float) -> pd.DataFrame:
    """The inventory check of a predictions table -> one row per bin id (photo or record), COLUMNS.

    `preds`: one row per photo, with image_id, path (optional), count, confidence, p_<c> per class and error
    (null where the photo was read); rows of photos that were not sent to the model may leave the rest empty.
    status: checked | outside_model_range (expected quantity not among the p_<c> classes) | no_expected_quantity
    | no_image | unreadable | bad_metadata; flagged only when checked and p_expected < threshold."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    dup = preds["image_id"][preds["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"two photos of bin {dup.iloc[0]}")
    rows = []
    for r in preds.to_dict("records"):
        i, error = r["image_id"], r.get("error")
        row = {"image_id": i, "path": r.get("path"), "flagged": False}
        if i not in expected:
            status, err = ("bad_metadata", bad_metadata[i]) if i in bad_metadata else ("no_expected_quantity", None)
            rows.append({**row, "status": status, "error": err})
            continue
        q = expected[i]
        row.update(expected_quantity=q)
        if isinstance(error, str):
            rows.append({**row, "status": "unreadable", "error": error})
            continue
        row.update(predicted=r["count"], confidence=r["confidence"], **{k: v for k, v in r.items() if k.startswith("p_")})
        if f"p_{q}" not in r:  # the model has no class for q: it cannot judge this bin
            rows.append({**row, "status": "outside_model_range",
                         "error": f"expected quantity {q} is not one of the model's counts"})
            continue
        p_exp = float(r[f"p_{q}"])
        rows.append({**row, "p_expected": p_exp, "flagged": p_exp < threshold, "status": "checked"})
    photos = set(preds["image_id"])
    for i in sorted(set(expected) - photos):
        rows.append({"image_id": i, "expected_quantity": expected[i], "status": "no_image", "flagged": False})
    for i in sorted(set(bad_metadata) - photos):
        rows.append({"image_id": i, "status": "bad_metadata", "error": bad_metadata[i], "flagged": False})
    dist = sorted((c for c in preds.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    out = pd.DataFrame(rows, columns=[*COLUMNS, *dist])  # the count distribution last: the report draws it
    for c in ("expected_quantity", "predicted"):
        out[c] = out[c].astype("Float64").astype("Int64")
    for c in ("confidence", "p_expected"):
        out[c] = out[c].astype("float64")
    out["flagged"] = out["flagged"].astype(bool)
    return out


def summary(df: pd.DataFrame, threshold: float) -> dict:
    """Counts per status, flagged bins and the agreement rate (predicted == expected) among checked bins (NaN
    when none was checked)."""
    checked = df[df["status"] == "checked"]
    agree = (checked["predicted"] == checked["expected_quantity"]).sum()
    out = {"bins_checked": len(checked), "bins_flagged": int(checked["flagged"].sum()),
           "agreement_rate": float(agree / len(checked)) if len(checked) else float("nan"),
           "threshold": threshold}
    for status in STATUSES[1:]:
        out[status] = int((df["status"] == status).sum())
    return out


def problems(df: pd.DataFrame, limit: int = 5) -> list[str]:
    """Console lines for the bins that could not be checked (unreadable, bad_metadata, outside_model_range):
    the first `limit` of each status with their reasons, then how many more."""
    lines = []
    for status in ("unreadable", "bad_metadata", "outside_model_range"):
        part = df[df["status"] == status]
        for r in part.head(limit).itertuples():
            lines.append(f"{status} {r.image_id}: {r.error}")
        if len(part) > limit:
            lines.append(f"{status}: and {len(part) - limit} more (all in the --output table)")
    return lines
