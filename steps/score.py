"""score: count the items in a whole set of bin photos on Spark, optionally with the inventory check.

Reads: `input` (a folder, an s3:// prefix such as s3://aft-vbi-pds/bin-images/, or a manifest:
runs:/<ingest run>/manifest.csv or a file), the model `model_uri`, and with `expected` (a metadata folder or
s3:// prefix, or a CSV image_id,expected_quantity) the quantities to check against.
Writes: `output`, a folder: scores.parquet/ (scores.csv/ with csv=true), one row per photo, and score.json;
with `expected` also recounts.csv, the recount sheet (the flagged bins, riskiest first, with an empty `recount`
column to fill in and give to ingest); a rerun replaces it as a whole (bincounter/score.py,
bincounter/spark_job.py).
Logs: metrics images, scored, unreadable (photos), images_per_s, seconds; with `expected` flagged and
reconcile's summary: bins_checked, bins_flagged, agreement_rate and a count per status (its `unreadable` as
bins_unreadable), and the artifact recounts.csv; tags bincounter.output, spark.master, spark.default_parallelism,
spark.partitions; the artifact score.json (the figures, the threshold used among them).
Runs the same under `spark-submit` or in a notebook (docs/spark.md).
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse

import mlflow

from bincounter import entry, report, score, spark_job
from bincounter.runs import start_step
from steps.options import optional, str2bool, whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="the photos: a folder, an s3:// prefix (e.g. `s3://aft-vbi-pds/bin-images/`) or a manifest "
                        "(`runs:/<ingest run>/manifest.csv` or a file)")
    p.add_argument("--model_uri", default="models:/bin-counter@champion", help="any MLflow model URI")
    p.add_argument("--output", default="scores",
                   help="output folder (a path, or s3://... on a cluster) for `scores.parquet/` and "
                        "`score.json`; a rerun replaces a previous score output as a whole")
    p.add_argument("--csv", type=str2bool, default=False, help="also write `scores.csv/`")
    p.add_argument("--expected", default="", help="run the inventory check against this metadata folder, "
                                                  "an s3:// metadata prefix or a CSV `image_id,expected_quantity`")
    p.add_argument("--threshold", type=optional(float), default=None,
                   help="flag a bin when p(expected quantity) is below this; empty: the model's own threshold "
                        "(as `bincounter reconcile`)")
    p.add_argument("--spark_master", default="local[*]",
                   help="local[N], spark://host:port, yarn, k8s://... (under spark-submit: the same as its --master); "
                        "a notebook's session is used as it is")
    p.add_argument("--partitions", type=whole, default=0,
                   help="Spark partitions of the photo list; 0 = Spark's default parallelism (one per core)")
    p.add_argument("--batch_size", type=whole, default=64, help="photos per model call (Spark's Arrow batch)")
    p.add_argument("--limit", type=whole, default=0, help="score only the first this many photos; 0 = all")
    return p


def main(args: argparse.Namespace) -> dict:
    """Run the step -> the figures (score.score's). Bad input raises ValueError naming it before Spark starts
    (the output path: before any Spark job); entry.run makes it one line."""
    if args.batch_size < 1 or args.partitions < 0:
        raise ValueError(f"batch_size must be 1 or more and partitions 0 or more, got {args.batch_size} "
                         f"and {args.partitions}")
    photos = score.list_photos(args.input, args.limit)
    model = score.check_model(args.model_uri)
    threshold = model.check_threshold if args.threshold is None else args.threshold
    expected = score.expectations(args.expected, threshold) if args.expected else None
    spark = spark_job.spark_session(args.spark_master, args.batch_size)
    spark_job.OutputFolder(spark, args.output).check()
    with start_step("score", vars(args), name=f"score {len(photos.rows)} photos"):
        stats = score.score(spark, photos, model, args.output, args.partitions, args.csv, expected)
        mlflow.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        if expected:  # reconcile's figures under its names; its `unreadable` counts bins, beside ours (photos)
            mlflow.log_metrics({"bins_unreadable" if k == "unreadable" else k: v
                                for k, v in stats["check"].items() if k != "threshold"})
            report.log_sheet(score.output_sheet(spark, stats["output"]))
        mlflow.set_tags({"bincounter.output": stats["output"], "spark.master": spark.sparkContext.master,
                         "spark.default_parallelism": spark.sparkContext.defaultParallelism,
                         "spark.partitions": stats["partitions"]})
        mlflow.log_dict(stats, "score.json")
    print(f"score: {stats['scored']} of {stats['images']} photos counted, {stats['unreadable']} unreadable"
          + (f", {stats['flagged']} flagged (the recount sheet: {score.RECOUNTS})" if expected else "")
          + f"; {stats['images_per_s']:.1f} images/s; wrote {stats['output']}")
    return stats


if __name__ == "__main__":
    entry.run(main, get_args_parser())
