"""register: choosing the run, the version's alias and tags, the promotion gate, promote and rollback."""
from __future__ import annotations

import uuid

import mlflow
import pytest
from conftest import last_run
from helpers_model import log_tiny_model, tiny_model  # noqa: F401 (fixture)
from mlflow.tracking import MlflowClient

from bincounter import cli, registry
from steps import register as register_step


def train_run(tiny, split: str = "split-A") -> str:
    """A FINISHED train run in the test's experiment with the tiny model as its `model`."""
    run_id = log_tiny_model(tiny.torch_model, next(tiny.images.glob("*.jpg")))
    MlflowClient().log_param(run_id, "split_run_id", split)
    return run_id


def evaluation(train_run_id: str | None, metrics: dict, split: str = "split-A", status: str = "FINISHED",
               model_uri: str | None = None) -> str:
    """An evaluate run as steps/evaluate.py leaves it: params model_uri + split_run_id, test_* metrics."""
    run = mlflow.start_run()
    mlflow.set_tag("bincounter.step", "evaluate")
    mlflow.log_params({"model_uri": model_uri or f"runs:/{train_run_id}/model", "split_run_id": split, "manifest": ""})
    mlflow.log_metrics(metrics)
    mlflow.end_run(status)
    return run.info.run_id


def register(name: str, **kw) -> str:
    """The register step in-process (its entry point through MLproject is test_main's)."""
    args = register_step.get_args_parser().parse_args([])
    for k, v in {"name": name, **kw}.items():
        setattr(args, k, v)
    return register_step.main(args)


def verdict(run_id: str) -> tuple[str, str, str]:
    tags = MlflowClient().get_run(run_id).data.tags
    return tags["bincounter.version"], tags["bincounter.verdict"], tags["bincounter.gate_reason"]


@pytest.fixture
def name() -> str:
    return f"bc-{uuid.uuid4().hex[:8]}"  # registered models are store-wide: one per test


def test_registers_the_best_evaluated_run_then_gates_a_worse_one(tiny_model, name, capsys):
    a, b = train_run(tiny_model), train_run(tiny_model)
    evaluation(a, {"test_accuracy": 0.5, "test_rmse": 1.0})
    eval_b = evaluation(b, {"test_accuracy": 0.7, "test_rmse": 0.8})
    evaluation(a, {"test_accuracy": 0.99}, status="FAILED")  # not FINISHED: never chosen

    register(name)
    client = MlflowClient()
    v1 = client.get_model_version_by_alias(name, "champion")
    assert str(v1.version) == "1" and v1.run_id == b
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert {k: v1.tags[k] for k in ("source_run_id", "split_run_id", "eval_run_id", "test_data", "test_accuracy")} == {
        "source_run_id": b, "split_run_id": "split-A", "eval_run_id": eval_b, "test_data": "split_run_id=split-A",
        "test_accuracy": "0.7"}
    assert registry.history(name) == ["1"]
    assert last_run("register").data.tags["bincounter.verdict"] == "champion"

    version, decided, reason = verdict(register(name, run_id=a))  # a train run: its FINISHED evaluation has 0.5
    assert (version, decided) == ("2", "challenger")
    assert "0.5 vs champion version 1's 0.7" in reason and reason in capsys.readouterr().out
    assert client.get_model_version(name, "2").tags["gate"] == reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"


def test_gate_direction_min_delta_force_and_stage(tiny_model, name):
    a, b = train_run(tiny_model), train_run(tiny_model)
    evaluation(a, {"test_rmse": 1.0})
    assert verdict(register(name, run_id=a, metric="test_rmse"))[1] == "champion"  # no champion yet

    evaluation(b, {"test_rmse": 0.95})  # lower is better: 0.05 better, less than min_delta
    version, decided, reason = verdict(register(name, run_id=b, metric="test_rmse", min_delta=0.1))
    assert (version, decided) == ("2", "challenger") and "not better by at least min_delta 0.1" in reason
    version, decided, _ = verdict(register(name, run_id=b, metric="test_rmse", min_delta=0.01))
    assert (version, decided) == ("3", "champion")

    evaluation(a, {"test_rmse": 0.95})  # a tie is not better
    assert verdict(register(name, run_id=a, metric="test_rmse"))[1] == "challenger"

    with pytest.warns(FutureWarning):  # stages are deprecated in favour of aliases, but still work
        version, decided, reason = verdict(register(name, run_id=a, metric="test_rmse", force=True, stage="Production"))
    assert (version, decided, reason) == ("5", "champion", "forced (the gate was skipped)")
    assert MlflowClient().get_model_version(name, "5").current_stage == "Production"
    assert registry.history(name) == ["1", "3", "5"]


def test_gate_refuses_other_test_data_until_the_champion_is_evaluated_on_it(tiny_model, name):
    a, b = train_run(tiny_model), train_run(tiny_model, split="split-B")
    evaluation(a, {"test_accuracy": 0.6}, split="split-A")
    register(name, run_id=a)
    evaluation(b, {"test_accuracy": 0.9}, split="split-B")
    version, decided, reason = verdict(register(name, run_id=b))
    assert (version, decided) == ("2", "challenger")
    assert "test data differ" in reason and "split_run_id=split-B" in reason and "split_run_id=split-A" in reason

    # the champion evaluated on the new test data (by its registry URI): now the numbers compare
    evaluation(None, {"test_accuracy": 0.8}, split="split-B", model_uri=f"models:/{name}/1")
    version, decided, reason = verdict(register(name, run_id=b))
    assert (version, decided) == ("3", "champion") and "0.9 vs champion version 1's 0.8 on split_run_id=split-B" in reason


def test_an_unevaluated_model_stays_challenger_unless_forced(tiny_model, name):
    a = train_run(tiny_model)
    version, decided, reason = verdict(register(name, run_id=a))
    assert (version, decided) == ("1", "challenger") and "no test_accuracy" in reason
    assert registry.champion(name) is None
    assert verdict(register(name, run_id=a, force=True))[1] == "champion"


def test_register_refuses_bad_parameters_and_runs_clearly(name):
    with pytest.raises(ValueError, match="stage must be one of"):
        register(name, stage="Prod")
    with pytest.raises(ValueError, match="min_delta must be >= 0"):
        register(name, min_delta=-0.1)
    with pytest.raises(ValueError, match="no FINISHED evaluate run with metric 'test_accuracy'"):
        register(name)
    with pytest.raises(ValueError, match="not found"):
        register(name, run_id="0123456789abcdef0123456789abcdef")
    e = evaluation(None, {"test_accuracy": 0.5}, model_uri=f"models:/{name}/7")
    with pytest.raises(ValueError, match="not a runs:/<run_id>/model URI"):
        register(name, run_id=e)


def test_promote_and_rollback_commands_keep_a_history(tiny_model, name, capsys):
    a = train_run(tiny_model)
    for _ in range(3):
        registry.register(registry.Candidate(a, None), name)
    assert cli.main(["promote", "--name", name, "--version", "1"]) == 0
    assert cli.main(["promote", "--name", name, "--version", "3"]) == 0
    assert "champion is now version 3 (was 1)" in capsys.readouterr().out
    assert registry.history(name) == ["1", "3"]

    assert cli.main(["rollback", "--name", name]) == 0
    assert "rolled back to version 1 (was 3)" in capsys.readouterr().out
    assert str(registry.champion(name).version) == "1" and registry.history(name) == ["1"]

    assert cli.main(["rollback", "--name", name]) == 1
    assert "no earlier champion" in capsys.readouterr().err
    assert cli.main(["promote", "--name", name, "--version", "9"]) == 1
    assert "bincounter promote: error:" in capsys.readouterr().err
    assert str(registry.champion(name).version) == "1"


def test_metric_direction():
    assert registry.lower_is_better("test_rmse") and registry.lower_is_better("val_loss")
    assert registry.lower_is_better("test_mae")
    assert not registry.lower_is_better("test_accuracy") and not registry.lower_is_better("test_within1_accuracy")


def test_an_evaluation_of_the_champion_alias_counts_for_the_version_it_named(tiny_model, name):
    """evaluate keeps the version an alias named (registry.VERSION_TAG): the gate finds the champion's score by it."""
    a, b = train_run(tiny_model), train_run(tiny_model, split="split-B")
    evaluation(a, {"test_accuracy": 0.6}, split="split-A")
    register(name, run_id=a)
    assert registry.version_uri(f"models:/{name}@champion") == f"models:/{name}/1"
    assert registry.version_uri(f"models:/{name}/1") == f"models:/{name}/1" and registry.version_uri("runs:/x/model") is None
    ev = evaluation(None, {"test_accuracy": 0.8}, split="split-B", model_uri=f"models:/{name}@champion")
    MlflowClient().set_tag(ev, registry.VERSION_TAG, registry.version_uri(f"models:/{name}@champion"))
    evaluation(b, {"test_accuracy": 0.9}, split="split-B")
    version, decided, reason = verdict(register(name, run_id=b))
    assert (version, decided) == ("2", "champion") and "0.9 vs champion version 1's 0.8 on split_run_id=split-B" in reason
