"""What an ensemble buys against what it costs: its members and the ensemble scored on the same photos.

For each model (the members, then the ensemble): images/s of the one prediction path (predict.predict: decode,
resize, forward, calibrate, decide) on `--images` photos, best of `--repeats`, against the first member in the
same run; and, when the evaluate runs of each are given (`--evaluations`, in the same order), their test figures.

    MLFLOW_TRACKING_URI=sqlite:///bench.db python bench/ensemble.py --ensemble runs:/<ensemble run>/model \
        --images ../shared/abid-sample/bin-images --limit 64 --evaluations <eval 1>,<eval 2>,<eval ensemble>
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow

from bincounter import counters
from bincounter.predict import predict

FIGURES = ("test_accuracy", "test_rmse", "test_ece", "test_check_auc_off2", "test_check_false_alarm")


def rate(counter: counters.BaseCounter, images: list[bytes], repeats: int) -> float:
    """Images per second of predict.predict over `images`, best of `repeats` (after one warm-up)."""
    predict(counter, images[:2])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict(counter, images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True, help="the ensemble's model URI")
    p.add_argument("--images", required=True, help="a folder of photos")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--evaluations", default="", help="evaluate run ids: each member's, then the ensemble's")
    args = p.parse_args()
    ensemble = counters.load(args.ensemble)
    if not isinstance(ensemble, counters.Ensemble):
        raise SystemExit(f"{args.ensemble} is not an ensemble")
    images = [f.read_bytes() for f in sorted(Path(args.images).glob("*.jpg"))[:args.limit]]
    names = [f"member {i} ({m['run_id'][:8]})" for i, m in enumerate(ensemble.config["members"])] + ["ensemble"]
    rates = [rate(m, images, args.repeats) for m in ensemble.members] + [rate(ensemble, images, args.repeats)]
    evals = [mlflow.get_run(e).data.metrics for e in args.evaluations.split(",")] if args.evaluations else []
    print(f"{len(images)} photos from {args.images}; best of {args.repeats}")
    print("| model | images/s | vs member 0 | " + " | ".join(FIGURES) + " |")
    print("|---" * (len(FIGURES) + 3) + "|")
    for i, (name, r) in enumerate(zip(names, rates)):
        figures = [f"{evals[i][k]:.3f}" if i < len(evals) and k in evals[i] else "-" for k in FIGURES]
        print(f"| {name} | {r:.1f} | {r / rates[0]:.2f} | " + " | ".join(figures) + " |")


if __name__ == "__main__":
    main()
