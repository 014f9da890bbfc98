"""`bincounter`: count items in bin photos, check an inventory, move the champion.

  bincounter predict IMAGES... [--model URI | --endpoint NAME [--region R]] [--output out.csv|out.json]
  bincounter reconcile --images DIR --expected METADATA_DIR|labels.csv [--model URI] [--threshold 0.2]
                       [--report report.html] [--output out.csv] [--log-mlflow]
  bincounter promote --name bin-counter --version N
  bincounter rollback --name bin-counter

Errors are printed as one line on stderr with exit status 1 (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

from bincounter import reconcile as rec
from bincounter import registry
from bincounter.deploy import DeployError, endpoint_predictor
from bincounter.reconcile import find_images, local_predictor, predict_files
from bincounter.serving import load

DEFAULT_MODEL = "models:/bin-counter@champion"
OUTPUT_SUFFIXES = (".csv", ".json")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bincounter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="count the items in bin photos")
    pr.add_argument("images", nargs="+", help="image files or folders (searched for .jpg/.jpeg/.png)")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, help="an MLflow model URI or folder (default %(default)s)")
    src.add_argument("--endpoint", help="a SageMaker endpoint name to call instead of a local model")
    pr.add_argument("--region", default="us-east-1", help="the endpoint's AWS region (default %(default)s)")
    pr.add_argument("--output", help="also write the table (with p_<count> columns) to this .csv or .json file")

    rc = sub.add_parser("reconcile", help="inventory check: expected quantity vs the photo")
    rc.add_argument("--images", required=True, help="folder of bin photos named <image_id>.jpg")
    rc.add_argument("--expected", required=True, help="folder of ABID <image_id>.json metadata, or a CSV "
                                                      "image_id,expected_quantity")
    rc.add_argument("--model", default=DEFAULT_MODEL, help="an MLflow model URI or folder (default %(default)s)")
    rc.add_argument("--threshold", type=float, default=0.2,
                    help="flag a bin when p(expected quantity) is below this (default %(default)s)")
    rc.add_argument("--report", help="write an HTML report (flagged bins with thumbnails) here")
    rc.add_argument("--output", help="write the per-bin table to this .csv or .json file")
    rc.add_argument("--log-mlflow", action="store_true", help="log a `reconcile` run with the report and summary")

    for name, helptext in (("promote", "make a version the champion"), ("rollback", "back to the previous champion")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--name", default="bin-counter", help="registered model (default %(default)s)")
        if name == "promote":
            sp.add_argument("--version", required=True)
    return p


def _write(df: pd.DataFrame, path: str) -> None:
    if path.endswith(".json"):
        Path(path).write_text(json.dumps(json.loads(df.to_json(orient="records")), indent=1) + "\n")
    else:
        df.to_csv(path, index=False)
    print(f"wrote {path}")


def _check_output(parser: argparse.ArgumentParser, path: str | None) -> None:
    if path and not path.endswith(OUTPUT_SUFFIXES):
        parser.error(f"--output must end in .csv or .json, got {path}")


def predict(args: argparse.Namespace) -> None:
    paths = find_images(args.images)
    if not paths:
        raise ValueError(f"no images in {' '.join(args.images)}")
    predictor = endpoint_predictor(args.endpoint, args.region) if args.endpoint else local_predictor(load(args.model))
    table = predict_files(paths, predictor)
    with pd.option_context("display.max_rows", None, "display.max_colwidth", 80, "display.width", 200):
        print(table[["image", "count", "confidence", "error"]].fillna({"error": ""}).to_string(index=False))
    bad = int(table["error"].notna().sum())
    print(f"{len(table) - bad} counted, {bad} unreadable")
    if args.output:
        _write(table, args.output)


def reconcile(args: argparse.Namespace) -> None:
    if not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images} is not a folder")
    expected, bad_metadata = rec.read_expected(args.expected)
    df = rec.reconcile(find_images([args.images]), expected, bad_metadata, local_predictor(load(args.model)),
                       args.threshold)
    stats = rec.summary(df, args.threshold)
    flagged = df[df["flagged"]].sort_values("p_expected")
    with pd.option_context("display.max_rows", None, "display.width", 200):
        if len(flagged):
            print(flagged[["image_id", "expected_quantity", "predicted", "p_expected"]].to_string(index=False))
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    report = None
    if args.report:
        report = Path(args.report)
        report.write_text(rec.html_report(df, stats, args.model))
        print(f"wrote {report}")
    if args.output:
        _write(df, args.output)
    if args.log_mlflow:
        run_id = rec.log_run(df, stats, report, {"model": args.model, "images": args.images,
                                                 "expected": args.expected, "threshold": args.threshold})
        print(f"logged run {run_id}")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_output(parser, getattr(args, "output", None))
    try:
        if args.command == "predict":
            predict(args)
        elif args.command == "reconcile":
            reconcile(args)
        elif args.command == "promote":
            print(registry.promote(args.name, args.version))
        else:
            print(registry.rollback(args.name))
    except (ValueError, OSError, MlflowException, DeployError) as e:
        msg = e.message if isinstance(e, MlflowException) else str(e)
        print(f"bincounter {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
