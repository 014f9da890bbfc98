"""Real bins from several sources: evaluate runs compared per source and over all, with bootstrap standard
errors, beside their train runs' time per epoch.

For each evaluate run given (`<run id>` or `<run id>=<label>`) it reads the run's `predictions.csv` (one row per
test bin, with its `source`, the answer and the probabilities) and the model's check threshold, and recomputes
every figure evaluate logs (figures.table_figures: the same function) on each source
and on all bins, with a bootstrap standard error of each (metrics.bootstrap_se). From the train run behind the
model: the training bins, the epochs, the seconds per epoch (between the epochs' validation metrics; the first
epoch from the run's start) and the whole run's minutes. Then each run against the first on the test bins both
scored, per source: the difference in accuracy and RMSE with a paired bootstrap standard error (the same bins
in each draw). Prints markdown tables (figures +- SE) and writes bench/results/real_bins.json.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python bench/real_bins.py <evaluate run>=squash <evaluate run>=crop
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincounter import calibration, metrics  # noqa: E402
from bincounter.figures import table_figures  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "real_bins.json"
# the columns of the tables: (figure, heading)
SHOWN = [("accuracy", "accuracy"), ("rmse", "RMSE"), ("ece", "ECE"), ("check_auc_off2", "check AUC off by 2+"),
         ("check_false_alarm_at_catch_90", "right flagged at 90 % catch"),
         ("selective_accuracy_25", "surest 25 %"), ("review_rate", "flagged for review"),
         ("unflagged_accuracy", "unflagged accuracy")]


def train_run_of(client: MlflowClient, model_uri: str) -> str:
    """runs:/<id>/model or models:/<name>@<alias> | /<version> -> the train run's id."""
    if model_uri.startswith("runs:/"):
        return model_uri.split("/")[1]
    name, ref = model_uri.removeprefix("models:/").replace("@", "/").split("/", 1)
    version = client.get_model_version_by_alias(name, ref) if not ref.isdigit() else client.get_model_version(name, ref)
    return version.run_id


def timing(client: MlflowClient, run_id: str) -> dict:
    """A train run -> its epochs, seconds per epoch (median, and each) and minutes in all."""
    run = client.get_run(run_id)
    history = sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)
    stamps = [run.info.start_time] + [m.timestamp for m in history]
    per_epoch = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
    return {"train_run": run_id, "epochs": len(history), "seconds_per_epoch": per_epoch,
            "median_epoch_s": float(np.median(per_epoch)) if per_epoch else float("nan"),
            "train_minutes": ((run.info.end_time or run.info.start_time) - run.info.start_time) / 60000,
            "train_bins": int(client.get_run(run.data.params["split_run_id"]).data.metrics["train_size"]),
            "fit": run.data.params.get("fit", "crop"),
            "val_accuracy": [m.value for m in history]}


def figures(rows: pd.DataFrame, classes: list[int], threshold: float) -> dict[str, float]:
    """Scored rows (evaluate's predictions table, readable bins whose count is a class) -> every figure evaluate
    logs (figures.table_figures), with every count's accuracy (NaN where a bootstrap draw holds none of it)."""
    out = table_figures(rows, classes, threshold)
    return out | {f"accuracy_count_{c}": out.get(f"accuracy_count_{c}", float("nan")) for c in classes}


def with_se(rows: pd.DataFrame, classes: list[int], threshold: float) -> dict[str, float]:
    """figures and their bootstrap standard errors (`<figure>_se`), and the bins they are on (`size`)."""
    point = figures(rows, classes, threshold)
    se = metrics.bootstrap_se(lambda idx: figures(rows.iloc[idx], classes, threshold), len(rows), resamples=200)
    return {"size": len(rows), **point, **{f"{k}_se": v for k, v in se.items()}}


def measure(client: MlflowClient, run_id: str, label: str) -> dict:
    """One evaluate run -> its train run's timing and, per source and for all bins, with_se."""
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        preds = pd.read_csv(client.download_artifacts(run_id, "predictions.csv", tmp), dtype={"image_id": str})
    classes = sorted(int(c[2:]) for c in preds.columns if c.startswith("p_"))
    train = timing(client, train_run_of(client, run.data.params["model_uri"]))
    threshold = client.get_run(train["train_run"]).data.metrics.get("check_threshold",
                                                                    calibration.DEFAULT_CHECK_THRESHOLD)
    ok = preds[preds["error"].isna() & preds["count"].isin(classes)]
    if "source" not in ok:
        ok = ok.assign(source="(one source)")
    groups = {"all": ok, **{str(s): g for s, g in ok.groupby("source", sort=True)}}
    return {"label": label, "evaluate_run": run_id, "target_mix": run.data.params.get("target_mix_applied", ""),
            **train, "threshold": threshold,
            "sources": {name: with_se(g, classes, threshold) for name, g in groups.items()}, "rows": ok}


def paired(first: pd.DataFrame, other: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Two runs' scored rows -> per source of the bins both scored (and `all`): the other's accuracy and RMSE
    minus the first's, and the paired bootstrap standard error of each difference."""
    both = first.merge(other, on="image_id", suffixes=("_a", "_b"))
    groups = {"all": both}
    if "source_a" in both and both["source_a"].nunique() > 1:
        groups.update({str(s): g for s, g in both.groupby("source_a", sort=True)})
    out = {}
    for name, g in groups.items():
        t, a, b = (g[c].to_numpy() for c in ("count_a", "predicted_a", "predicted_b"))

        def diff(idx):
            ma, mb = metrics.count_metrics(t[idx], a[idx]), metrics.count_metrics(t[idx], b[idx])
            return {k: mb[k] - ma[k] for k in ("accuracy", "rmse")}
        point, se = diff(np.arange(len(g))), metrics.bootstrap_se(diff, len(g), resamples=500)
        out[name] = {"bins": len(g), **point, **{f"{k}_se": v for k, v in se.items()}}
    return out


def cell(r: dict, k: str) -> str:
    v, se = r.get(k, float("nan")), r.get(f"{k}_se", float("nan"))
    return "" if np.isnan(v) else f"{v:.3f} ± {se:.3f}" if not np.isnan(se) else f"{v:.3f}"


def tables(results: list[dict]) -> str:
    """Markdown: the runs (time), then one table per source with a row per run."""
    lines = ["| run | fit | training bins | epochs | s / epoch (median) | train run, minutes | target mix |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['fit']} | {r['train_bins']} | {r['epochs']} | {r['median_epoch_s']:.0f} | "
              f"{r['train_minutes']:.1f} | {r['target_mix'].split(' ')[0] or 'train'} |" for r in results]
    for source in dict.fromkeys(s for r in results for s in r["sources"]):
        lines += ["", f"**{source}**", "", "| run | bins | " + " | ".join(h for _, h in SHOWN) + " |",
                  "|---|---|" + "---|" * len(SHOWN)]
        for r in results:
            if source in r["sources"]:
                f = r["sources"][source]
                lines.append(f"| {r['label']} | {f['size']} | " + " | ".join(cell(f, k) for k, _ in SHOWN) + " |")
    counts = sorted({int(k.rsplit("_", 1)[1]) for r in results for f in r["sources"].values() for k in f
                     if k.startswith("accuracy_count_") and not k.endswith("_se")})
    lines += ["", "Accuracy per true count (all bins):", "", "| run | " + " | ".join(map(str, counts)) + " |",
              "|---|" + "---|" * len(counts)]
    lines += [f"| {r['label']} | " + " | ".join(cell(r["sources"]["all"], f"accuracy_count_{c}") for c in counts)
              + " |" for r in results]
    for r in results[1:]:
        lines += ["", f"{r['label']} minus {results[0]['label']}, on the bins both scored (paired bootstrap SE):", "",
                  "| source | bins | accuracy | RMSE |", "|---|---|---|---|"]
        lines += [f"| {s} | {d['bins']} | {d['accuracy']:+.3f} ± {d['accuracy_se']:.3f} | "
                  f"{d['rmse']:+.3f} ± {d['rmse_se']:.3f} |" for s, d in r["versus_first"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="evaluate run ids, each optionally `=<label>`")
    p.add_argument("--out", default=str(RESULTS), help="the JSON to write")
    args = p.parse_args(argv)
    client = MlflowClient()
    results = [measure(client, *(r.split("=", 1) if "=" in r else (r, r[:8]))) for r in args.runs]
    for r in results[1:]:
        r["versus_first"] = paired(results[0]["rows"], r["rows"])
    print(tables(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "rows"} for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
