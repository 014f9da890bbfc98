"""Learning from few real bins: each training lever measured on held-out real ABID bins, through the steps.

Runs the project's own entry points (`mlflow run . -e ...`): ingest the real sample (`--data_dir`, counts 1-5)
-> split (60/20/20, stratified, seeded) -> for every config: train (by default resnet18 from scratch; the lite0
configs fine-tune ImageNet EfficientNet-Lite0 from its wheel, offline), evaluate on
the test split four ways: the most likely count (argmax) or the median of the predicted distribution, each
without and with test-time augmentation (evaluate's `decision` and `tta`: the same trained model). A config
with `pretrain` first trains on generated bins and fine-tunes from that model (`weights=runs:/<id>/model`).
Prints a table with the majority baseline and a second yardstick: hand-made image features (gradient
orientation histograms on a 4x4 grid, colour histograms) with a logistic regression, C chosen on val;
results go to bench/results/few_real.jsonl, and a rerun skips the configs already there (same settings).
For every config, and alone for given train runs (`--trust_of`), a second table says how far the probabilities
can be trusted on the test split, as the product was before calibration and as it is now: ECE, NLL, selective
accuracy, the inventory check as a detector and at its threshold, with bootstrap standard errors.

    MLFLOW_TRACKING_URI=sqlite:///bench.db python bench/few_real.py --configs plain,levers,lite0,lite0-levers
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "few_real.jsonl"
LEVERS = {"ordinal_weight": 1.0, "label_smoothing": 0.1, "balanced": "true", "augment": "strong",
          "warmup_epochs": 2}
LITE = {"arch": "efficientnet_lite0", "weights": "imagenet", "image_size": 224, "epochs": 8, "patience": 0,
        "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "warmup_epochs": 1, "batch_size": 32}
TRANSFER = {"freeze_epochs": 1, "backbone_lr": 0.3, "bn": "frozen"}
RECIPE = {**LITE, "freeze_epochs": 1, "backbone_lr": 0.3, "decision": "median", "tta": "true"}
CONFIGS = {  # name -> train parameters on top of the common ones; "pretrain" -> generated bins first
    "plain": {},
    "levers": LEVERS,
    "levers-no-ordinal": {**LEVERS, "ordinal_weight": 0.0},
    "levers-no-balanced": {**LEVERS, "balanced": "false"},
    "levers-light-augment": {**LEVERS, "augment": "light"},
    "levers-no-smoothing": {**LEVERS, "label_smoothing": 0.0},
    "pretrain+levers": {**LEVERS, "pretrain": {"num_images": 3000, "epochs": 4}},
    "pretrain+plain": {"pretrain": {"num_images": 3000, "epochs": 4}},
    "levers-long": {**LEVERS, "epochs": 60, "patience": 15},
    # the from-scratch recipe (docs/real-bins.md): the levers, and the model answers the median with test-time augmentation
    "recipe": {**LEVERS, "tta": "true", "decision": "median"},
    # ImageNet EfficientNet-Lite0 from its wheel, fine-tuned (docs/real-bins.md)
    "lite0": LITE,
    "lite0-probe": {**LITE, "freeze": "true"},
    "lite0-levers": {**LITE, **TRANSFER},
    # the Lite0 recipe as docs/real-bins.md writes it: head first, a lower backbone rate, the median answer with TTA
    "lite0-recipe": RECIPE,
    "lite0-head-first": {**LITE, "freeze_epochs": 1},
    "lite0-backbone-lr": {**LITE, "backbone_lr": 0.3},
    "lite0-bn-frozen": {**LITE, "bn": "frozen"},
    "lite0-288": {**LITE, "image_size": 288},  # needs a split ingested at --ingest_size 320
    "lite0-levers-288": {**LITE, **TRANSFER, "image_size": 288},
    # issue 19's lever study: the Lite0 recipe plus one lever each
    "recipe-bn-frozen": {**RECIPE, "bn": "frozen"},
    "recipe-256": {**RECIPE, "image_size": 256},  # the ingest cache's own size: nothing upsampled
    "recipe-288": {**RECIPE, "image_size": 288},  # needs a split ingested at --ingest_size 320
    "recipe-lite1": {**RECIPE, "arch": "efficientnet_lite1", "image_size": 240},
    "recipe-lite2": {**RECIPE, "arch": "efficientnet_lite2", "image_size": 260},  # --ingest_size 320 too
    "recipe-long": {**RECIPE, "epochs": 16},
    "recipe-bn-frozen-long": {**RECIPE, "bn": "frozen", "epochs": 16},  # bn=frozen was still learning at epoch 8
    "recipe-ema": {**RECIPE, "ema": 0.98},
    "recipe-mixup": {**RECIPE, "mixup": 0.2},
    "recipe-trivial": {**RECIPE, "augment": "trivial"},
    "recipe-progressive": {**RECIPE, "start_size": 160},
    # ImageNet, then generated bins (a short pass: 900 training images, 3 epochs), then the real ones
    "recipe-pretrain": {**RECIPE, "pretrain": {"num_images": 1500, "epochs": 3}},
}


WAYS = {"argmax": ("false", "argmax"), "argmax+tta": ("true", "argmax"), "median": ("false", "median"),
        "median+tta": ("true", "median")}  # column -> evaluate's (tta, decision)


def mlflow_run(entry: str, params: dict, log: Path) -> str:
    """`mlflow run . -e entry -P k=v ...` with output appended to `log` -> the run id. Raises on failure."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        # the steps run as `python -m steps.<entry>`: this interpreter's, as `make` does with the venv
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    with log.open() as f:  # this command's output only
        f.seek(start)
        ids = re.findall(r"Run \(ID '(\w+)'\) succeeded", f.read())
    if done.returncode or not ids:
        raise RuntimeError(f"{entry} failed (exit {done.returncode}); see {log}")
    return ids[-1]


def metrics_of(run_id: str) -> dict:
    """A run's latest metric values."""
    return mlflow.get_run(run_id).data.metrics


def run_config(name: str, spec: dict, common: dict, split_id: str, args, log: Path) -> dict:
    """Train one config on the real split (after pre-training on generated bins when it says so) and score it
    -> its results row."""
    params = {**common, **{k: v for k, v in spec.items() if k != "pretrain"}}
    start = time.time()
    if "pretrain" in spec:
        pre = spec["pretrain"]
        ing = mlflow_run("ingest", {"source": "synthetic", "num_images": pre["num_images"],
                                    "cache_dir": args.cache_dir, "seed": args.seed}, log)
        syn_split = mlflow_run("split", {"ingest_run_id": ing, "seed": args.seed}, log)
        syn = mlflow_run("train", {"split_run_id": syn_split, **common, "epochs": pre["epochs"], "patience": 0,
                                   **{k: params[k] for k in ("arch", "weights", "image_size")}}, log)
        params["weights"] = f"runs:/{syn}/model"
    train = mlflow_run("train", {"split_run_id": split_id, **params}, log)
    row = {"config": name, "params": spec, "common": common, "split_run_id": split_id,
           **evaluate_ways(train, split_id, log, args.ways), "trust": trust_of(train, split_id, log)}
    row["minutes"] = round((time.time() - start) / 60, 1)
    return row


def evaluate_ways(train: str, split_id: str, log: Path, ways=tuple(WAYS)) -> dict:
    """A train run's model scored on the split's test data in each of `ways` of answering."""
    row = {"train_run_id": train, "best_epoch": int(metrics_of(train)["best_epoch"]),
           "epochs_run": len(mlflow.MlflowClient().get_metric_history(train, "val_loss"))}
    for key in ways:
        tta, decision = WAYS[key]
        ev = metrics_of(mlflow_run("evaluate", {"model_uri": f"runs:/{train}/model", "split_run_id": split_id,
                                                "tta": tta, "decision": decision}, log))
        row[key] = {k[5:]: ev[k] for k in ("test_accuracy", "test_rmse", "test_mae", "test_within1_accuracy")}
        row["baseline"] = {k[9:]: ev[k] for k in ("baseline_accuracy", "baseline_rmse", "baseline_mae",
                                                   "baseline_within1_accuracy")}
        row["test_size"] = int(ev["test_size"])
    return row


TRUST = {"accuracy": "accuracy", "ece": "ECE", "nll": "NLL", "selective_accuracy_25": "acc. of surest 25 %",
         "selective_accuracy_50": "acc. of surest 50 %", "check_auc": "check AUC", "check_auc_off2": "check AUC (off by 2+)",
         "check_catch_off2": "off by 2+ flagged", "check_false_alarm": "right records flagged",
         "review_rate": "counts to review", "unflagged_accuracy": "acc. of the rest"}


def trust_of(train: str, split_id: str, log: Path, resamples: int = 500) -> dict:
    """A train run's model on the split's test data as it was trained (its tta and decision), as the product
    was before calibration (temperature 1, reconcile's old threshold 0.2, no review flag) and as it is now (the
    model's temperature and the thresholds chosen on validation) -> {before, after: {figure: (value, bootstrap
    standard error)}, thresholds}."""
    import numpy as np
    import pandas as pd

    from bincounter import calibration
    from bincounter.runs import local_file

    m = metrics_of(train)
    curves = {}
    out = {"train_run_id": train, "temperature": m.get("temperature", 1.0),
           "check_threshold": m.get("check_threshold", calibration.DEFAULT_CHECK_THRESHOLD),
           "review_confidence": m.get("review_confidence", 0.0)}
    for key, calibrated in (("before", "false"), ("after", "true")):
        ev = mlflow_run("evaluate", {"model_uri": f"runs:/{train}/model", "split_run_id": split_id,
                                     "calibrated": calibrated}, log)
        with local_file(f"runs:/{ev}/predictions.csv") as path:
            preds = pd.read_csv(path)
        classes = sorted(int(c[2:]) for c in preds.columns if c.startswith("p_"))
        preds = preds[preds["error"].isna() & preds["count"].isin(classes)].reset_index(drop=True)
        if key == "before":
            preds["review"] = False
        threshold = out["check_threshold"] if key == "after" else calibration.DEFAULT_CHECK_THRESHOLD

        def figures(rows):
            probs, y, right, conf, review = calibration.table_arrays(rows, classes)
            return {"accuracy": float(right.mean()),
                    **calibration.trust_metrics(probs, y, right, conf, review, classes, threshold)}

        curves[key] = calibration.table_arrays(preds, classes)
        rng = np.random.default_rng(0)
        boots = [figures(preds.iloc[rng.integers(0, len(preds), len(preds))]) for _ in range(resamples)]
        value = figures(preds)
        out[key] = {k: (v, float(np.nanstd([b[k] for b in boots]))) for k, v in value.items() if k in TRUST}
        out["test_size"] = len(preds)
    plot_trust(curves, RESULTS.parent / f"trust_{train}")
    return out


def plot_trust(curves: dict, prefix: Path) -> None:
    """The test split's reliability diagram before and after calibration, and the coverage curve after it, as
    <prefix>_reliability.png and <prefix>_coverage.png."""
    from bincounter import calibration, metrics

    (bp, by, *_), (ap, ay, right, conf, review) = curves["before"], curves["after"]
    metrics.plot_reliability(calibration.reliability(bp, by), calibration.reliability(ap, ay), "real test bins") \
        .savefig(f"{prefix}_reliability.png", dpi=100)
    cov, acc = calibration.coverage_curve(conf, right)
    metrics.plot_coverage(cov, acc, float(1 - review.mean()), "real test bins").savefig(f"{prefix}_coverage.png", dpi=100)


def trust_table(rows: list[dict]) -> str:
    """One row per model and state (before / after calibration): each figure with its standard error."""
    out = ["| model | | " + " | ".join(TRUST.values()) + " |", "|---" * (len(TRUST) + 2) + "|"]
    for r in rows:
        for key in ("before", "after"):
            t = r["trust"]
            label = ("T = 1, threshold 0.2" if key == "before" else
                     f"T = {t['temperature']:.2f}, threshold {t['check_threshold']:.3f}, review < {t['review_confidence']:.2f}")
            out.append(f"| {r['config']} | {label} | "
                       + " | ".join(f"{t[key][k][0]:.3f} ± {t[key][k][1]:.3f}" if t[key][k][0] == t[key][k][0]
                                    else "-" for k in TRUST) + " |")
    return "\n".join(out)


def features(path: str) -> list[float]:
    """An image -> 152 hand-made numbers: edge strength per orientation (8) in each cell of a 4x4 grid, an
    8-bin histogram per colour channel, mean edge strength, edge density, grey-level spread."""
    import numpy as np
    from PIL import Image

    im = np.asarray(Image.open(path).convert("RGB").resize((128, 128)), dtype=np.float32) / 255
    g = im.mean(2)
    gy, gx = np.gradient(g)
    mag, ang = np.hypot(gx, gy), ((np.arctan2(gy, gx) % np.pi) / np.pi * 8).astype(int).clip(0, 7)
    out = []
    for i in range(4):
        for j in range(4):
            cell = (slice(i * 32, (i + 1) * 32), slice(j * 32, (j + 1) * 32))
            out += list(np.bincount(ang[cell].ravel(), weights=mag[cell].ravel(), minlength=8))
    for c in range(3):
        out += list(np.histogram(im[..., c], bins=8, range=(0, 1))[0] / g.size)
    return out + [float(mag.mean()), float((mag > 0.1).mean()), float(g.std())]


def feature_probe(split_id: str) -> dict:
    """Hand-made features + logistic regression on the same split: how much a simple model finds."""

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bincounter.metrics import count_metrics
    from bincounter.model import decide
    from bincounter.runs import read_split

    dfs = {k: read_split(split_id, k) for k in ("train", "val", "test")}
    x = {k: np.array([features(p) for p in d["path"]]) for k, d in dfs.items()}
    y = {k: d["count"].to_numpy() for k, d in dfs.items()}
    fits = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x["train"], y["train"])
            for c in (0.01, 0.1, 1.0)]
    best = min(fits, key=lambda m: log_loss(y["val"], m.predict_proba(x["val"]), labels=m.classes_))
    probs, classes = best.predict_proba(x["test"]), best.classes_
    row = {"config": "hand-made features + logistic regression", "epochs_run": "-", "best_epoch": "-"}
    for way in ("argmax", "median"):
        row[way] = count_metrics(y["test"], classes[decide(probs, way)])
    return row


def table(rows: list[dict]) -> str:
    """accuracy / RMSE per way of answering, MAE and within-one for the median with TTA."""
    out = ["| config | epochs (best) | " + " | ".join(f"{w}: acc / RMSE" for w in WAYS)
           + " | median+tta: MAE / within 1 | minutes |", "|---" * (len(WAYS) + 4) + "|"]
    if rows:
        b = rows[0]["baseline"]
        base = f"{b['accuracy']:.3f} / {b['rmse']:.3f}"
        out.append("| majority baseline | - | " + " | ".join([base] * len(WAYS))
                   + f" | {b['mae']:.3f} / {b['within1_accuracy']:.3f} | - |")
    for r in rows:
        cells = [f"{r[w]['accuracy']:.3f} / {r[w]['rmse']:.3f}" if w in r else "-" for w in WAYS]
        m = r.get("median+tta") or r.get("median") or r["baseline"]
        epochs = f"{r['epochs_run']} ({r['best_epoch']})" if "train_run_id" in r else "-"
        out.append(f"| {r['config']} | {epochs} | " + " | ".join(cells)
                   + f" | {m['mae']:.3f} / {m['within1_accuracy']:.3f} | {r['minutes']:.1f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "abid-sample"))
    p.add_argument("--split_run_id", default="", help="reuse this split of the real sample instead of ingesting")
    p.add_argument("--configs", default="plain,levers", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--cache_dir", default=str(ROOT / "data"))
    p.add_argument("--ingest_size", type=int, default=256, help="ingest's image_size (the cache's short side)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log", default=str(ROOT / "bench" / "results" / "few_real.log"))
    p.add_argument("--ways", type=lambda s: s.split(","), default=list(WAYS),
                   help=f"comma-separated ways of answering to evaluate, of {list(WAYS)} (each about a minute)")
    p.add_argument("--probe", type=int, default=1, help="1: add the hand-made-features yardstick (about a minute)")
    p.add_argument("--trust_of", default="", help="comma-separated train runs (of --split_run_id): only measure "
                   "how far their probabilities can be trusted, before and after calibration")
    args = p.parse_args()
    if args.trust_of:
        rows = [{"config": mlflow.get_run(t).info.run_name, "trust": trust_of(t, args.split_run_id, Path(args.log))}
                for t in args.trust_of.split(",")]
        print(f"held-out real bins: {rows[0]['trust']['test_size']} test images of split run {args.split_run_id}; "
              "± one bootstrap standard error")
        print(trust_table(rows))
        return
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    if "MLFLOW_TRACKING_URI" not in os.environ:
        sys.exit("set MLFLOW_TRACKING_URI (e.g. sqlite:///bench.db): the steps talk through it")
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    split_id = args.split_run_id
    if not split_id:
        ing = mlflow_run("ingest", {"source": "local", "data_dir": args.data_dir, "file_list": "all",
                                    "cache_dir": args.cache_dir, "image_size": args.ingest_size, "seed": args.seed}, log)
        split_id = mlflow_run("split", {"ingest_run_id": ing, "seed": args.seed}, log)
    common = {"arch": args.arch, "weights": "none", "image_size": args.image_size, "epochs": args.epochs,
              "patience": args.patience, "seed": args.seed}
    done = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    rows = []
    for name in names:
        prev = next((r for r in done if r["config"] == name and r["common"] == common and r["params"] == CONFIGS[name]
                     and r["split_run_id"] == split_id), None)
        if prev:
            print(f"few_real: {name}: already measured (train run {prev['train_run_id']})")
            rows.append(prev)
            continue
        print(f"few_real: {name}: training ({CONFIGS[name] or 'defaults'}); log {log}", flush=True)
        row = run_config(name, CONFIGS[name], common, split_id, args, log)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(table(rows), flush=True)
    if args.probe:
        start = time.time()
        rows.append({**feature_probe(split_id), "minutes": (time.time() - start) / 60})
    print(f"\nheld-out real bins: {rows[0]['test_size'] if rows else 0} test images of split run {split_id}; "
          f"unless a config says otherwise {args.arch}, {args.image_size} px, weights none, at most {args.epochs} "
          f"epochs (patience {args.patience})")
    print(table(rows))
    trusted = [r for r in rows if "trust" in r]
    if trusted:
        print("\nhow far the probabilities can be trusted, before and after calibration (± bootstrap SE):")
        print(trust_table(trusted))


if __name__ == "__main__":
    main()
