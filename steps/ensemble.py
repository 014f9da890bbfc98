"""ensemble: several trained bin counters answering as one model, the mean of their calibrated probabilities.

Reads: `members`, comma-separated model URIs (`runs:/<id>/model`, `models:/bin-counter/3`) or train run ids:
several seeds, the folds of a cross-validation, a refit beside its source; `split_run_id`, whose validation split
fits the ensemble's own temperature and review/check thresholds, as train does for one model (only the bins no
member trained on: a refit member's kept-back calibration bins).
Logs: the pyfunc `model` (members inside, each with its own normalisation, resolution and temperature; its
config lists the members' URIs and run ids), metrics `members`, `val_accuracy` of the ensemble and of each member
(`member_<i>_val_accuracy`), what calibration fitted, tag `bincounter.members`. Evaluate, register, serve and
deploy it as any model.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from bincounter import calibration, counters, entry, priors, serving
from bincounter.model import DECISIONS, decide
from bincounter.predict import predict_manifest, read_file
from bincounter.runs import finished_run, model_info, read_split, start_step
from steps.options import add_calibration_options, trust_targets
from bincounter.train_log import CALIBRATION_BINS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensemble", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", required=True, help="comma-separated model URIs or train run ids (at least two): "
                                                  "the mean of their calibrated probabilities")
    p.add_argument("--split_run_id", required=True,
                   help="its validation split calibrates the ensemble (temperature, review and check thresholds)")
    p.add_argument("--decision", default="", choices=["", *DECISIONS], help="empty: the first member's")
    add_calibration_options(p)
    return p


def member_uris(members: str) -> list[str]:
    """'a,runs:/b/model' -> ['runs:/a/model', 'runs:/b/model']; at least two, no repeats."""
    uris = [m if ":/" in m else f"runs:/{m}/model" for m in (x.strip() for x in members.split(",")) if m]
    if len(uris) < 2:
        raise ValueError(f"members: an ensemble needs at least two models, got {members!r}")
    if len(set(uris)) < len(uris):
        raise ValueError(f"members: a model is listed twice in {members!r}")
    return uris


def load_members(uris: list[str], tmp: str) -> tuple[list[Path], list[counters.BaseCounter], list[dict]]:
    """-> (each member's model folder, loaded counter, {uri, run_id}); a member that does not load, or counts
    other classes than the first, is refused by name."""
    dirs, loaded, sources = [], [], []
    for i, uri in enumerate(uris):
        try:
            d = counters.model_dir(uri, Path(tmp) / f"member{i}")
            loaded.append(counters.BinCounter.from_dir(d))
            run_id = model_info(uri).run_id
        except Exception as e:  # any reason a model cannot be had: say which member
            raise ValueError(f"members: {uri} does not load ({type(e).__name__}: {e})") from None
        if loaded[i].classes != loaded[0].classes:
            raise ValueError(f"members: {uri} counts {loaded[i].classes}, but {uris[0]} counts {loaded[0].classes}")
        dirs.append(d)
        sources.append({"uri": uri, "run_id": run_id})
    return dirs, loaded, sources


def unseen(val, sources: list[dict]):
    """The validation bins no member trained on: a refit member (train's refit_of) trained on part of the
    validation split and kept the rest back (its `splits/calibration.csv`). -> a boolean mask over `val`."""
    keep = np.ones(len(val), dtype=bool)
    for s in sources:
        if mlflow.get_run(s["run_id"]).data.tags.get("bincounter.refit_of"):
            held = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{s['run_id']}/{CALIBRATION_BINS}")),
                               dtype={"image_id": str})
            keep &= val["image_id"].isin(held["image_id"]).to_numpy()
    return keep


def member_probabilities(member: counters.BaseCounter, df: pd.DataFrame, classes: list[int]) -> np.ndarray:
    """One member's calibrated probabilities [N, C] for manifest rows, at its training mix (predict_manifest,
    target mix `train`: the ensemble moves the mix once, after the mean); NaN rows where an image is unreadable."""
    table = predict_manifest(member, df, counters.Settings(target_mix=priors.TRAIN_MIX))
    return table[[f"p_{c}" for c in classes]].to_numpy(dtype=float, na_value=np.nan)


def main(args: argparse.Namespace) -> str:
    uris = member_uris(args.members)
    finished_run(args.split_run_id, "split")
    with tempfile.TemporaryDirectory() as tmp:
        val = read_split(args.split_run_id, "val")
        dirs, members, sources = load_members(uris, tmp)
        classes = members[0].classes
        config = {"classes": classes, "decision": args.decision or members[0].decision, "members": sources}
        per_member = [member_probabilities(m, val, classes) for m in members]
        # the ensemble at temperature 1 (the mean Ensemble.calibrated takes): what calibration is fitted on
        probs = np.mean(per_member, axis=0)
        ok = ~np.isnan(probs).any(axis=1) & val["count"].isin(classes).to_numpy() & unseen(val, sources)
        y = val["count"].map({c: i for i, c in enumerate(classes)}).to_numpy()[ok]
        with start_step("ensemble", vars(args), f"ensemble of {len(uris)}") as run:
            mlflow.set_tag("bincounter.members", ",".join(s["run_id"] for s in sources))
            accuracy = lambda p: float(np.mean(decide(p[ok], config["decision"]) == y))  # noqa: E731
            mlflow.log_metrics({"members": len(uris), "val_accuracy": accuracy(probs),
                                **{f"member_{i}_val_accuracy": accuracy(p) for i, p in enumerate(per_member)}})
            trust = calibration.fit_and_log(probs[ok], y, classes, config["decision"], trust_targets(vars(args)))
            example = next(data for data, error in map(read_file, val["path"]) if error is None)
            serving.log_ensemble(dirs, {**config, **trust.config()}, example)
            print(f"ensemble: run {run.info.run_id}, {len(uris)} members, val_accuracy {accuracy(probs):.3f} "
                  f"(members {', '.join(f'{accuracy(p):.3f}' for p in per_member)})")
            return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
