"""MLproject, the step CLIs and their defaults stay one thing."""
import argparse
import importlib
import re
from dataclasses import fields

import pytest
import yaml

from conftest import ROOT

PROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRIES = sorted(PROJECT["entry_points"])


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_step_has_an_entry_point_and_back():
    # sagemaker_job is the training job's own entry (run by SageMaker, not by `mlflow run`)
    modules = sorted(p.stem for p in (ROOT / "steps").glob("*.py") if not p.stem.startswith("_")
                     and p.stem != "sagemaker_job")
    assert modules == ENTRIES
    assert {"main", "select", "ingest", "split", "hpo", "train", "evaluate", "register", "deploy"} <= set(ENTRIES)
    assert PROJECT["conda_env"] == "conda.yaml" and (ROOT / "conda.yaml").exists()


@pytest.mark.parametrize("entry", ENTRIES)
def test_parameters_reach_the_command_with_the_cli_defaults(entry):
    spec = PROJECT["entry_points"][entry]
    params = spec.get("parameters", {})
    command = spec["command"]
    assert command.startswith(f"python -m steps.{entry} ")
    opts = options(importlib.import_module(f"steps.{entry}").get_args_parser())
    assert set(params) == set(opts), f"{entry}: MLproject and CLI differ: {set(params) ^ set(opts)}"
    for name, p in params.items():
        assert re.search(rf'--{name} "?\{{{name}\}}"?(\s|$)', command), f"{entry}: --{name} {{{name}}} not in command"
        action = opts[name]
        if "default" not in p:
            assert action.required, f"{entry}: {name} has no default in MLproject but is optional in the CLI"
            continue
        value = p["default"]
        parsed = action.type(str(value)) if action.type else str(value)
        assert parsed == action.default, f"{entry}.{name}: MLproject default {value!r} vs CLI {action.default!r}"


def test_train_cli_defaults_are_trainconfig_defaults():
    from bincounter.training import TUNABLE, TrainConfig

    opts = options(importlib.import_module("steps.train").get_args_parser())
    for f in fields(TrainConfig):
        if f.name in opts and f.name not in TUNABLE and f.name != "monitor":
            assert opts[f.name].default == f.default, f.name
    for name in (*TUNABLE, "monitor"):  # empty means: the hpo run's (best), else TrainConfig's default
        assert opts[name].default == ""


@pytest.mark.parametrize("entry", ["main", "hpo", "train"])
def test_architectures_and_monitors_have_one_spelling(entry):
    """arch and monitor choices are the library's tables, in the CLIs, MLproject's defaults and the README."""
    from bincounter.model import ARCHS
    from bincounter.training import MONITORS, TrainConfig

    opts = options(importlib.import_module(f"steps.{entry}").get_args_parser())
    assert list(opts["arch"].choices) == list(ARCHS)
    monitor = opts.get("monitor") or opts["metric"]
    assert monitor.default in ("", TrainConfig.monitor)
    readme = (ROOT / "README.md").read_text()
    assert ", ".join(f"`{a}`" for a in ARCHS) in readme
    assert ", ".join(f"`{m}`" for m in MONITORS) in readme


def test_hpo_declares_the_train_options_it_shares_through_the_same_code():
    """hpo passes the train step's model and SageMaker options to its trials: same names, defaults, choices."""
    train, hpo = (options(importlib.import_module(f"steps.{e}").get_args_parser()) for e in ("train", "hpo"))
    shared = set(train) & set(hpo) - {"split_run_id", "epochs"}
    assert {"arch", "weights", "image_size", "data_path", "seed", "instance_type", "s3_output"} <= shared
    for name in shared:
        a, b = train[name], hpo[name]
        assert (a.default, a.choices, a.type) == (b.default, b.choices, b.type), name


def test_the_library_never_imports_a_step():
    for path in (ROOT / "bincounter").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from steps\b|import steps\b)", text, re.M), path.name
