"""What a run of the inventory check leaves for people: a self-contained HTML page (`html_report`) and an MLflow
`reconcile` run (`log_run`), both from the per-bin table of reconcile.check and its reconcile.summary, and the
recount sheet of its flagged bins (bincounter.recounts)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from urllib.parse import quote

import mlflow
import pandas as pd

from bincounter.recounts import sheet_text
from bincounter.transforms import decode_image

THUMB = 160  # px, longest side of a report thumbnail
RECOUNTS = "recounts.csv"  # the recount sheet's name in a run's artifacts (reconcile's and score's)


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


def html_report(df: pd.DataFrame, stats: dict, model: str, promise: str = "", recounts: str | None = None) -> str:
    """A self-contained HTML page: the summary and what the threshold promises (`promise`), the flagged bins
    (least likely record first) with thumbnails and their count distributions, and the bins that could not be
    checked. `recounts`: the recount sheet's path relative to the page, linked above the flagged bins."""
    e = html.escape
    sheet = "" if not recounts else (
        f"<p>Recount sheet: <a href='{e(quote(recounts))}'>{e(recounts)}</a>: these bins, riskiest first, with a "
        f"<code>recount</code> column to fill in after counting them.</p>")
    flagged = df[df["flagged"]].sort_values(["p_expected", "image_id"], kind="stable")  # the recount sheet's order
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
{sheet}<table><tr><th>photo</th><th>bin</th><th>expected</th><th>predicted</th><th>p(expected)</th><th>confidence</th><th>counts</th></tr>
{rows}</table>
<h2>Not checked ({len(others)})</h2>
<table><tr><th>bin</th><th>status</th><th>detail</th></tr>{problems}</table>
</body></html>
"""


def log_run(df: pd.DataFrame, stats: dict, report: Path | None, params: dict,
            sheet: pd.DataFrame | None = None) -> str:
    """A `reconcile` run in the current experiment with the parameters, summary metrics, the table, the report
    and the recount sheet (`sheet`, recounts.recount_sheet's) as `recounts.csv`. -> run id."""
    with mlflow.start_run() as run:
        mlflow.set_tag("bincounter.step", "reconcile")
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in stats.items() if k != "threshold"})
        mlflow.log_text(df.to_csv(index=False), "reconcile.csv")
        if report is not None:
            mlflow.log_artifact(str(report))
        if sheet is not None:
            log_sheet(sheet)
        return run.info.run_id


def log_sheet(sheet: pd.DataFrame) -> None:
    """Log a recount sheet (recounts.recount_sheet's) into the active run as `recounts.csv`, as write_sheet
    writes it."""
    mlflow.log_text(sheet_text(sheet), RECOUNTS)
