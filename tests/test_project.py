"""MLproject, the step CLIs and their defaults stay one thing: the step parsers declare every parameter,
MLproject is generated from them (scripts/gen_project.py), train's options take TrainConfig's defaults."""
import argparse
import importlib
import importlib.util
import re
from dataclasses import fields

import pytest
import yaml

from conftest import ROOT

PROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRIES = sorted(PROJECT["entry_points"])
spec = importlib.util.spec_from_file_location("gen_project", ROOT / "scripts" / "gen_project.py")
gen_project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_project)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_step_has_an_entry_point_and_back():
    # sagemaker_job is the training job's own entry (run by SageMaker, not by `mlflow run`); options holds what
    # several steps declare alike
    modules = sorted(p.stem for p in (ROOT / "steps").glob("*.py") if not p.stem.startswith("_")
                     and p.stem not in ("sagemaker_job", "options"))
    assert modules == ENTRIES == sorted(gen_project.ENTRY_POINTS)
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


def test_mlproject_is_what_the_step_parsers_generate():
    """MLproject is never edited by hand: a parameter added, renamed or given another default in a step's parser
    (or steps/options.py) must be regenerated into it."""
    assert (ROOT / "MLproject").read_text() == gen_project.render(), (
        "MLproject is stale (a step parser changed): run `python scripts/gen_docs.py`")


def test_train_cli_defaults_are_trainconfig_defaults():
    from bincounter.train_config import TUNABLE, TrainConfig

    opts = options(importlib.import_module("steps.train").get_args_parser())
    for f in fields(TrainConfig):
        if f.name in opts and f.name not in TUNABLE and f.name != "monitor":
            assert opts[f.name].default == f.default, f.name
    for name in (*TUNABLE, "monitor"):  # not given (None): the hpo run's (best), else TrainConfig's default
        assert opts[name].default is None
        assert PROJECT["entry_points"]["train"]["parameters"][name]["default"] == ""


def test_an_empty_tunable_is_none_once_and_resolves_given_then_hpo_then_default():
    """The parser reads "" as None (not given); train_config takes the given value, else hpo's, else TrainConfig's."""
    from bincounter.train_config import TrainConfig
    from steps import options as opts
    from steps import train

    parse = lambda *a: vars(train.get_args_parser().parse_args(["--split_run_id=x", "--weights=none", *a]))  # noqa: E731
    empty = parse("--lr=", "--freeze=", "--monitor=")
    assert empty["lr"] is None and empty["freeze"] is None and empty["monitor"] is None
    assert parse("--lr=0.01", "--freeze=true")["lr"] == 0.01
    hpo = {"best_lr": "0.05", "best_freeze": "True", "metric": "val_rmse"}
    cfg = opts.train_config(empty, [1, 2, 3], hpo)
    assert (cfg.lr, cfg.freeze, cfg.monitor) == (0.05, True, "val_rmse")
    cfg = opts.train_config(parse("--lr=0.01", "--monitor=val_mae"), [1, 2, 3], hpo)
    assert (cfg.lr, cfg.freeze, cfg.monitor) == (0.01, True, "val_mae")
    cfg = opts.train_config(empty, [1, 2, 3])
    assert (cfg.lr, cfg.freeze, cfg.monitor) == (TrainConfig.lr, TrainConfig.freeze, TrainConfig.monitor)
    with pytest.raises(ValueError, match=r"lr = 'fast' \(the hpo run's best_lr\) is not a valid lr"):
        opts.train_config(empty, [1, 2, 3], {"best_lr": "fast"})


def test_main_takes_its_defaults_from_the_steps_it_runs():
    """main's parameters that a step also has carry that step's default and type; its train levers are not given
    (None) unless set, and then reach train as train reads them."""
    from steps import main

    parsers, own = main.step_parsers(), options(main.get_args_parser())
    same_as = {"ingest": ("source", "file_list", "data_dir", "cache_dir", "num_images", "limit", "count_min",
                          "count_max"),
               "hpo": ("max_evals", ("epochs", "hpo_epochs")),
               "train": ("epochs", "patience", "arch", "weights", "image_size", "max_steps", "workers", "seed"),
               "register": (("name", "model_name"),)}
    for step, names in same_as.items():
        theirs = options(parsers[step])
        for name in names:
            name, as_name = name if isinstance(name, tuple) else (name, name)
            assert (own[as_name].default, own[as_name].type) == (theirs[name].default, theirs[name].type), as_name
    train = options(parsers["train"])
    for name in main.LEVERS:
        assert own[name].default is None and own[name].type("") is None, name
    args = main.get_args_parser().parse_args(["--tta=true", "--lr=0.002"])
    params = main.lever_params("train", args, parsers["train"])
    assert params["tta"] == "true" and params["lr"] == "0.002"
    assert params["augment"] == str(train["augment"].default) and params["ordinal_weight"] == "0.0"


def test_no_library_module_imports_argparse_but_the_cli():
    """Command-line plumbing lives in steps/ (and the `bincounter` command): the library takes values."""
    for path in (ROOT / "bincounter").glob("*.py"):
        if path.name != "cli.py":
            assert not re.search(r"^\s*(import argparse|from argparse\b)", path.read_text(), re.M), path.name


@pytest.mark.parametrize("entry", ["main", "hpo", "train"])
def test_architectures_and_monitors_have_one_spelling(entry):
    """arch and monitor choices are the library's tables, in the CLIs, MLproject's defaults and the README."""
    from bincounter.model import ARCHS
    from bincounter.train_config import MONITORS, TrainConfig

    opts = options(importlib.import_module(f"steps.{entry}").get_args_parser())
    assert list(opts["arch"].choices) == list(ARCHS)
    monitor = opts.get("monitor") or opts["metric"]
    assert monitor.default in (None, TrainConfig.monitor)
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
