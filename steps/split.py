"""split: train/val/test split of an ingest run's manifest, stratified by count and source.

Each (count, source) group is split in the fractions given, so every source (a local folder, a bucket, the
generator) keeps its share of every count in train, val and test; a manifest of one source splits by count alone.
Keep the test part (`keep_test_of=<split run>`): the test part is exactly that split run's test bins, each with
its row of this manifest where it has one (a recounted label applies; a recounted bin of that test part stays in
test, never in training), the old row where it has none (counted in `kept_test_missing` and named); every other
bin is split into train and val alone, in the ratio train_frac:val_frac. A model fine-tuned on it is tested on
the champion's test bins. Tag `bincounter.keep_test_of`.
Reads: the ingest run's `manifest.csv` (a FINISHED ingest run); with keep_test_of that split run's
`splits/test.csv`.
Logs: `splits/{train,val,test}.csv`, `class_histogram.png`, `sources.csv` (per source and count: the bins in
train, val, test and in all), param `classes`, metrics `{split}_size` and per source `{split}_size_<source>`.
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

from bincounter import entry, metrics
from bincounter.manifest import (SPLITS, check_fractions, keep_test, metric_key, read_manifest, source_groups,
                                 source_table, split_artifact, stratified_split, write_csv)
from bincounter.runs import download, finished_run, read_split, start_step
from steps.options import whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="split", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ingest_run_id", required=True, help="a FINISHED ingest run")
    p.add_argument("--train_frac", type=float, default=0.6,
                   help="share of the bins to train on; the three fractions sum to 1")
    p.add_argument("--val_frac", type=float, default=0.2,
                   help="share to validate on (early stopping, hpo, calibration)")
    p.add_argument("--test_frac", type=float, default=0.2, help="share held out for evaluate")
    p.add_argument("--seed", type=whole, default=42, help="seeds the split")
    p.add_argument("--sources", default="",
                   help="keep only these sources (comma-separated ingest folder names) after splitting them all: "
                        "each bin stays in the split it has in the split of every source, so a model trained on "
                        "fewer sources is tested on the same bins; empty = every source")
    p.add_argument("--keep_test_of", default="",
                   help="a FINISHED split run whose test bins are this split's test part, labelled as this "
                        "manifest has them (a recount applies); every other bin goes to train and val in the ratio "
                        "train_frac:val_frac (test_frac unused), so that a fine-tuned model is gated on the "
                        "champion's test bins; empty = split every bin")
    return p


def keep_sources(splits: dict[str, pd.DataFrame], sources: str) -> dict[str, pd.DataFrame]:
    """{split: manifest} -> the same with only the rows of `sources` (comma-separated source_group names; empty:
    all). ValueError naming the sources there are, for a name that is not one of them."""
    if not sources:
        return splits
    wanted = [s.strip() for s in sources.split(",") if s.strip()]
    known = sorted(set().union(*(set(source_groups(v)) for v in splits.values())))
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise ValueError(f"sources: {', '.join(unknown) or repr(sources)} not in the manifest; its sources are "
                         f"{', '.join(known)}")
    return {k: v[source_groups(v).isin(wanted)].reset_index(drop=True) for k, v in splits.items()}


def make_splits(df: pd.DataFrame, args: argparse.Namespace, old_test: pd.DataFrame | None):
    """The manifest -> ({train, val, test} as the parameters ask, the kept test's bins missing from it)."""
    fractions = (args.train_frac, args.val_frac, args.test_frac)
    if old_test is None:
        return keep_sources(stratified_split(df, fractions, args.seed), args.sources), []
    splits, missing = keep_test(df, old_test, args.train_frac, args.val_frac, args.seed)
    # the kept test part stays whole: `sources` narrows what is trained on
    return {**keep_sources({k: splits[k] for k in ("train", "val")}, args.sources), "test": splits["test"]}, missing


def main(args: argparse.Namespace) -> str:
    check_fractions(args.train_frac, args.val_frac, args.test_frac)
    ingest = finished_run(args.ingest_run_id, "ingest")
    if args.keep_test_of:
        finished_run(args.keep_test_of, "split")
    with start_step("split", vars(args)) as run, tempfile.TemporaryDirectory() as tmp:
        df = read_manifest(download(args.ingest_run_id, "manifest.csv", tmp))
        if df.empty:
            raise ValueError(f"ingest run {args.ingest_run_id} has an empty manifest: nothing to split")
        lo = int(ingest.data.params.get("count_min", df["count"].min()))
        hi = int(ingest.data.params.get("count_max", df["count"].max()))
        mlflow.log_param("classes", ",".join(str(c) for c in range(lo, hi + 1)))
        old_test = read_split(args.keep_test_of, "test") if args.keep_test_of else None
        splits, missing = make_splits(df, args, old_test)
        for name in SPLITS:
            write_csv(splits[name], Path(tmp) / split_artifact(name))
            mlflow.log_metric(f"{name}_size", len(splits[name]))
        if args.keep_test_of:
            mlflow.set_tag("bincounter.keep_test_of", args.keep_test_of)
            mlflow.log_metric("kept_test_missing", len(missing))
            print(f"split: the test part is split run {args.keep_test_of}'s ({len(splits['test'])} bins, "
                  f"{int((splits['test']['source'] == 'recount').sum())} recounted)")
            if missing:
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                print(f"split: {len(missing)} of its test bins are not in this manifest, kept as that split had "
                      f"them: {', '.join(missing[:10])}{more}")
        mlflow.log_artifacts(str(Path(tmp) / "splits"), "splits")
        metrics.log_figure(metrics.plot_histogram({k: v["count"] for k, v in splits.items()}), "class_histogram.png")
        table = source_table(splits)
        mlflow.log_artifact(str(write_csv(table, Path(tmp) / "sources.csv")))
        per_source = table.groupby("source")[list(splits)].sum()
        mlflow.log_metrics({f"{name}_size_{metric_key(src)}": int(n) for src, row in per_source.iterrows()
                            for name, n in row.items()})
        print("split: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
        if len(per_source) > 1:
            print("split: per source (train/val/test): " + ", ".join(
                f"{src} {'/'.join(str(int(n)) for n in row)}" for src, row in per_source.iterrows()))
        return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
