"""The figures of a scored predictions table: what evaluate logs for all bins and for each source, and what
bench/real_bins recomputes from evaluate's `predictions.csv`, by the same function."""
from __future__ import annotations

import pandas as pd

from bincounter import calibration, metrics


def table_figures(ok: pd.DataFrame, classes: list[int], threshold: float) -> dict[str, float]:
    """Scored bins (the readable rows of a predictions table with the true `count`: predicted, confidence,
    review, p_<c>) -> accuracy, rmse, mae, within1_accuracy (metrics.count_metrics), the accuracy per true count
    (`accuracy_count_<c>`, counts present only) and, on the bins whose count is one of the model's `classes`, how
    far its probabilities can be trusted at the check `threshold` (calibration.trust_metrics; none without such
    bins)."""
    out = metrics.count_metrics(ok["count"], ok["predicted"])
    for c in classes:
        of_c = ok["count"] == c
        if of_c.any():
            out[f"accuracy_count_{c}"] = float((ok.loc[of_c, "predicted"] == c).mean())
    rows = ok[ok["count"].isin(classes)]
    if len(rows):
        out.update(calibration.trust_metrics(*calibration.table_arrays(rows, classes), classes, threshold))
    return out
