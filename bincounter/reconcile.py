"""The inventory check: does each bin hold the quantity the inventory record expects?

For every bin with both a photo and an expected quantity: the predicted count, and `p_expected`, the model's
probability of the expected quantity. A bin is flagged when p_expected < threshold: the photo makes the record
unlikely, someone should look. Expected quantities come from ABID metadata (`<id>.json` with EXPECTED_QUANTITY)
or a CSV `image_id,expected_quantity`, under one rule (`read_expected`). Every bin gets a status (STATUSES):
a quantity the model has no class for is `outside_model_range` (not judged, not flagged, out of the agreement
rate); photos without an expected quantity, expectations without a photo, unreadable photos and bad metadata
are reported per bin, never fatal.

The library for other front ends (the CLI here, batch scoring): `read_expected` (optionally for given ids),
`check` (a predictions table -> the per-bin table), `summary`, `problems` (console lines). Also here:
`predict_files`, files -> predictions table, used by `bincounter predict` too.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd

from bincounter import abid
from bincounter.serving import BinCounter
from bincounter.transforms import decode_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
CHUNK = 256  # files read per model call: bounds memory for large folders
THUMB = 160  # px, longest side of a report thumbnail
STATUSES = ("checked", "outside_model_range", "no_expected_quantity", "no_image", "unreadable", "bad_metadata")
COLUMNS = ["image_id", "path", "expected_quantity", "predicted", "confidence", "p_expected", "flagged", "status",
           "error"]

# A predictor: (image bytes, names) -> (table with count/confidence/p_<c> per image, error or None per image)
Predictor = Callable[[list[bytes], list[str]], tuple[pd.DataFrame, list]]


def local_predictor(counter: BinCounter) -> Predictor:
    def predict(images: list[bytes], names: list[str]):
        probs, errors = counter.probabilities(images, names)
        return counter.table(probs), errors
    return predict


def find_images(paths: list[str | Path]) -> list[Path]:
    """Files as given (whatever their name) and the images (.jpg/.jpeg/.png) under folders, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)  # a missing file becomes an error row, not a crash
    return out


def predict_files(paths: list[Path], predict: Predictor) -> pd.DataFrame:
    """Image files -> one row each: image, count, confidence, p_<c>..., error (count empty where error)."""
    tables = []
    for start in range(0, len(paths), CHUNK):
        part = paths[start:start + CHUNK]
        data, read_errors = [], []
        for p in part:
            try:
                data.append(p.read_bytes())
                read_errors.append(None)
            except OSError as e:
                data.append(b"")
                read_errors.append(f"{p}: cannot read ({e.strerror or e})")
        table, errors = predict(data, [str(p) for p in part])
        table = table.reset_index(drop=True).drop(columns="error", errors="ignore")  # `errors` says it
        table = table.reindex(columns=["count", "confidence", *[c for c in table.columns if c not in ("count", "confidence")]])
        table.insert(0, "image", [str(p) for p in part])
        table["error"] = [r or e for r, e in zip(read_errors, errors)]
        table["count"] = table["count"].astype("Float64").astype("Int64").mask(table["error"].notna())
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["image", "count", "confidence", "error"])
    return pd.concat(tables, ignore_index=True)


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


def reconcile(images: list[Path], expected: dict[str, int], bad_metadata: dict[str, str], predict: Predictor,
              threshold: float) -> pd.DataFrame:
    """Photos, expectations and a model -> the per-bin table (see `check`). Only photos with an expected quantity
    go to the model."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    by_id: dict[str, Path] = {}
    for p in images:
        if p.stem in by_id:
            raise ValueError(f"two photos of bin {p.stem}: {by_id[p.stem]} and {p}")
        by_id[p.stem] = p
    both = [i for i in sorted(by_id) if i in expected]
    preds = predict_files([by_id[i] for i in both], predict).rename(columns={"image": "path"})
    preds.insert(0, "image_id", both)
    others = pd.DataFrame({"image_id": [i for i in sorted(by_id) if i not in expected]})
    others["path"] = [str(by_id[i]) for i in others["image_id"]]
    return check(pd.concat([preds, others], ignore_index=True), expected, bad_metadata, threshold)


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


def _thumbnail(path: str) -> str:
    """An image file -> a small inline JPEG (data URI); decoded with the served model's checks."""
    img = decode_image(Path(path).read_bytes(), path)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(row, classes: list[int]) -> str:
    """A bin's count distribution as a small inline SVG bar chart: the expected quantity's bar orange, the
    others grey, the predicted count's label in bold."""
    w, h, gap = 14, 40, 3
    bars = []
    for k, c in enumerate(classes):
        p = getattr(row, f"p_{c}", float("nan"))
        height = 0 if pd.isna(p) else round(float(p) * h, 1)
        x = k * (w + gap)
        colour = "#e8871e" if c == row.expected_quantity else "#999"
        weight = "bold" if c == row.predicted else "normal"
        bars.append(f"<rect x='{x}' y='{h - height}' width='{w}' height='{height}' fill='{colour}'>"
                    f"<title>p({c}) = {0 if pd.isna(p) else float(p):.2f}</title></rect>"
                    f"<text x='{x + w / 2}' y='{h + 11}' font-size='10' text-anchor='middle' "
                    f"font-weight='{weight}'>{c}</text>")
    return f"<svg width='{len(classes) * (w + gap)}' height='{h + 13}' role='img'>{''.join(bars)}</svg>"


def html_report(df: pd.DataFrame, stats: dict, model: str, promise: str = "") -> str:
    """A self-contained HTML page: the summary and what the threshold promises (`promise`), the flagged bins
    (least likely record first) with thumbnails and their count distributions, and the bins that could not be
    checked."""
    e = html.escape
    flagged = df[df["flagged"]].sort_values("p_expected")
    classes = [int(c[2:]) for c in df.columns if c.startswith("p_") and c[2:].isdigit()]
    head = "".join(f"<tr><th>{e(k)}</th><td>{v:.3f}</td></tr>" if isinstance(v, float)
                   else f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in stats.items())
    rows = "".join(
        f"<tr><td><img src='{_thumbnail(r.path)}' alt='{e(r.image_id)}'></td><td>{e(r.image_id)}</td>"
        f"<td>{r.expected_quantity}</td><td>{r.predicted}</td><td>{r.p_expected:.3f}</td>"
        f"<td>{r.confidence:.3f}</td><td>{_bars(r, classes)}</td></tr>" for r in flagged.itertuples())
    others = df[df["status"] != "checked"]
    problems = "".join(f"<tr><td>{e(r.image_id)}</td><td>{e(r.status)}</td>"
                       f"<td>{'' if pd.isna(r.error) else e(str(r.error))}</td></tr>" for r in others.itertuples())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bin inventory check</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px}}</style>
</head><body>
<h1>Bin inventory check</h1>
<p>Model: {e(model)}. {e(promise) or f"A bin is flagged when the model gives its expected quantity a probability below {stats['threshold']:g}."}</p>
<p>Flagged bins are sorted by how unlikely their record is. Bars: the model's probability of each count; orange is
the expected quantity, the bold number the predicted count.</p>
<h2>Summary</h2><table>{head}</table>
<h2>Flagged bins ({len(flagged)})</h2>
<table><tr><th>photo</th><th>bin</th><th>expected</th><th>predicted</th><th>p(expected)</th><th>confidence</th><th>counts</th></tr>
{rows}</table>
<h2>Not checked ({len(others)})</h2>
<table><tr><th>bin</th><th>status</th><th>detail</th></tr>{problems}</table>
</body></html>
"""


def log_run(df: pd.DataFrame, stats: dict, report: Path | None, params: dict) -> str:
    """A `reconcile` run in the current experiment with the parameters, summary metrics, the table and the
    report. -> run id."""
    with mlflow.start_run() as run:
        mlflow.set_tag("bincounter.step", "reconcile")
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in stats.items() if k != "threshold"})
        mlflow.log_text(df.to_csv(index=False), "reconcile.csv")
        if report is not None:
            mlflow.log_artifact(str(report))
        return run.info.run_id
