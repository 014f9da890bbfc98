"""evaluate: score a model on a split run's test split or on any manifest.

Reads: `model_uri` (runs:/ or models:/), and `split_run_id` (its `splits/test.csv`; the majority baseline comes
from its train split) or `manifest` (a runs:/.../manifest.csv URI or a file; the baseline is its own majority).
Logs: `test_accuracy`, `test_rmse`, `test_mae`, `test_within1_accuracy`, `baseline_*` beside them,
`test_unreadable`, `per_count.csv`, `confusion_matrix.png`, `samples.png`, `predictions.csv`; how far to trust
the model: `test_ece`, `test_nll`, `test_brier`, `test_selective_accuracy_{25,50}`, the inventory check as a
detector (`test_check_auc`, `test_check_auc_off2`, `test_check_catch`, `test_check_catch_off2`,
`test_check_false_alarm` at the model's threshold), `test_review_rate`, `test_unflagged_accuracy`,
`reliability.png`, `coverage.png`.
`tta`, `decision` and `calibrated` override the model's own settings: several ways of answering scored on one
model.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from tqdm import tqdm

from bincounter import calibration, metrics, serving
from bincounter import entry
from bincounter.manifest import read_manifest, write_csv
from bincounter.model import DECISIONS
from bincounter.runs import download, download_uri, finished_run, start_step, str2bool, whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_uri", required=True, help="`runs:/<id>/model` or `models:/bin-counter@champion`")
    p.add_argument("--split_run_id", default="", help="score its test split (baseline from its train split)")
    p.add_argument("--manifest", default="", help="or score any manifest (a file or `runs:/.../manifest.csv`)")
    p.add_argument("--batch_size", type=whole, default=32, help="images per forward pass")
    p.add_argument("--workers", type=whole, default=2, help="threads reading images")
    p.add_argument("--tta", default="", choices=["", "true", "false"],
                   help="empty: as the model was trained; true/false: with or without test-time augmentation")
    p.add_argument("--decision", default="", choices=["", *DECISIONS],
                   help="empty: as the model was trained; argmax or median: that rule instead")
    p.add_argument("--calibrated", type=str2bool, default=True,
                   help="false: score the model's raw probabilities (temperature 1), to see what calibration buys")
    return p


def score(counter: serving.BinCounter, df: pd.DataFrame, batch_size: int, workers: int) -> pd.DataFrame:
    """Manifest rows -> predictions table (image_id, count, predicted, confidence, p_*, error).
    An unreadable image gets an error and no prediction; it does not stop the others."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path):
        try:
            return Path(path).read_bytes()
        except OSError as e:
            return e

    tables = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in tqdm(range(0, len(df), batch_size), desc="evaluate", mininterval=5):
            part = df.iloc[start:start + batch_size]
            raw = list(pool.map(read, part["path"]))
            names = part["image_id"].tolist()
            images = [b if isinstance(b, bytes) else b"" for b in raw]
            probs, errors = counter.probabilities(images, names)
            errors = [f"{n}: cannot read {p} ({b})" if not isinstance(b, bytes) else e
                      for n, p, b, e in zip(names, part["path"], raw, errors)]
            t = counter.table(probs).rename(columns={"count": "predicted"})
            t.insert(0, "image_id", names)
            t.insert(1, "count", part["count"].to_numpy())
            t["error"] = errors
            tables.append(t)
    return pd.concat(tables, ignore_index=True)


def main(args: argparse.Namespace) -> str:
    if bool(args.split_run_id) == bool(args.manifest):
        raise ValueError("give exactly one of split_run_id (scores its test split) or manifest")
    with tempfile.TemporaryDirectory() as tmp:
        if args.split_run_id:
            finished_run(args.split_run_id, "split")
            test = read_manifest(download(args.split_run_id, "splits/test.csv", tmp))
            baseline_from = read_manifest(download(args.split_run_id, "splits/train.csv", tmp))["count"]
        else:
            test = read_manifest(download_uri(args.manifest, tmp))
            baseline_from = test["count"]
        if test.empty:
            raise ValueError("nothing to evaluate: the test data is empty")
        counter = serving.load(args.model_uri)
        if args.tta != "":
            counter.tta = args.tta == "true"
        if args.decision:
            counter.decision = args.decision
        if not args.calibrated:
            counter.trust.temperature = 1.0
        with start_step("evaluate", args) as run:
            mlflow.log_input(mlflow.data.from_pandas(test, name="test"), context="testing")
            preds = score(counter, test, args.batch_size, args.workers)
            ok = preds[preds["error"].isna()]
            mlflow.log_metric("test_unreadable", len(preds) - len(ok))
            if ok.empty:
                raise ValueError("no test image could be read: see predictions.csv")
            m = metrics.count_metrics(ok["count"], ok["predicted"])
            majority, base = metrics.majority_baseline(baseline_from, ok["count"])
            mlflow.log_metrics({**{f"test_{k}": v for k, v in m.items()},
                                **{f"baseline_{k}": v for k, v in base.items()}, "test_size": len(ok)})
            mlflow.log_param("baseline_count", majority)
            out = Path(tmp)
            write_csv(preds, out / "predictions.csv")
            mlflow.log_artifact(str(out / "predictions.csv"))
            write_csv(metrics.per_class_table(ok["count"], ok["predicted"], counter.classes), out / "per_count.csv")
            mlflow.log_artifact(str(out / "per_count.csv"))
            cm = metrics.confusion(ok["count"], ok["predicted"], counter.classes)
            metrics.log_figure(metrics.plot_confusion(cm, counter.classes), "confusion_matrix.png")
            metrics.log_figure(_samples(ok, test), "samples.png")
            trust = log_trust(ok, counter)
            print(f"evaluate: {len(ok)} images, accuracy {m['accuracy']:.3f} (baseline {base['accuracy']:.3f}), "
                  f"rmse {m['rmse']:.3f} (baseline {base['rmse']:.3f}), unreadable {len(preds) - len(ok)}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in trust.items()))
            return run.info.run_id


def log_trust(ok: pd.DataFrame, counter: serving.BinCounter) -> dict[str, float]:
    """How far the model's probabilities can be trusted on the scored bins whose count is one of its classes:
    logs `test_ece`, `test_nll`, `test_brier`, selective accuracy of the 25 % / 50 % most confident counts, the
    inventory check as a detector at the model's check threshold (`test_check_*`), the share flagged for
    review and the accuracy of the rest, `reliability.png` and `coverage.png`. -> the metrics."""
    classes = counter.classes
    rows = ok[ok["count"].isin(classes)]
    probs, y, right, conf, review = calibration.table_arrays(rows, classes)
    out = calibration.trust_metrics(probs, y, right, conf, review, classes, counter.trust.check_threshold)
    out = {f"test_{k}": v for k, v in out.items()}
    mlflow.log_metrics(out)
    metrics.log_figure(metrics.plot_reliability(calibration.reliability(probs, y)), "reliability.png")
    cov, acc = calibration.coverage_curve(conf, right)
    metrics.log_figure(metrics.plot_coverage(cov, acc, 1 - out["test_review_rate"]), "coverage.png")
    return out


def _samples(ok: pd.DataFrame, test: pd.DataFrame, n: int = 12):
    """Up to n/2 right and n/2 wrong predictions, chosen at random with a fixed seed."""
    right = ok[ok["count"] == ok["predicted"]]
    wrong = ok[ok["count"] != ok["predicted"]]
    pick = pd.concat([right.sample(min(len(right), n // 2), random_state=0),
                      wrong.sample(min(len(wrong), n - min(len(right), n // 2)), random_state=0)])
    paths = dict(zip(test["image_id"], test["path"]))
    caps = [f"true {t} / pred {p} ({c:.2f})" for t, p, c in zip(pick["count"], pick["predicted"], pick["confidence"])]
    colors = ["green" if t == p else "red" for t, p in zip(pick["count"], pick["predicted"])]
    return metrics.plot_samples([paths[i] for i in pick["image_id"]], caps, colors, title="sample predictions")


if __name__ == "__main__":
    entry.run(main, get_args_parser())
