"""The inventory check: does each bin hold the quantity the inventory record expects?

For every bin with both a photo and an expected quantity: the predicted count, and `p_expected`, the model's
probability of the expected quantity (0 when that quantity is not among the model's classes). A bin is
flagged when p_expected < threshold: the photo makes the record unlikely, someone should look. Expected
quantities come from ABID metadata (`<id>.json` with EXPECTED_QUANTITY) or a CSV `image_id,expected_quantity`.
Photos without an expected quantity, expectations without a photo, unreadable photos and bad metadata are
reported with their status, never fatal.

Also here: `predict_files`, files -> predictions table, used by `bincounter predict` too.
"""
from __future__ import annotations

import base64
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
        table = table.reset_index(drop=True).reindex(columns=["count", "confidence", *[
            c for c in table.columns if c not in ("count", "confidence")]])
        table.insert(0, "image", [str(p) for p in part])
        table["error"] = [r or e for r, e in zip(read_errors, errors)]
        table["count"] = table["count"].astype("Float64").astype("Int64").mask(table["error"].notna())
        tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["image", "count", "confidence", "error"])
    return pd.concat(tables, ignore_index=True)


def read_expected(path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """A folder of ABID `<id>.json` metadata or a CSV `image_id,expected_quantity` -> ({id: quantity},
    {id: why its metadata is unusable})."""
    path = Path(path)
    if path.is_dir():
        expected, problems = {}, {}
        for f in sorted(path.glob("*.json")):
            try:
                expected[f.stem] = abid.parse_metadata(f.read_bytes(), f.name)
            except (abid.MetadataError, OSError) as e:
                problems[f.stem] = str(e)
        return expected, problems
    if path.is_file():
        return abid.read_label_index(path), {}
    raise FileNotFoundError(f"expected quantities: {path} is neither a metadata folder nor a CSV file")


def reconcile(images: list[Path], expected: dict[str, int], bad_metadata: dict[str, str], predict: Predictor,
              threshold: float) -> pd.DataFrame:
    """-> one row per bin id (photo or record): image_id, path, expected_quantity, predicted, confidence,
    p_expected, flagged, status (checked | no_expected_quantity | no_image | unreadable | bad_metadata), error."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    by_id: dict[str, Path] = {}
    for p in images:
        if p.stem in by_id:
            raise ValueError(f"two photos of bin {p.stem}: {by_id[p.stem]} and {p}")
        by_id[p.stem] = p
    both = [i for i in sorted(by_id) if i in expected]
    preds = predict_files([by_id[i] for i in both], predict)
    rows = []
    for i, (_, r) in zip(both, preds.iterrows()):
        q, ok = expected[i], pd.isna(r["error"])
        p_exp = float(r.get(f"p_{q}", 0.0)) if ok else float("nan")  # no p_<q> column: q is not a class
        rows.append({"image_id": i, "path": str(by_id[i]), "expected_quantity": q, "predicted": r["count"],
                     "confidence": r["confidence"], "p_expected": p_exp, "flagged": bool(ok and p_exp < threshold),
                     "status": "checked" if ok else "unreadable", "error": None if ok else r["error"]})
    for i in sorted(set(by_id) - set(expected)):
        status, err = ("bad_metadata", bad_metadata[i]) if i in bad_metadata else ("no_expected_quantity", None)
        rows.append({"image_id": i, "path": str(by_id[i]), "status": status, "error": err, "flagged": False})
    for i in sorted(set(expected) - set(by_id)):
        rows.append({"image_id": i, "expected_quantity": expected[i], "status": "no_image", "flagged": False})
    for i in sorted(set(bad_metadata) - set(by_id)):
        rows.append({"image_id": i, "status": "bad_metadata", "error": bad_metadata[i], "flagged": False})
    cols = ["image_id", "path", "expected_quantity", "predicted", "confidence", "p_expected", "flagged", "status", "error"]
    out = pd.DataFrame(rows, columns=cols)
    for c in ("expected_quantity", "predicted"):
        out[c] = out[c].astype("Float64").astype("Int64")
    return out


def summary(df: pd.DataFrame, threshold: float) -> dict:
    """Counts per status, flagged bins and the agreement rate (predicted == expected) among checked bins."""
    checked = df[df["status"] == "checked"]
    agree = (checked["predicted"] == checked["expected_quantity"]).sum()
    out = {"bins_checked": len(checked), "bins_flagged": int(checked["flagged"].sum()),
           "agreement_rate": float(agree / len(checked)) if len(checked) else float("nan"),
           "threshold": threshold}
    for status in ("no_expected_quantity", "no_image", "unreadable", "bad_metadata"):
        out[status] = int((df["status"] == status).sum())
    return out


def _thumbnail(path: str) -> str:
    """An image file -> a small inline JPEG (data URI); decoded with the served model's checks."""
    img = decode_image(Path(path).read_bytes(), path)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def html_report(df: pd.DataFrame, stats: dict, model: str) -> str:
    """A self-contained HTML page: the summary, the flagged bins (least likely first) with thumbnails, and
    the bins that could not be checked."""
    e = html.escape
    flagged = df[df["flagged"]].sort_values("p_expected")
    head = "".join(f"<tr><th>{e(k)}</th><td>{v:.3f}</td></tr>" if isinstance(v, float)
                   else f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in stats.items())
    rows = "".join(
        f"<tr><td><img src='{_thumbnail(r.path)}' alt='{e(r.image_id)}'></td><td>{e(r.image_id)}</td>"
        f"<td>{r.expected_quantity}</td><td>{r.predicted}</td><td>{r.p_expected:.3f}</td>"
        f"<td>{r.confidence:.3f}</td></tr>" for r in flagged.itertuples())
    others = df[df["status"] != "checked"]
    problems = "".join(f"<tr><td>{e(r.image_id)}</td><td>{e(r.status)}</td>"
                       f"<td>{'' if pd.isna(r.error) else e(str(r.error))}</td></tr>" for r in others.itertuples())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Bin inventory check</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px}}</style>
</head><body>
<h1>Bin inventory check</h1>
<p>Model: {e(model)}. A bin is flagged when the model gives its expected quantity a probability below
{stats['threshold']:g}.</p>
<h2>Summary</h2><table>{head}</table>
<h2>Flagged bins ({len(flagged)})</h2>
<table><tr><th>photo</th><th>bin</th><th>expected</th><th>predicted</th><th>p(expected)</th><th>confidence</th></tr>
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
