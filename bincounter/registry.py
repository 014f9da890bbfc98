"""Model registry: register a trained model, the promotion gate, promote and rollback.

Which model, and with which numbers. Test metrics (`test_accuracy`, `test_rmse`, ...) are logged by an
*evaluate* run (tag `bincounter.step=evaluate`), whose parameter `model_uri` names the model it scored
(`runs:/<train_run_id>/model`) and whose `split_run_id` or `manifest` names the test data. So:
- no run id: the best FINISHED evaluate run of the experiment by `metric` (max for accuracy-like metrics, min
  for rmse/mae/loss/error) among those that scored a `runs:/` model; that model is registered;
- an evaluate run id: that evaluation, and the model it scored;
- any other run id (a train run): its `model`, with its newest FINISHED evaluate run (if any) for the numbers.

The new version gets alias `challenger` and tags: `source_run_id`, `split_run_id` (the data it was trained
on), `eval_run_id`, `test_data` and the evaluation's `test_*` metrics.

The gate: the version becomes `champion` only if its `metric` beats the current champion's by at least
`min_delta` (and by more than nothing) on the same test data (same `split_run_id` or `manifest`). The
champion's number is taken from any FINISHED evaluate run of the champion's model (`runs:/<its run>/model` or
`models:/<name>/<version>`) on that data; if there is none the test data differ and the gate refuses, saying
how to evaluate the champion on it. A version without an evaluation is never promoted by the gate. With no
champion, an evaluated version is promoted. `force` skips the gate.

Every move of `champion` (gate, `promote`, `rollback`) goes through `set_champion`, which appends to the
registered-model tag `champion_history` (a JSON list of versions); `rollback` pops the current champion
and moves the alias to the one before it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bincounter.runs import finished_run

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
HISTORY_MAX = 100  # registered-model tag values are bounded (5000 chars); old entries are dropped
STAGES = ("", "None", "Staging", "Production", "Archived")
_LOWER_IS_BETTER = ("rmse", "mae", "mse", "loss", "error", "unreadable", "ece", "nll", "brier", "false_alarm",
                    "review_rate")


def lower_is_better(metric: str) -> bool:
    """rmse/mae/loss-like metrics and calibration errors (ece, nll, brier) are minimised; accuracy-like ones and
    the check's AUC maximised."""
    return any(metric.endswith(s) for s in _LOWER_IS_BETTER)


def test_data(eval_run) -> str:
    """The identity of an evaluate run's test data: `split_run_id=<id>` or `manifest=<uri>`."""
    p = eval_run.data.params
    if p.get("split_run_id"):
        return f"split_run_id={p['split_run_id']}"
    return f"manifest={p.get('manifest', '')}"


def _evaluate_runs(experiment_ids: list[str] | None, extra: str = "", order_by: list[str] | None = None):
    """FINISHED evaluate runs (in these experiments, or all) matching the extra filter."""
    where = "tags.`bincounter.step` = 'evaluate' and attributes.status = 'FINISHED'" + (f" and {extra}" if extra else "")
    return mlflow.search_runs(experiment_ids=experiment_ids, search_all_experiments=experiment_ids is None,
                              filter_string=where, order_by=order_by or ["attributes.start_time DESC"],
                              output_format="list")


VERSION_TAG = "bincounter.model_version"  # an evaluate run's model as `models:/<name>/<version>` (aliases resolved)


def version_uri(model_uri: str) -> str | None:
    """`models:/<name>@<alias>` -> `models:/<name>/<version>` the alias names now (what an evaluation of the alias
    scored, kept beside it: the alias moves later); the URI itself for `models:/<name>/<version>`; else None."""
    if not model_uri.startswith("models:/"):
        return None
    name, at, alias = model_uri[len("models:/"):].rstrip("/").partition("@")
    if not at:
        return model_uri
    return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"


def _evaluations_of(uri: str):
    """FINISHED evaluate runs of the model `uri` (`models:/<name>/<version>` or `runs:/...`): given so, or through
    an alias that named it when it was evaluated (VERSION_TAG)."""
    runs = _evaluate_runs(None, f"params.model_uri = '{uri}'")
    if uri.startswith("models:/"):
        seen = {r.info.run_id for r in runs}
        runs += [r for r in _evaluate_runs(None, f"tags.`{VERSION_TAG}` = '{uri}'") if r.info.run_id not in seen]
    return runs


def _train_run_of(eval_run) -> str:
    uri = eval_run.data.params.get("model_uri", "")
    if not uri.startswith("runs:/") or not uri.rstrip("/").endswith("/model"):
        raise ValueError(f"evaluate run {eval_run.info.run_id} scored {uri!r}, not a runs:/<run_id>/model URI: "
                         "give the train run id instead")
    return uri[len("runs:/"):].split("/")[0]


@dataclass
class Candidate:
    """What gets registered: the train run with the `model`, and its evaluation (None if never evaluated)."""
    run_id: str
    eval_run: Run | None

    @property
    def model_uri(self) -> str:
        return f"runs:/{self.run_id}/model"


def choose(run_id: str, metric: str, experiment_id: str) -> Candidate:
    """The model to register and its evaluation, per the rules in the module docstring."""
    if not run_id:
        direction = "ASC" if lower_is_better(metric) else "DESC"
        runs = [r for r in _evaluate_runs([experiment_id], order_by=[f"metrics.`{metric}` {direction}"])
                if metric in r.data.metrics and r.data.params.get("model_uri", "").startswith("runs:/")]
        if not runs:
            raise ValueError(f"no FINISHED evaluate run with metric {metric!r} of a runs:/ model in experiment "
                             f"{experiment_id}: run evaluate first, or give run_id")
        best = runs[0]
        print(f"register: best evaluate run by {metric}: {best.info.run_id} ({best.data.metrics[metric]:.4g})")
        return Candidate(finished_run(_train_run_of(best)).info.run_id, best)
    run = finished_run(run_id)
    if run.data.tags.get("bincounter.step") == "evaluate":
        return Candidate(finished_run(_train_run_of(run)).info.run_id, run)
    evals = _evaluate_runs([run.info.experiment_id], f"params.model_uri = 'runs:/{run_id}/model'")
    return Candidate(run_id, evals[0] if evals else None)


def register(candidate: Candidate, name: str) -> ModelVersion:
    """Register the candidate's model as a new version of `name` with alias `challenger` and its tags."""
    client = MlflowClient()
    train = client.get_run(candidate.run_id)
    tags = {"source_run_id": candidate.run_id, "split_run_id": train.data.params.get("split_run_id", "")}
    if candidate.eval_run is not None:
        e = candidate.eval_run
        tags.update({"eval_run_id": e.info.run_id, "test_data": test_data(e),
                     **{k: str(v) for k, v in e.data.metrics.items() if k.startswith("test_")}})
    mv = mlflow.register_model(candidate.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv


def champion(name: str) -> ModelVersion | None:
    """The version with alias `champion`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_evaluation(name: str):
    """-> (the champion version, the newest FINISHED evaluate run of its model, or None); None when no champion."""
    version = champion(name)
    if version is None:
        return None
    uris = [f"models:/{name}/{version.version}"] + ([f"runs:/{version.run_id}/model"] if version.run_id else [])
    runs = [r for uri in uris for r in _evaluations_of(uri)]
    return version, max(runs, key=lambda r: r.info.start_time, default=None)


def _champion_score(name: str, version: ModelVersion, data: str, metric: str) -> float | None:
    """The champion's `metric` on test data `data` from any FINISHED evaluate run of its model, or None."""
    uris = [f"models:/{name}/{version.version}"] + ([f"runs:/{version.run_id}/model"] if version.run_id else [])
    for uri in uris:  # one query each: run search has no IN for params
        for r in _evaluations_of(uri):
            if test_data(r) == data and metric in r.data.metrics:
                return r.data.metrics[metric]
    return None


def gate(name: str, version: ModelVersion, candidate: Candidate, metric: str, min_delta: float,
         force: bool) -> tuple[bool, str]:
    """-> (promote?, why). See the module docstring for the rules."""
    if force:
        return True, "forced (the gate was skipped)"
    e = candidate.eval_run
    if e is None or metric not in e.data.metrics:
        return False, (f"version {version.version} has no {metric}: no FINISHED evaluate run of "
                       f"{candidate.model_uri} logged it; run evaluate on it first (or force)")
    new = e.data.metrics[metric]
    current = champion(name)
    if current is None:
        return True, f"no champion yet; {metric} = {new:.4g}"
    data = test_data(e)
    old = _champion_score(name, current, data, metric)
    if old is None:
        theirs = current.tags.get("test_data", "unknown data")
        return False, (f"the test data differ: version {version.version} was evaluated on {data}, champion "
                       f"version {current.version} has no {metric} on it (it was evaluated on {theirs}); evaluate "
                       f"the champion on the same data (evaluate -P model_uri=models:/{name}/{current.version} "
                       f"-P {data}) and register again, or force")
    gain = (old - new) if lower_is_better(metric) else (new - old)
    verdict = f"{metric} {new:.4g} vs champion version {current.version}'s {old:.4g} on {data}"
    if gain > 0 and gain >= min_delta:
        return True, f"{verdict}: better by {gain:.4g} (min_delta {min_delta:g})"
    return False, f"{verdict}: not better by at least min_delta {min_delta:g} (gain {gain:.4g})"


def history(name: str) -> list[str]:
    """The versions that were champion, oldest first (registered-model tag `champion_history`)."""
    raw = MlflowClient().get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    return [str(v) for v in json.loads(raw)]


def set_champion(name: str, version: str | int, stage: str = "") -> None:
    """Move `champion` to `version`, record it in the history, and transition to `stage` if given."""
    client = MlflowClient()
    version = str(version)
    client.get_model_version(name, version)  # a clear MlflowException for an unknown version
    client.set_registered_model_alias(name, CHAMPION, version)
    h = history(name)[-(HISTORY_MAX - 1):] + [version]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(h))
    if stage and stage != "None":
        client.transition_model_version_stage(name, version, stage,
                                              archive_existing_versions=stage in ("Staging", "Production"))


def promote(name: str, version: str | int) -> str:
    """Make `version` the champion (no gate: a person decided). -> message."""
    before = champion(name)
    set_champion(name, version)
    return f"{name}: champion is now version {version}" + (f" (was {before.version})" if before else "")


def rollback(name: str) -> str:
    """Move `champion` back to the previous champion in the history. -> message."""
    client = MlflowClient()
    current = champion(name)
    h = history(name)
    if current is not None and h and h[-1] == str(current.version):
        h.pop()
    if not h:
        raise ValueError(f"{name}: no earlier champion to roll back to (history: {history(name)})")
    previous = h[-1]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(h))
    return f"{name}: champion rolled back to version {previous}" + (f" (was {current.version})" if current else "")
