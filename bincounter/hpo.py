"""Hyperparameter search: hyperopt TPE over bincounter.search_space, one nested MLflow child run per trial.

`search` runs inside the active (parent) MLflow run, in phases as training.train_run does: `setup_search` (options,
the trials' data -> a `Search`), `restore_search` (the finished trials of an interrupted search),
`run_local_trials` or `run_parallel_trials`, `finish_search` (the best trial). Each trial trains with `training.train_run` (the train
step's own fit loop, without checkpoints) on a stratified subset of the train split and is scored on the
validation split only. A trial that raises (NaN loss, out of memory, ...) becomes a FAILED child run with the
tag `bincounter.failure_reason`, counts as hyperopt STATUS_FAIL (never the best) and the search goes on.

Parent run artifacts: `search_space.json` (the space searched), `trials.json` (every finished
trial, rewritten after each one), `trials.png` (the metric over trials). Parent params `best_<name>` for
each tunable (what `train -P hpo_run_id=...` reads), metric `best_<metric>`, tag `best_run_id`.

Resume: rerun into the same parent run with the same parameters (`mlflow run . -e hpo --run-id <parent>
-P ...`, which sets MLFLOW_RUN_ID; in-process: `MLFLOW_RUN_ID=<parent>`). `search` rebuilds hyperopt's
Trials from the parent's `trials.json` (plain JSON, no unpickling), advances the random generator past the
trials already drawn, and runs only the remaining ones: the trial parameters are the same as an
uninterrupted search's. A child run that trials.json does not hold (left RUNNING by the interruption, or ended
just before the save) is marked KILLED; its trial runs again.
A rerun without `--run-id` is a new search from scratch.

Parallel trials (`parallel > 1`, with a `trial_runner`, e.g. SageMaker training jobs: steps/hpo.py): hyperopt
suggests a batch of `parallel` trials (each suggestion sees the earlier ones of the batch as pending, as fmin
with a queue does; one random draw per trial as fmin), they run at once in threads, and the batch is recorded
when all of it has ended. Each child run is made here (MlflowClient, tags as above) and handed to the runner.
"""
from __future__ import annotations

import gc
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # no screen here or on servers
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import torch
from hyperopt import STATUS_FAIL, STATUS_OK, fmin, tpe
from hyperopt.base import JOB_STATE_DONE, Domain
from hyperopt.exceptions import AllTrialsFailed
from hyperopt.fmin import generate_trials_to_calculate, partial
from mlflow.tracking import MlflowClient

from bincounter import metrics, training  # training.train_run: tests replace it
from bincounter.manifest import stratified_split
from bincounter.search_space import SEARCH_SPACE, hyperopt_space, to_params, to_vals
from bincounter.train_config import MONITORS, TrainConfig

# Random trials before TPE starts modelling the results. hyperopt's default (20) is more than a usual search
# here (max_evals 8), which would make it a pure random search. A constant, not a share of max_evals, so the
# first trials of a search do not depend on how long it is.
STARTUP_TRIALS = 5


TRIALS_FILE = "trials.json"


def direction(metric: str) -> str:
    """'min' or 'max' for a validation metric; ValueError for anything else (test_* included)."""
    if metric not in MONITORS:
        raise ValueError(f"metric must be a validation metric, one of {', '.join(MONITORS)}; got {metric!r} "
                         "(the search selects on validation only; the test split is for the final evaluation)")
    return MONITORS[metric]


def check_options(metric: str, max_evals: int, subset: float) -> str:
    """ValueError for a bad search option (call it before opening a run) -> the metric's direction."""
    if max_evals < 1:
        raise ValueError(f"max_evals must be at least 1, got {max_evals}")
    if not 0 < subset <= 1:
        raise ValueError(f"subset must be in (0, 1], got {subset}")
    return direction(metric)


def train_subset(train_df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The trials' training rows: `fraction` of each count class (seeded), the same for every trial."""
    if fraction >= 1:
        return train_df
    sub = stratified_split(train_df, (fraction, 0.0, 1 - fraction), seed)["train"]
    if sub.empty:
        raise ValueError(f"subset {fraction} of {len(train_df)} training images is empty; raise subset")
    return sub


def _objective(value: float, mode: str) -> float:
    return value if mode == "min" else -value  # hyperopt minimises


def run_trial(number: int, params: dict, make_config: Callable[[dict], TrainConfig], train_df, val_df,
              metric: str) -> dict:
    """Train one trial in a nested child run. -> {"status": "ok"|"fail", "value", "run_id", "reason"}.
    Any exception is recorded (child FAILED, tag bincounter.failure_reason), not raised."""
    child = mlflow.start_run(run_name=f"trial-{number}", nested=True,
                             tags={"bincounter.step": "hpo_trial", "bincounter.trial": str(number)})
    out = {"status": STATUS_FAIL, "value": None, "run_id": child.info.run_id, "reason": ""}
    try:
        mlflow.log_params({**{f"hp_{k}": v for k, v in params.items()}, **params})
        result = training.train_run(make_config(params), train_df, val_df, resume=False, checkpoint=False)
        value = float(result["best"][metric])
        if not math.isfinite(value):
            raise FloatingPointError(f"{metric} is {value}")
        out.update(status=STATUS_OK, value=value)
    except Exception as e:  # noqa: BLE001 -- a bad trial must not end the search
        out["reason"] = f"{type(e).__name__}: {e}"[:1000]
        mlflow.set_tag("bincounter.failure_reason", out["reason"])
    except BaseException:  # Ctrl-C and the like: stop the search, but do not leave the child RUNNING
        mlflow.set_tag("bincounter.failure_reason", "interrupted")
        mlflow.end_run("KILLED")
        raise
    finally:
        if torch.cuda.is_available():  # free a failed trial's memory before the next one
            gc.collect()
            torch.cuda.empty_cache()
    mlflow.end_run("FINISHED" if out["status"] == STATUS_OK else "FAILED")
    return out


def run_remote_trial(number: int, params: dict, runner: Callable[[int, dict, str], float], parent_id: str,
                     experiment_id: str) -> dict:
    """A trial that `runner(number, params, child_run_id) -> metric value` trains elsewhere (thread-safe: no
    fluent MLflow). -> the same dict as run_trial; any exception is recorded, not raised."""
    client = MlflowClient()
    child = client.create_run(experiment_id, run_name=f"trial-{number}",
                              tags={"mlflow.parentRunId": parent_id, "bincounter.step": "hpo_trial",
                                    "bincounter.trial": str(number)})
    cid = child.info.run_id
    out = {"status": STATUS_FAIL, "value": None, "run_id": cid, "reason": ""}
    try:
        client.log_batch(cid, params=[mlflow.entities.Param(k, str(v)) for k, v in
                                      {**{f"hp_{k}": v for k, v in params.items()}, **params}.items()])
        value = float(runner(number, params, cid))
        if not math.isfinite(value):
            raise FloatingPointError(f"metric is {value}")
        out.update(status=STATUS_OK, value=value)
    except Exception as e:  # noqa: BLE001 -- a bad trial must not end the search
        out["reason"] = f"{type(e).__name__}: {e}"[:1000]
        client.set_tag(cid, "bincounter.failure_reason", out["reason"])
    client.set_terminated(cid, "FINISHED" if out["status"] == STATUS_OK else "FAILED")
    return out


def suggest_batch(records: list[dict], space: dict, k: int, rstate) -> list[dict]:
    """The next k trials' parameters after the finished `records` (TPE, each seeing the earlier ones pending)."""
    trials = rebuild_trials(records)
    domain = Domain(lambda _: 0.0, hyperopt_space(space))
    algo = partial(tpe.suggest, n_startup_jobs=STARTUP_TRIALS)
    out = []
    for _ in range(k):
        new_ids = trials.new_trial_ids(1)
        trials.refresh()
        docs = algo(new_ids, domain, trials, rstate.integers(2**31 - 1))
        trials.insert_trial_docs(docs)
        trials.refresh()
        out.append(to_params({n: v[0] for n, v in docs[0]["misc"]["vals"].items()}, space))
    return out


def load_trials(run_id: str) -> dict | None:
    """The parent run's trials.json, or None when it has none (a new search)."""
    if not any(f.path == TRIALS_FILE for f in MlflowClient().list_artifacts(run_id)):
        return None
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{TRIALS_FILE}"))


def rebuild_trials(records: list[dict]):
    """Finished trial records -> a hyperopt Trials holding them as done (tids 0..n-1, in order)."""
    trials = generate_trials_to_calculate([r["vals"] for r in records])  # as points still to evaluate...
    trials.new_trial_ids(len(records))  # ...so reserve their tids (fmin numbers new trials after them)
    trials.refresh()
    for doc, r in zip(trials.trials, records):  # ...and mark them done with their results
        doc["state"] = JOB_STATE_DONE
        doc["result"] = {"status": STATUS_OK, "loss": r["loss"]} if r["status"] == STATUS_OK else {"status": STATUS_FAIL}
    trials.refresh()
    return trials


def _mark_stale_children(parent_id: str, experiment_id: str, done: set[str]) -> None:
    """Child runs of an interrupted search that trials.json does not hold -> KILLED (their trials run again): left
    RUNNING by a kill mid-trial, or FINISHED/FAILED by a kill between the trial's end and the save of trials.json."""
    client = MlflowClient()
    for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        if r.info.status != "KILLED" and r.info.run_id not in done:
            client.set_tag(r.info.run_id, "bincounter.failure_reason", "interrupted; the resumed search reruns it")
            client.set_terminated(r.info.run_id, "KILLED")


def plot_trials(records: list[dict], metric: str, mode: str):
    """Trial records -> a figure of the metric per trial, the running best, and failed trials as red x."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ok = [r for r in records if r["status"] == STATUS_OK]
    values = [r["value"] for r in ok]
    better = min if mode == "min" else max
    ax.plot([r["number"] for r in ok], values, "o", label="trial")
    ax.step([r["number"] for r in ok], [better(values[:i + 1]) for i in range(len(values))], where="post",
            label=f"best so far ({mode})")
    failed = [r["number"] for r in records if r["status"] != STATUS_OK]
    if failed:  # drawn at the worst finished value: they count as worse than any
        worst = (max if mode == "min" else min)(values) if values else 0.0
        ax.plot(failed, [worst] * len(failed), "rx", markersize=10, label="failed")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} over trials")
    ax.legend()
    fig.tight_layout()
    return fig


@dataclass
class Search:
    """One search in progress: what `setup_search` builds, `restore_search` fills with the finished trials,
    `run_local_trials` / `run_parallel_trials` advance and `finish_search` reports (as training's Fit)."""
    make_config: Callable[[dict], TrainConfig]
    sub: pd.DataFrame  # the trials' training rows (train_subset)
    val_df: pd.DataFrame
    metric: str
    mode: str  # the metric's direction
    max_evals: int
    seed: int
    space: dict
    settings: dict  # what decides the trials; a resumed run must have the same
    parallel: int
    trial_runner: Callable[[int, dict, str], float] | None
    parent_id: str
    experiment_id: str
    records: list[dict] = field(default_factory=list)  # the finished trials, in order

    def save(self) -> None:
        mlflow.log_text(json.dumps({"search": self.settings, "trials": self.records}, indent=2), TRIALS_FILE)

    def record(self, number: int, params: dict, out: dict) -> float | None:
        """Append a finished trial, save trials.json, log and print it -> its hyperopt loss (None: failed)."""
        metric, mode = self.metric, self.mode
        loss = _objective(out["value"], mode) if out["status"] == STATUS_OK else None
        self.records.append({"number": number, "run_id": out["run_id"], "status": out["status"], "params": params,
                             "vals": to_vals(params, self.space), "value": out["value"], "loss": loss,
                             "reason": out["reason"]})
        self.save()
        if out["status"] == STATUS_OK:
            mlflow.log_metric(f"trial_{metric}", out["value"], step=number)
        ok = [r["value"] for r in self.records if r["status"] == STATUS_OK]
        best = f"{(min if mode == 'min' else max)(ok):.4g}" if ok else "none yet"
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        result = f"{metric}={out['value']:.4g}" if out["status"] == STATUS_OK else f"FAILED ({out['reason'][:120]})"
        print(f"hpo: trial {number}/{self.max_evals} {shown} -> {result}; best {best}", flush=True)
        return loss

    def rstate(self) -> np.random.Generator:
        """The random generator as fmin leaves it after the finished trials (one integer drawn per trial)."""
        rstate = np.random.default_rng(self.seed)
        for _ in self.records:
            rstate.integers(2**31 - 1)
        return rstate


def setup_search(make_config: Callable[[dict], TrainConfig], train_df: pd.DataFrame, val_df: pd.DataFrame, *,
                 metric: str, max_evals: int, subset: float, seed: int, settings: dict | None, space: dict,
                 parallel: int, trial_runner: Callable[[int, dict, str], float] | None) -> Search:
    """Check the options, take the trials' training rows and the settings that decide the trials -> a Search
    with no trials, in the active (parent) run."""
    mode = check_options(metric, max_evals, subset)
    if parallel < 1 or (parallel > 1 and trial_runner is None):
        raise ValueError(f"parallel trials ({parallel}) need at least 1, and more than 1 a trial runner "
                         "(backend=sagemaker)")
    parent = mlflow.active_run()
    settings = json.loads(json.dumps({**(settings or {}), "metric": metric, "max_evals": max_evals,
                                      "subset": subset, "seed": seed, "space": space,
                                      "startup_trials": STARTUP_TRIALS,
                                      **({"parallel": parallel} if parallel > 1 else {})}))
    return Search(make_config=make_config, sub=train_subset(train_df, subset, seed), val_df=val_df, metric=metric,
                  mode=mode, max_evals=max_evals, seed=seed, space=space, settings=settings, parallel=parallel,
                  trial_runner=trial_runner, parent_id=parent.info.run_id, experiment_id=parent.info.experiment_id)


def restore_search(s: Search) -> None:
    """Take the finished trials of the parent's trials.json (refusing one made with other settings), save it
    (before the first trial too, so that a rerun with other settings is refused even then), mark the children
    it does not hold KILLED, and log the space and the training size."""
    saved = load_trials(s.parent_id)
    if saved and saved["search"] != s.settings:
        diff = sorted(k for k in set(s.settings) | set(saved["search"])
                      if s.settings.get(k) != saved["search"].get(k))
        raise ValueError(f"run {s.parent_id} holds a search with other settings ({', '.join(diff)}): rerun it "
                         "with the same parameters, or start a new run")
    s.records = saved["trials"] if saved else []
    s.save()
    _mark_stale_children(s.parent_id, s.experiment_id, {r["run_id"] for r in s.records})
    mlflow.log_text(json.dumps({"space": s.space, "algorithm": "tpe", "startup_trials": STARTUP_TRIALS},
                               indent=2), "search_space.json")
    mlflow.log_metric("train_size", len(s.sub))
    if s.records:
        print(f"hpo: resuming run {s.parent_id}: {len(s.records)} of {s.max_evals} trials done")
    else:
        print(f"hpo: run {s.parent_id}; after an interruption resume with `mlflow run . -e hpo --run-id "
              f"{s.parent_id}` and the same parameters")


def run_local_trials(s: Search) -> None:
    """The remaining trials one after another through hyperopt's fmin (each trained here, or by the trial
    runner when there is one)."""
    if len(s.records) >= s.max_evals:
        return

    def objective(draw: dict) -> dict:
        number = len(s.records) + 1
        params = to_params(to_vals(draw, s.space), s.space)  # plain Python types, validated against the space
        if s.trial_runner:
            out = run_remote_trial(number, params, s.trial_runner, s.parent_id, s.experiment_id)
        else:
            out = run_trial(number, params, s.make_config, s.sub, s.val_df, s.metric)
        loss = s.record(number, params, out)
        return {"status": out["status"], "loss": loss} if out["status"] == STATUS_OK else {"status": STATUS_FAIL}

    try:
        fmin(objective, hyperopt_space(s.space), algo=partial(tpe.suggest, n_startup_jobs=STARTUP_TRIALS),
             max_evals=s.max_evals, trials=rebuild_trials(s.records), rstate=s.rstate(), show_progressbar=False)
    except AllTrialsFailed:  # raised after the last trial; finish_search reports it with the reasons
        pass


def run_parallel_trials(s: Search) -> None:
    """The remaining trials in batches of `parallel`, each batch's trials at once in threads (trial runner)."""
    rstate = s.rstate()
    with ThreadPoolExecutor(s.parallel, thread_name_prefix="hpo-trial") as pool:
        while len(s.records) < s.max_evals:
            first = len(s.records) + 1
            batch = suggest_batch(s.records, s.space, min(s.parallel, s.max_evals - len(s.records)), rstate)
            futures = [pool.submit(run_remote_trial, first + i, params, s.trial_runner, s.parent_id,
                                   s.experiment_id) for i, params in enumerate(batch)]
            outs = [f.result() for f in futures]  # a batch is recorded whole: a resume reruns a cut one
            for i, (params, out) in enumerate(zip(batch, outs)):
                s.record(first + i, params, out)


def finish_search(s: Search) -> dict:
    """Plot the trials; log the best trial's `best_<tunable>` params, `best_<metric>` and tag `best_run_id`
    -> {"params", "value", "run_id", "trials"}. RuntimeError when every trial failed."""
    metrics.log_figure(plot_trials(s.records, s.metric, s.mode), "trials.png")
    plt.close("all")
    ok = [r for r in s.records if r["status"] == STATUS_OK]
    if not ok:
        raise RuntimeError(f"all {len(s.records)} trials failed; see the child runs' bincounter.failure_reason "
                           f"(first: {s.records[0]['reason'] if s.records else 'none'})")
    best = min(ok, key=lambda r: r["loss"])
    mlflow.log_params({f"best_{k}": v for k, v in best["params"].items()})
    mlflow.log_metric(f"best_{s.metric}", best["value"])
    mlflow.set_tag("best_run_id", best["run_id"])
    print(f"hpo: best trial {best['number']} (run {best['run_id']}) {s.metric}={best['value']:.4g} {best['params']}")
    return {"params": best["params"], "value": best["value"], "run_id": best["run_id"], "trials": s.records}


def search(make_config: Callable[[dict], TrainConfig], train_df: pd.DataFrame, val_df: pd.DataFrame, *,
           metric: str = TrainConfig.monitor, max_evals: int = 8, subset: float = 1.0, seed: int = 42,
           settings: dict | None = None, space: dict = SEARCH_SPACE, parallel: int = 1,
           trial_runner: Callable[[int, dict, str], float] | None = None) -> dict:
    """Run (or resume) the search in the active MLflow run: setup, restore, run the trials, finish.

    make_config(draws) -> the TrainConfig of a trial (fixed settings + the drawn tunables).
    settings: everything that decides the trials (the step's parameters); a resumed run must have the same.
    space: SEARCH_SPACE or a narrowing of it (space_for).
    trial_runner(number, params, child_run_id) -> metric value: trains a trial elsewhere (a SageMaker job);
    parallel: how many such trials run at once (see the module's doc).
    -> {"params": best tunables, "value": best metric value, "run_id": best child run, "trials": records}.
    """
    s = setup_search(make_config, train_df, val_df, metric=metric, max_evals=max_evals, subset=subset, seed=seed,
                     settings=settings, space=space, parallel=parallel, trial_runner=trial_runner)
    restore_search(s)
    if parallel > 1:
        run_parallel_trials(s)
    else:
        run_local_trials(s)
    return finish_search(s)
