"""evaluate: score a model on a split run's test split or on any manifest.

Reads: `model_uri` (runs:/ or models:/), and `split_run_id` (its `splits/test.csv`; the majority baseline comes
from its train split) or `manifest` (a runs:/.../manifest.csv URI or a file; the baseline is its own majority).
Logs: `test_accuracy`, `test_rmse`, `test_mae`, `test_within1_accuracy`, `baseline_*` beside them,
`test_unreadable`, `per_count.csv`, `confusion_matrix.png`, `samples.png`, `predictions.csv`; how far to trust
the model: `test_ece`, `test_nll`, `test_brier`, `test_selective_accuracy_{25,50}`, the inventory check as a
detector (`test_check_auc`, `test_check_auc_off2`, `test_check_catch`, `test_check_catch_off2`,
`test_check_false_alarm` at the model's threshold; `test_check_false_alarm_at_catch_90` at the threshold that
flags 90 % of these bins' records off by two or more), `test_review_rate`, `test_unflagged_accuracy`,
`reliability.png`, `coverage.png`; param `target_mix_applied`, the mix of counts the answers were moved to
(every figure is measured under it), and `train_mix`, the one the model learned from.
Per source, when the scored table's `source` column holds more than one (ingest's folders): the same figures
for each source's bins as `<source>/test_<metric>` (the source's name made MLflow-legal: letters, digits, `_`
and `-`), its per-count accuracy `<source>/test_accuracy_count_<c>`, `<source>/test_accuracy_se` (a bootstrap
standard error), and `per_source.csv` (a row per source and one for all bins, with bootstrap standard errors
of accuracy, RMSE and MAE); the overall `test_*` figures stay those of all bins. `predictions.csv` then has a
`source` column.
`tta`, `decision`, `calibrated` and `target_mix` override the model's own settings: several ways of answering
scored on one model.

`read_threads` was called `workers`: the old name is accepted until the next release.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from bincounter import calibration, counters, entry, metrics, priors, registry
from bincounter.figures import table_figures
from bincounter.manifest import read_manifest, source_groups, write_csv
from bincounter.model import DECISIONS
from bincounter.predict import predict_manifest
from bincounter.runs import finished_run, local_file, read_split, start_step
from steps.options import optional, renamed_option, resolve_renamed, str2bool, target_mix, whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_uri", required=True, help="`runs:/<id>/model` or `models:/bin-counter@champion`")
    p.add_argument("--split_run_id", default="", help="score its test split (baseline from its train split)")
    p.add_argument("--manifest", default="", help="or score any manifest (a file or `runs:/.../manifest.csv`)")
    p.add_argument("--batch_size", type=whole, default=32, help="images per forward pass")
    renamed_option(p, "read_threads", "workers", type=whole, default=2, help="threads reading images")
    p.add_argument("--tta", default="", choices=["", "true", "false"],
                   help="empty: as the model was trained; true/false: with or without test-time augmentation")
    p.add_argument("--decision", default="", choices=["", *DECISIONS],
                   help="empty: as the model was trained; argmax or median: that rule instead")
    p.add_argument("--calibrated", type=str2bool, default=True,
                   help="false: score the model's raw probabilities (temperature 1), to see what calibration buys")
    p.add_argument("--target_mix", type=optional(target_mix), default=None,
                   help="empty: as the model was trained; train (no prior correction), natural (ABID's mix of counts "
                        "1-5) or shares of every count like 1:0.12,2:0.22,3:0.26,4:0.23,5:0.17: the mix of counts "
                        "the answers are moved to")
    return p


SOURCE = "source"  # the manifest's column naming where each bin came from (ingest's folder)


def score(counter: counters.BaseCounter, df: pd.DataFrame, settings: counters.Settings, read_threads: int) -> pd.DataFrame:
    """Manifest rows -> the predictions table (predict.predict_manifest) beside the truth: image_id, count (the
    true one), [source, when the rows hold several,] predicted, confidence, review, p_*, error. An unreadable
    image gets an error and no prediction; it does not stop the others."""
    table = predict_manifest(counter, df, settings, read_threads).rename(columns={"count": "predicted"})
    table.insert(1, "count", df["count"].to_numpy())
    groups = source_groups(df)  # a local folder's name; an S3 bucket or the generator for per-object URIs
    if groups.nunique() > 1:
        table.insert(2, SOURCE, groups.to_numpy())
    return table


def main(args: argparse.Namespace) -> str:
    resolve_renamed(args)  # read_threads was `workers`
    if bool(args.split_run_id) == bool(args.manifest):
        raise ValueError("give exactly one of split_run_id (scores its test split) or manifest")
    with tempfile.TemporaryDirectory() as tmp:
        if args.split_run_id:
            finished_run(args.split_run_id, "split")
            test = read_split(args.split_run_id, "test")
            baseline_from = read_split(args.split_run_id, "train")["count"]
        else:
            with local_file(args.manifest) as path:
                test = read_manifest(path)
            baseline_from = test["count"]
        if test.empty:
            raise ValueError("nothing to evaluate: the test data is empty")
        counter = counters.load(args.model_uri)
        # how it answers: as the model was logged where these are empty (every member of an ensemble alike); a
        # target mix it cannot take is refused here, before anything is scored
        settings = counter.settings(counters.Settings(
            tta=None if args.tta in ("", None) else args.tta in (True, "true"), calibrated=args.calibrated,
            target_mix=args.target_mix or None, decision=args.decision or None, batch_size=args.batch_size))
        with start_step("evaluate", vars(args)) as run:
            version = registry.version_uri(args.model_uri)  # the version an alias names now: the gate finds it so
            if version:
                mlflow.set_tag(registry.VERSION_TAG, version)
            mlflow.log_params({"target_mix_applied": priors.describe_mix(settings.target_mix, counter.classes),
                               "train_mix": "unknown" if counter.train_mix is None
                               else priors.format_mix(counter.classes, counter.train_mix)})
            mlflow.log_input(mlflow.data.from_pandas(test, name="test"), context="testing")
            preds = score(counter, test, settings, args.read_threads)
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
            if SOURCE in preds:
                table = log_per_source(preds, counter, out)
                shown = [c for c in (SOURCE, "size", "accuracy", "accuracy_se", "rmse", "ece") if c in table]
                print("evaluate: per source\n" + table[shown].to_string(index=False, float_format="%.3f"))
            return run.info.run_id


def trust_figures(ok: pd.DataFrame, counter: counters.BaseCounter) -> tuple[dict[str, float], tuple]:
    """How far the model's probabilities can be trusted on the scored bins whose count is one of its classes
    (calibration.trust_metrics at the model's check threshold) -> ({test_<figure>: value}, the arrays they were
    computed from); no figures without such bins."""
    classes = counter.classes
    rows = ok[ok["count"].isin(classes)]
    arrays = calibration.table_arrays(rows, classes)
    if rows.empty:
        return {}, arrays
    out = calibration.trust_metrics(*arrays, classes, counter.trust.check_threshold)
    return {f"test_{k}": v for k, v in out.items()}, arrays


def log_trust(ok: pd.DataFrame, counter: counters.BaseCounter) -> dict[str, float]:
    """How far the model's probabilities can be trusted on the scored bins whose count is one of its classes:
    logs `test_ece`, `test_nll`, `test_brier`, selective accuracy of the 25 % / 50 % most confident counts, the
    inventory check as a detector at the model's check threshold (`test_check_*`) and at a threshold catching 90 %
    of the far-off records (`test_check_false_alarm_at_catch_90`), the share flagged for review and the accuracy
    of the rest, `reliability.png` and `coverage.png`. -> the metrics."""
    out, (probs, y, right, conf, review) = trust_figures(ok, counter)
    mlflow.log_metrics(out)
    metrics.log_figure(metrics.plot_reliability(calibration.reliability(probs, y)), "reliability.png")
    cov, acc = calibration.coverage_curve(conf, right)
    metrics.log_figure(metrics.plot_coverage(cov, acc, 1 - out["test_review_rate"]), "coverage.png")
    return out


def source_figures(preds: pd.DataFrame, counter: counters.BaseCounter) -> dict[str, float]:
    """One group of scored bins (a predictions table) -> the figures evaluate logs for all bins, by the same
    functions: size, unreadable, and figures.table_figures at the model's check threshold (accuracy, rmse, mae,
    within1_accuracy, accuracy per true count, the trust figures). Keys without the `test_` prefix."""
    ok = preds[preds["error"].isna()]
    out = {"size": len(ok), "unreadable": len(preds) - len(ok)}
    if ok.empty:
        return out
    return {**out, **table_figures(ok, counter.classes, counter.trust.check_threshold)}


def log_per_source(preds: pd.DataFrame, counter: counters.BaseCounter, out: Path) -> pd.DataFrame:
    """Every source's figures (source_figures) as `<source>/test_<figure>` metrics (the name made MLflow-legal,
    metrics.metric_prefixes) with `<source>/test_accuracy_se`, and `per_source.csv`: a row per source and one
    for all bins (source `(all)`, figures as the overall `test_*`), with bootstrap standard errors of accuracy,
    rmse and mae (metrics.bootstrap_se). -> that table."""
    preds = preds.assign(**{SOURCE: preds[SOURCE].fillna("").astype(str)})
    prefixes = metrics.metric_prefixes(preds[SOURCE].tolist())
    rows = []
    for source, group in [(None, preds), *preds.groupby(SOURCE, sort=True)]:
        figures = {**source_figures(group, counter), **_count_se(group[group["error"].isna()])}
        if source is not None:
            mlflow.log_metrics({f"{prefixes[source]}/test_{k}": v for k, v in figures.items()
                                if k not in ("rmse_se", "mae_se")})
        rows.append({SOURCE: "(all)" if source is None else source,
                     "metric_prefix": "" if source is None else prefixes[source], **figures})
    table = pd.DataFrame(rows)
    write_csv(table, out / "per_source.csv")
    mlflow.log_artifact(str(out / "per_source.csv"))
    return table


def _count_se(ok: pd.DataFrame) -> dict[str, float]:
    """Scored bins -> bootstrap standard errors of accuracy, rmse and mae (`<figure>_se`; none without bins)."""
    if ok.empty:
        return {}
    t, p = ok["count"].to_numpy(), ok["predicted"].to_numpy()
    se = metrics.bootstrap_se(lambda idx: metrics.count_metrics(t[idx], p[idx]), len(ok))
    return {f"{k}_se": se[k] for k in ("accuracy", "rmse", "mae")}


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
