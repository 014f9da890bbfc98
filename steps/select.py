"""select: choose a subset of ABID into a file_list.json.

Reads: a label index CSV (`image_id,expected_quantity`) or, with `--labels s3`, the bucket's metadata.
Logs: `file_list.json` ({"<count>": ["metadata/<id>.json", ...]}), metrics `selected_<count>`.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import tempfile
from pathlib import Path

import mlflow

from bincounter import abid, entry
from bincounter.runs import start_step
from steps.options import csv_ints, whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="select", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default="s3", help="label index CSV, or `s3` to scan the bucket's `metadata/`")
    p.add_argument("--endpoint_url", default="", help="S3 endpoint override (e.g. a local emulator)")
    p.add_argument("--count_min", type=whole, default=1, help="smallest count")
    p.add_argument("--count_max", type=whole, default=5, help="largest count")
    p.add_argument("--per_count", type=csv_ints, default=csv_ints("1228,2299,2666,2373,1875"),
                   help="images per count, one number for all counts or one per count")
    p.add_argument("--output", default="file_list.json", help="also write the list here (empty: do not)")
    p.add_argument("--seed", type=whole, default=42, help="seeds the choice")
    return p


def per_count_map(args) -> dict[int, int]:
    counts = list(range(args.count_min, args.count_max + 1))
    if not counts:
        raise ValueError(f"count_min {args.count_min} is above count_max {args.count_max}")
    n = args.per_count
    if len(n) == 1:
        n = n * len(counts)
    if len(n) != len(counts):
        raise ValueError(f"per_count has {len(n)} numbers for {len(counts)} counts {counts[0]}..{counts[-1]}")
    if any(x < 0 for x in n):
        raise ValueError(f"per_count {args.per_count} has a negative number")
    return dict(zip(counts, n))


def main(args: argparse.Namespace) -> dict[int, list[str]]:
    quotas = per_count_map(args)
    if args.labels == "s3":
        from bincounter.bucket_scan import scan_bucket_counts
        labels = scan_bucket_counts(quotas, seed=args.seed, endpoint_url=args.endpoint_url or None)
    else:
        labels = abid.read_label_index(args.labels)
    selection = abid.select_subset(labels, quotas, args.seed)
    with start_step("select", vars(args)):
        for c, ids in selection.items():
            mlflow.log_metric(f"selected_{c}", len(ids))
            if len(ids) < quotas[c]:
                print(f"select: only {len(ids)} images with count {c} (asked for {quotas[c]})")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "file_list.json"
            abid.write_file_list(selection, path)
            mlflow.log_artifact(str(path))
            if args.output:
                Path(args.output).write_bytes(path.read_bytes())
    print(f"select: {sum(map(len, selection.values()))} images over counts {sorted(selection)}")
    return selection


if __name__ == "__main__":
    entry.run(main, get_args_parser())
