"""What a recount is worth: recount the N bins the inventory check flags, riskiest first, or N bins at random,
fine-tune the model on its old training bins plus those recounts, and score both on bins neither saw.

    python bench/recounts.py --model_uri models:/bin-counter@champion --split_run_id <its split run> \
        --recounts 50,100,200 --wrong 0.2 --seeds 0

The true counts of real bins stand in for a person's recount. The split's test part is cut in two, stratified by
count and source: the *check* half gets inventory records of which `wrong` are off by one or more (the rest true),
the model checks them, and N of them are recounted; the *score* half is what every model is scored on. The
control is the same fine-tuning on the same replayed training bins with no recount, so the table's gains are what
the recounts add beyond the fine-tuning itself. Standard errors: paired bootstrap over the score half's bins.
Prints a markdown table and writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from bincounter import counters
from bincounter.manifest import stratified_split
from bincounter.predict import predict_manifest
from bincounter.reconcile import check
from bincounter.runs import read_split
from bincounter.train_config import TrainConfig
from bincounter.training import train_run

RAW = counters.Settings(calibrated=False, tta=False)  # every model answers alike (its own temperature would favour
# the base), on the photo alone (the mirror image doubles the time, and it is alike for all)


def setup(args) -> dict:
    """The base model, its config and the parts of the split: check half, score half, replay pool, validation."""
    counter = counters.load(args.model_uri)
    parts = {k: read_split(args.split_run_id, k) for k in ("train", "val", "test")}
    halves = stratified_split(parts["test"], (0.5, 0.0, 0.5), seed=args.split_seed)
    if args.bins:  # a quick look: fewer bins in each half
        halves = {k: v.sample(n=min(args.bins, len(v)), random_state=args.split_seed) for k, v in halves.items()}
    val = parts["val"].sample(n=min(args.val_bins, len(parts["val"])), random_state=args.split_seed)
    return {"counter": counter, "check": halves["train"], "score": halves["test"], "train": parts["train"],
            "val": val}


def wrong_records(df: pd.DataFrame, classes: list[int], share: float, rng) -> dict[str, int]:
    """Inventory records for `df`'s bins: `share` of them off by one or more (another of the model's counts)."""
    expected = dict(zip(df["image_id"], df["count"].astype(int)))
    for i in rng.choice(df["image_id"].to_numpy(), size=round(share * len(df)), replace=False):
        expected[i] = int(rng.choice([c for c in classes if c != expected[i]]))
    return expected


def riskiest_first(counter, df: pd.DataFrame, expected: dict[str, int]) -> pd.DataFrame:
    """The inventory check of the check half -> its checked bins, lowest p(expected quantity) first."""
    preds = predict_manifest(counter, df, counters.Settings())
    checked = check(preds, expected, {}, counter.trust.check_threshold)
    return checked[checked["status"] == "checked"].sort_values(["p_expected", "image_id"], kind="stable")


def fine_tune(cfg: TrainConfig, replay: pd.DataFrame, recounted: pd.DataFrame, val: pd.DataFrame, name: str):
    """The model fine-tuned on replayed training bins plus recounted ones (true counts) -> nn.Module."""
    with mlflow.start_run(run_name=name):
        mlflow.log_params({"recounted": len(recounted), "replay": len(replay)})
        result = train_run(cfg, pd.concat([replay, recounted], ignore_index=True), val, resume=False,
                           checkpoint=False)
    return result["model"]


def score(counter, df: pd.DataFrame) -> np.ndarray:
    """-> per bin of `df`: 1 where the model's count is right, and the squared error (two rows)."""
    preds = predict_manifest(counter, df, RAW)
    count = preds["count"].astype(float).to_numpy()
    truth = df["count"].to_numpy(float)
    return np.vstack([count == truth, (count - truth) ** 2])


def figures(per_bin: np.ndarray, control: np.ndarray, rng, n_boot: int = 1000) -> dict:
    """Accuracy and RMSE, and their differences from the control, with paired bootstrap standard errors."""
    idx = rng.integers(0, per_bin.shape[1], size=(n_boot, per_bin.shape[1]))
    acc, ctl = per_bin[0][idx].mean(1), control[0][idx].mean(1)
    rmse, ctl_rmse = np.sqrt(per_bin[1][idx].mean(1)), np.sqrt(control[1][idx].mean(1))
    return {"accuracy": float(per_bin[0].mean()), "accuracy_se": float(acc.std()),
            "rmse": float(np.sqrt(per_bin[1].mean())), "rmse_se": float(rmse.std()),
            "gain": float(per_bin[0].mean() - control[0].mean()), "gain_se": float((acc - ctl).std()),
            "rmse_change": float(np.sqrt(per_bin[1].mean()) - np.sqrt(control[1].mean())),
            "rmse_change_se": float((rmse - ctl_rmse).std())}


def run_seed(args, data: dict, seed: int) -> list[dict]:
    """One seed: the records, the check, the control and, per N, the flagged and the random recounts."""
    counter, rng = data["counter"], np.random.default_rng(seed)
    classes = counter.classes
    expected = wrong_records(data["check"], classes, args.wrong, rng)
    truth = dict(zip(data["check"]["image_id"], data["check"]["count"].astype(int)))
    ranked = riskiest_first(counter, data["check"], expected)
    cfg = base_config(counter.config, args, seed)
    replay = data["train"].sample(n=min(args.replay, len(data["train"])), random_state=seed)
    bins = data["check"].set_index("image_id")
    rows, t0 = [], time.time()
    control = score(counters.BinCounter(fine_tune(cfg, replay, bins.iloc[:0].reset_index(), data["val"],
                                                 f"control seed={seed}"), counter.config), data["score"])
    base = score(counter, data["score"])
    rows.append({"seed": seed, "choice": "none (the base model)", "n": 0, **figures(base, control, rng)})
    rows.append({"seed": seed, "choice": "none (fine-tuned, no recount)", "n": 0, **figures(control, control, rng)})
    for n in args.recounts:
        chosen = {"flagged": ranked["image_id"].head(n).tolist(),
                  "random": rng.choice(data["check"]["image_id"].to_numpy(), size=n, replace=False).tolist()}
        for how, ids in chosen.items():
            recounted = bins.loc[ids].reset_index().assign(count=[truth[i] for i in ids])
            model = fine_tune(cfg, replay, recounted, data["val"], f"{how} n={n} seed={seed}")
            per_bin = score(counters.BinCounter(model, counter.config), data["score"])
            found = sum(expected[i] != truth[i] for i in ids)
            flagged = int(ranked.set_index("image_id").loc[ids, "flagged"].sum()) if how == "flagged" else None
            rows.append({"seed": seed, "choice": how, "n": n, "wrong_found": found, "flagged_among": flagged,
                         **figures(per_bin, control, rng)})
            print(f"recounts: seed {seed} {how} n={n}: found {found} wrong records, accuracy "
                  f"{rows[-1]['accuracy']:.3f} (gain {rows[-1]['gain']:+.3f} ± {rows[-1]['gain_se']:.3f}), "
                  f"{time.time() - t0:.0f} s", flush=True)
    wrong = sum(expected[i] != truth[i] for i in truth)
    for r in rows:
        r.update(check_bins=len(truth), wrong_records=wrong, flagged_bins=int(ranked["flagged"].sum()),
                 score_bins=len(data["score"]))
    return rows


def base_config(config: dict, args, seed: int) -> TrainConfig:
    """The fine-tuning: the base model's architecture, input and decision, from its weights; its last
    `trainable_blocks` blocks and head, for `epochs` (validated without the mirror image, as RAW scores)."""
    return TrainConfig(arch=config["arch"], weights=args.model_uri, image_size=config["image_size"],
                       fit=config.get("fit", "crop"), classes=config["classes"], tta=False,
                       decision=config.get("decision", "argmax"), epochs=args.epochs, lr=args.lr,
                       trainable_blocks=args.trainable_blocks, bn=args.bn,
                       weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, patience=0,
                       keep_last=True, seed=seed).validate()


def table(rows: list[dict]) -> str:
    """The rows as markdown: what each way of choosing found, and what its recounts did beside the control."""
    out = ["| seed | recounted | how chosen | wrong records found | accuracy | RMSE | accuracy vs no recount | "
           "RMSE vs no recount |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        found = f"{r['wrong_found']} of {r['n']}" if r["n"] else ""
        out.append(f"| {r['seed']} | {r['n']} | {r['choice']} | {found} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} | "
                   f"{r['rmse']:.3f} ± {r['rmse_se']:.3f} | {r['gain']:+.3f} ± {r['gain_se']:.3f} | "
                   f"{r['rmse_change']:+.3f} ± {r['rmse_change_se']:.3f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_uri", required=True)
    p.add_argument("--split_run_id", required=True, help="the split the model was trained on")
    p.add_argument("--recounts", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200])
    p.add_argument("--wrong", type=float, default=0.2, help="share of the check half's records that are wrong")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--replay", type=int, default=400, help="old training bins replayed in every fine-tuning")
    p.add_argument("--val_bins", type=int, default=200)
    p.add_argument("--bins", type=int, default=0, help="at most this many bins in each half; 0 = all")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--trainable_blocks", type=int, default=2, help="fine-tune the last N blocks and the head")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bn", default="frozen", help="frozen: BatchNorm keeps the base model's statistics (a few hundred "
                   "bins would move them); batch: it learns them again")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--out", default="bench/results/recounts.json")
    args = p.parse_args()
    mlflow.set_experiment("bench-recounts")
    data = setup(args)
    rows = [r for seed in args.seeds for r in run_seed(args, data, seed)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    r0 = rows[0]
    print(f"\n{r0['check_bins']} check bins ({r0['wrong_records']} wrong records, {r0['flagged_bins']} flagged), "
          f"scored on {r0['score_bins']} other bins\n")
    print(table(rows))


if __name__ == "__main__":
    main()
