"""docs/parameters.md is what scripts/gen_docs.py makes of MLproject and the step CLIs, and says all of it."""
import importlib.util
import re

import pytest
import yaml

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_docs)


def test_the_parameter_page_is_generated_and_fresh():
    page = (ROOT / "docs" / "parameters.md").read_text()
    assert page == gen_docs.render(), (
        "docs/parameters.md is stale (MLproject or a step CLI's help changed): run `python scripts/gen_docs.py`")


def test_the_page_has_every_entry_point_and_parameter_with_its_default():
    page = (ROOT / "docs" / "parameters.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", page, re.M | re.S))
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert list(sections) == list(project)
    for entry, spec in project.items():
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \| .+ \|$", sections[entry], re.M))
        expected = {p: "(required)" if "default" not in s else '`""`' if s["default"] == "" else f"`{s['default']}`"
                    for p, s in spec.get("parameters", {}).items()}
        assert {p: d.strip() for p, d in rows.items()} == expected, entry


def test_an_option_without_help_stops_the_generator(tmp_path, monkeypatch):
    """The page is fully generated: a parameter whose CLI option has no help text is an error that names it."""
    import steps.split

    project = tmp_path / "MLproject"
    project.write_text(yaml.safe_dump({"entry_points": {"split": {"parameters": {"seed": {"default": 42}}}}}))
    assert "| `seed` | `42` | seeds the split |" in gen_docs.render(project)

    parser = steps.split.get_args_parser()
    next(a for a in parser._actions if a.dest == "seed").help = None
    monkeypatch.setattr(steps.split, "get_args_parser", lambda: parser)
    with pytest.raises(SystemExit, match=r"split: --seed has no help text"):
        gen_docs.render(project)
