"""The README's parameter table is MLproject's, and the README shows the commands a newcomer needs."""
import re

import yaml

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def readme_rows() -> dict[tuple[str, str], str]:
    rows = {}
    for m in re.finditer(r"^\| (\w+) \| `(\w+)` \| ([^|]+) \|", README, re.M):
        default = m.group(3).strip()
        rows[(m.group(1), m.group(2))] = "" if default == '`""`' else default.strip("`")
    return rows


def test_parameter_table_matches_mlproject():
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    expected = {(e, p): ("(required)" if "default" not in spec else str(spec["default"]))
                for e, entry in project.items() for p, spec in entry.get("parameters", {}).items()}
    assert readme_rows() == expected


def test_readme_has_the_commands():
    for text in ("make test", "make demo", "--env-manager local", "mlflow ui", "mlflow models serve",
                 "sqlite:///mlflow.db", "MLFLOW_TRACKING_URI", "bincounter reconcile", "make file-list"):
        assert text in README, text
