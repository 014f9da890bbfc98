"""Batch scoring throughput: the `score` step's library on Spark in local mode against `bincounter predict`'s
path (counters.load + predict.predict_files), on the same photos and the same model, on this machine.

The model: an untrained network of `--arch` at `--image_size` (weights none: the same arithmetic as a trained
one), logged as the project's pyfunc in a store of its own. The photos: the first `--images` of
../shared/abid-sample/bin-images (a folder of links). Each side runs `--repeats` times, alternating (the machine
is shared); the best run of each counts.
- predict: load the model, count the folder (one process; torch's threads over all cores).
- score, job: the Spark job (`seconds` of bincounter.score.score: Python workers start, one model load per
  partition, read + check + forward + Parquet); score, end to end: plus the once-per-process costs (SparkSession
  start, listing, the model checked on the driver) of the first run.
Prints a table and writes bench/results/score.json.

    python bench/score.py --images 256 --arch resnet50 --image_size 224
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "abid-sample" / "bin-images"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--master", default="local[*]")
    p.add_argument("--batch_size", type=int, default=64, help="score's photos per model call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "score.json"))
    return p


def log_model(arch: str, image_size: int, example: Path) -> str:
    import mlflow

    from bincounter.model import build_model
    from bincounter.train_log import log_trained_model
    from bincounter.train_config import TrainConfig

    cfg = TrainConfig(arch=arch, weights="none", image_size=image_size, classes=[1, 2, 3, 4, 5])
    with mlflow.start_run() as run:
        log_trained_model({"model": build_model(arch, 5, weights="none"), "best_epoch": 0}, cfg, str(example))
    return f"runs:/{run.info.run_id}/model"


def main(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"  # nothing lands in the user's store
        os.chdir(tmp)
        from bincounter import score, spark_job
        from bincounter.predict import find_images, local_predictor, predict_files
        from bincounter.counters import load

        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in sorted(SAMPLE.glob("*.jpg"))[:args.images]:
            (folder / p.name).symlink_to(p)
        model_uri = log_model(args.arch, args.image_size, next(folder.iterdir()))

        t0 = time.perf_counter()
        photos = score.list_photos(str(folder))
        model = score.check_model(model_uri)
        spark = spark_job.spark_session(args.master, args.batch_size)
        once = time.perf_counter() - t0

        runs = {"predict": [], "score_job": []}
        for k in range(args.repeats):
            start = time.perf_counter()
            table = predict_files(find_images([folder]), local_predictor(load(model_uri)))
            runs["predict"].append(time.perf_counter() - start)
            assert table["error"].isna().all()
            stats = score.score(spark, photos, model, str(Path(tmp) / "out"))
            runs["score_job"].append(stats["seconds"])
            assert stats["rows"] == stats["scored"] == len(table)
            print(f"repeat {k + 1}: predict {runs['predict'][-1]:.1f} s, score job {stats['seconds']:.1f} s", flush=True)
        n = len(photos.rows)
        best = {k: min(v) for k, v in runs.items()}
        result = {
            "images": n, "model": f"{args.arch} {args.image_size} px (weights none)", "master": args.master,
            "partitions": stats["partitions"], "batch_size": args.batch_size, "cpus": os.cpu_count(),
            "seconds": runs, "spark_once_seconds": round(once, 2),
            "predict_images_per_s": round(n / best["predict"], 2),
            "score_job_images_per_s": round(n / best["score_job"], 2),
            "score_end_to_end_images_per_s": round(n / (best["score_job"] + once), 2),
        }
        result["ratio_job"] = round(result["score_job_images_per_s"] / result["predict_images_per_s"], 3)
        result["ratio_end_to_end"] = round(result["score_end_to_end_images_per_s"] / result["predict_images_per_s"], 3)
        spark.stop()
    print(f"\n{n} photos, {result['model']}, {args.master} ({result['partitions']} partitions), {os.cpu_count()} CPUs")
    print("| path | images/s | vs predict |\n|---|---|---|")
    print(f"| bincounter predict (load + count) | {result['predict_images_per_s']} | 1.0 |")
    print(f"| score, the Spark job | {result['score_job_images_per_s']} | {result['ratio_job']} |")
    print(f"| score, with the session start ({once:.1f} s) | {result['score_end_to_end_images_per_s']} | "
          f"{result['ratio_end_to_end']} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
