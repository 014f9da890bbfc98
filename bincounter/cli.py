"""`bincounter`: count items in bin photos, check an inventory, move the champion.

  bincounter predict IMAGES... [--model URI [--target_mix MIX] | --endpoint NAME [--region R]]
                     [--output out.csv|out.json]
  bincounter reconcile --images DIR --expected METADATA_DIR|labels.csv [--model URI] [--threshold P]
                       [--target_mix MIX] [--report report.html] [--recounts sheet.csv] [--output out.csv]
                       [--log-mlflow]
  bincounter promote --name bin-counter --version N
  bincounter rollback --name bin-counter

Exit status: 0 done (some inputs may have failed: predict says how many on stderr, reconcile lists them);
1 an error (one line on stderr), predict counted nothing, reconcile checked no bin, or an output could not be
written (what was written is said, the table is saved elsewhere); 2 bad arguments, output paths included (checked
before the model loads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

from bincounter import calibration, priors
from bincounter import reconcile as rec
from bincounter import recounts, registry, report
from bincounter.deploy import DeployError, endpoint_predictor
from bincounter.predict import find_images, local_predictor, predict_files
from bincounter.counters import BaseCounter, Settings, load

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
    add_target_mix(pr)

    rc = sub.add_parser("reconcile", help="inventory check: expected quantity vs the photo")
    rc.add_argument("--images", required=True, help="folder of bin photos named <image_id>.jpg")
    rc.add_argument("--expected", required=True, help="folder of ABID <image_id>.json metadata, or a CSV "
                                                      "image_id,expected_quantity")
    rc.add_argument("--model", default=DEFAULT_MODEL, help="an MLflow model URI or folder (default %(default)s)")
    rc.add_argument("--threshold", type=probability, default=None,
                    help="flag a bin when p(expected quantity) is below this (default: the model's own threshold, "
                         "chosen on validation for a catch rate; 0.2 for models logged before calibration)")
    add_target_mix(rc)
    rc.add_argument("--report", help="write an HTML report (flagged bins with thumbnails) here")
    rc.add_argument("--recounts", help="write the recount sheet here (.csv): the flagged bins, riskiest first, with "
                                       "an empty `recount` column to fill in and give to ingest (default: beside "
                                       "--report as <report name>.recounts.csv; none without --report)")
    rc.add_argument("--output", help="write the per-bin table to this .csv or .json file")
    rc.add_argument("--log-mlflow", action="store_true", help="log a `reconcile` run with the report and summary")

    for name, helptext in (("promote", "make a version the champion"), ("rollback", "back to the previous champion")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--name", default="bin-counter", help="registered model (default %(default)s)")
        if name == "promote":
            sp.add_argument("--version", required=True)
    return p


def add_target_mix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target_mix", type=mix, default="",
                   help="the mix of counts to answer for (default: the model's own): train (as trained), natural "
                        "(ABID's mix of counts 1-5) or shares of every count like 1:0.12,2:0.22,3:0.26,4:0.23,5:0.17; "
                        "a local --model only")


def load_counter(args: argparse.Namespace) -> tuple[BaseCounter, Settings]:
    """The --model and how it answers: its own settings, the target mix --target_mix when given (checked against
    the model's counts)."""
    counter = load(args.model)
    return counter, counter.settings(Settings(target_mix=args.target_mix or None))


def mix(spec: str) -> str:
    """A --target_mix (train, natural or count:share,...) -> its text, checked by priors.parse_mix when the
    arguments are parsed, before any model loads; empty: the model's own."""
    if str(spec).strip() == "":
        return ""
    try:
        priors.parse_mix(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("target_mix: ")) from None
    return str(spec).strip()


def probability(v: str) -> float:
    """'0.2' -> 0.2, a number in [0, 1]: checked when the arguments are parsed, before any model loads."""
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {v!r}") from None
    if not 0 <= f <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {v!r}")
    return f


def _write(df: pd.DataFrame, path: str) -> None:
    if path.endswith(".json"):
        Path(path).write_text(json.dumps(json.loads(df.to_json(orient="records")), indent=1) + "\n")
    else:
        df.to_csv(path, index=False)
    print(f"wrote {path}")


def _writable(path: str) -> str | None:
    """Why a file cannot be written at `path` (without writing it), or None."""
    p = Path(path)
    if p.is_dir():
        return f"{path} is a folder"
    folder = p.parent
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(p if p.exists() else folder, os.W_OK):
        return f"{p if p.exists() else 'folder ' + str(folder)} is not writable"
    return None


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written before any work is done (exit 2)."""
    if getattr(args, "endpoint", None) and getattr(args, "target_mix", ""):
        parser.error("--target_mix applies to a local --model; an endpoint answers with its model's own mix")
    output = getattr(args, "output", None)
    if output and not output.endswith(OUTPUT_SUFFIXES):
        parser.error(f"--output must end in .csv or .json, got {output}")
    sheet = getattr(args, "recounts", None)
    if sheet and not sheet.lower().endswith(".csv"):
        parser.error(f"--recounts must end in .csv, got {sheet}")
    for option in ("output", "report", "recounts"):
        path = getattr(args, option, None)
        why = path and _writable(path)
        if why:
            parser.error(f"--{option} {path}: {why}")


def sheet_path(args: argparse.Namespace) -> Path | None:
    """Where reconcile writes the recount sheet: --recounts, else `<report stem>.recounts.csv` beside --report,
    else nowhere (None)."""
    if args.recounts:
        return Path(args.recounts)
    if args.report:
        return Path(args.report).with_name(f"{Path(args.report).stem}.recounts.csv")
    return None


def _save_elsewhere(df: pd.DataFrame) -> None:
    """After a failed write: keep the table in a new file in the temp folder and say where."""
    fd, path = tempfile.mkstemp(prefix="bincounter-", suffix=".csv")
    os.close(fd)
    df.to_csv(path, index=False)
    print(f"bincounter: the table is saved in {path}", file=sys.stderr)


def predict(args: argparse.Namespace) -> None:
    paths = find_images(args.images)
    if not paths:
        raise ValueError(f"no images in {' '.join(args.images)}")
    if args.endpoint:
        counter, settings, predictor = None, None, endpoint_predictor(args.endpoint, args.region)
    else:
        counter, settings = load_counter(args)
        predictor = local_predictor(counter, settings)
    table = predict_files(paths, predictor)
    with pd.option_context("display.max_rows", None, "display.max_colwidth", 80, "display.width", 200):
        print(table[["image", "count", "confidence", *(["review"] if "review" in table else []), "error"]]
              .fillna({"error": ""}).to_string(index=False))
    bad = int(table["error"].notna().sum())
    review = f", {int(table['review'].fillna(False).sum())} flagged for review" if "review" in table else ""
    print(f"{len(table) - bad} counted, {bad} unreadable{review}")
    if counter is not None:
        print(calibration.describe_review(counter.trust, settings.target_mix))
    if args.output:
        _write(table, args.output)
    if bad == len(table):
        raise ValueError(f"none of the {bad} images could be counted")
    if bad:
        print(f"bincounter predict: {bad} of {len(table)} images could not be counted (see the error column)",
              file=sys.stderr)


def reconcile(args: argparse.Namespace) -> None:
    if not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images} is not a folder")
    expected, bad_metadata = rec.read_expected(args.expected)
    counter, settings = load_counter(args)
    threshold = counter.trust.check_threshold if args.threshold is None else args.threshold
    promise = calibration.describe_check(counter.trust, threshold, settings.target_mix)
    df = rec.reconcile(find_images([args.images]), expected, bad_metadata, local_predictor(counter, settings),
                       threshold)
    stats = rec.summary(df, threshold)
    # the flagged bins, riskiest first; absolute photo paths: the sheet is filled in, and read back by ingest,
    # from anywhere
    sheet = recounts.recount_sheet(df.assign(path=[p if pd.isna(p) else str(Path(p).resolve()) for p in df["path"]]))
    with pd.option_context("display.max_rows", None, "display.width", 200):
        if len(sheet):
            print(sheet[["rank", "image_id", "expected_quantity", "predicted", "p_expected"]].to_string(index=False))
    print("  ".join(f"{k}={v}" if not isinstance(v, float) else f"{k}=n/a (no bin checked)" if v != v
                    else f"{k}={v:.3f}" for k, v in stats.items()))
    for line in rec.problems(df):
        print(line, file=sys.stderr)
    print(promise)
    # the finished table first, then what derives from it; one failed write never stops the others
    failed, report_path, table_written, sheet_written = [], None, False, None
    if args.output:
        try:
            _write(df, args.output)
            table_written = True
        except OSError as e:
            failed.append(f"--output {args.output}: {e.strerror or e}")
    if sheet_path(args):
        try:
            sheet_written = recounts.write_sheet(sheet, sheet_path(args))
            print(f"wrote {sheet_written}: {len(sheet)} bin{'' if len(sheet) == 1 else 's'} to recount, riskiest "
                  "first (fill in the recount column)")
        except OSError as e:
            failed.append(f"--recounts {sheet_path(args)}: {e.strerror or e}")
    if args.report:
        try:
            link = sheet_written and os.path.relpath(sheet_written.resolve(), Path(args.report).resolve().parent)
            Path(args.report).write_text(report.html_report(df, stats, args.model, promise, link or None))
            report_path = Path(args.report)
            print(f"wrote {report_path}")
        except (OSError, ValueError) as e:  # ValueError: an image unreadable since it was counted
            failed.append(f"--report {args.report}: {getattr(e, 'strerror', None) or e}")
    if args.log_mlflow:
        try:
            run_id = report.log_run(df, stats, report_path, {"model": args.model, "images": args.images,
                                                             "expected": args.expected, "threshold": threshold,
                                                             "target_mix": settings.target_mix}, sheet)
            print(f"logged run {run_id}")
        except (OSError, MlflowException) as e:
            failed.append(f"--log-mlflow: {e.message if isinstance(e, MlflowException) else e}")
    if failed:
        if not table_written:
            _save_elsewhere(df)
        raise OSError("could not write " + "; ".join(failed))
    if not stats["bins_checked"] and not stats["outside_model_range"]:
        raise ValueError("no bin could be checked (no photo with a usable expected quantity was read)")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
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
