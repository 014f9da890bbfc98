"""The README shows the commands a newcomer needs, and every command the README and docs/ tell a user to run names
an entry point, parameter, option, target or script that exists (docs/parameters.md: tests/test_docs.py)."""
import argparse
import importlib
import re
import shlex

import yaml

from bincounter import cli
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_has_the_commands():
    for text in ("make test", "make demo", "--env-manager local", "mlflow ui", "mlflow models serve",
                 "sqlite:///mlflow.db", "MLFLOW_TRACKING_URI", "bincounter reconcile", "make file-list"):
        assert text in README, text


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def command_lines(text: str) -> list[str]:
    """The shell lines of a page's ``` blocks (not ```python): continuations joined, comments dropped."""
    lines = []
    for info, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if info != "python":
            lines += [re.split(r"\s+#\s", ln)[0].strip() for ln in re.sub(r"\\\n\s*", " ", block).splitlines()
                      if ln.strip() and not ln.lstrip().startswith("#")]
    return lines


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def problems_of(line: str) -> tuple[str, list[str]]:
    """(what kind of command, what is wrong with it) for one command line of a page."""
    words = shlex.split(line)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    opts = [w.split("=")[0] for w in words if w.startswith("--")]
    if not words:
        return "", []
    if words[:3] == ["mlflow", "run", "."]:
        entry = words[words.index("-e") + 1] if "-e" in words else "main"
        if entry not in PROJECT:
            return "mlflow run", [f"no entry point {entry!r}"]
        params = PROJECT[entry].get("parameters", {})
        given = [words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "-P"]
        required = [p for p, s in params.items() if "default" not in s]
        return "mlflow run", ([f"{entry} has no parameter {p!r}" for p in given if p not in params]
                              + [f"{entry} needs {p!r}" for p in required if p not in given])
    if words[0] == "bincounter":
        subs = next(a for a in cli.get_args_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
        if words[1] not in subs:
            return "bincounter", [f"no subcommand {words[1]!r}"]
        return "bincounter", [f"{words[1]} has no option {o}" for o in opts if o not in options_of(subs[words[1]])]
    if words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        return "make", [f"no make target {t!r}" for t in words[1:] if "=" not in t and t not in targets]
    script = next((i for i, w in enumerate(words) if re.fullmatch(r"steps/\w+\.py", w)), None)
    if script is not None:  # spark-submit [its options] steps/<entry>.py [the step's options]
        entry = words[script][len("steps/"):-len(".py")]
        parser = importlib.import_module(f"steps.{entry}").get_args_parser()
        step_opts = [w.split("=")[0] for w in words[script + 1:] if w.startswith("--")]
        return "step script", [f"{words[script]} has no option {o}" for o in step_opts if o not in options_of(parser)]
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        script = ROOT / words[1]
        if not script.exists():
            return "python script", [f"no script {words[1]}"]
        text = script.read_text()
        return "python script", [f"{words[1]} has no option {o}" for o in opts if f'"{o}"' not in text]
    return "", []


def test_every_command_a_page_shows_names_what_exists():
    """Each `mlflow run .`, `bincounter`, `make`, `python <script>` and `steps/<entry>.py` line in a ``` block of
    the README or docs/: its entry point, parameters (required ones given), subcommand, options, target, script."""
    kinds, problems = set(), []
    for page in PAGES:
        for line in command_lines(page.read_text()):
            kind, wrong = problems_of(line)
            kinds.add(kind)
            problems += [f"{page.relative_to(ROOT)}: {line[:80]}: {w}" for w in wrong]
    assert {"mlflow run", "bincounter", "make", "python script"} <= kinds
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_wrong_command():
    assert problems_of("mlflow run . -e split --env-manager local -P ingest_run_id=x -P train_frak=0.5")[1] == [
        "split has no parameter 'train_frak'"]
    assert problems_of("mlflow run . -e split --env-manager local")[1] == ["split needs 'ingest_run_id'"]
    assert problems_of("bincounter reconcile --images x --expect y")[1] == ["reconcile has no option --expect"]
    assert problems_of("SEED=1 make demoo")[1] == ["no make target 'demoo'"]
    assert problems_of("python bench/score.py --imgs 5")[1] == ["bench/score.py has no option --imgs"]


def anchors(page) -> set[str]:
    """The #anchors GitHub gives a markdown page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_links_between_pages_resolve():
    """Every relative link and image of the README and docs/ names a file that exists, and a heading there."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            if re.match(r"\w+://", target):
                continue
            dest = page.parent / path if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_links_every_reference_page_and_speaks_to_users():
    """A newcomer finds each page under docs/ from the README; no page points at the project's issue numbers."""
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in README, f"the README does not link docs/{page.name}"
    for page in PAGES:
        assert not re.search(r"\bissues? \d+", page.read_text(), re.I), f"{page.name} names an issue number"


# How this project was developed (the tool that lent it a GPU machine, its sessions and calls) is no concern of a
# user's: the README and docs/ speak of the product. Spark and SageMaker sessions, deploy's timeout_seconds,
# torchvision's helpers and a tensor's device are product words, and the patterns leave them alone.
DEVELOPMENT_WORDS = [
    r"\b(this|that|earlier|later|previous|next|helper'?s?) sessions?\b",
    r"\bsessions? with a device\b",
    r"\bdevice (README|tool|call)s?\b",
    r"\bhelper (session|agent)s?\b",
    r"\bcarry\s*=",
    r"\btimeout_s\b",
    r"\bfiles_at\b",
    r"\bbudget_left_s\b",
    r"\bgive_back\b",
    r"\blent\b",
    r"\$OUT\b",
    r"\.library/",
]


def development_words(text: str) -> list[str]:
    return [m.group(0) for p in DEVELOPMENT_WORDS for m in re.finditer(p, text, re.I)]


def test_the_pages_say_nothing_of_how_the_project_was_developed():
    found = {page.relative_to(ROOT).as_posix(): hits for page in PAGES if (hits := development_words(page.read_text()))}
    assert not found, found


def test_the_development_words_are_caught_and_product_words_are_not():
    for text in ("a session with a device copies it", 'run(command="...", carry=[".gpu_sweep"], timeout_s=600)',
                 "downloaded as the device README's Notes say", "measured in an earlier session on the same split",
                 "the tables come back under the call's `files_at`", "--out $OUT", "this session's time"):
        assert development_words(text), text
    for text in ("the SageMaker session uses your credentials", "score, with the Spark session's start",
                 "in a notebook (a session already exists)", "-C synchronous=True -C timeout_seconds=1200",
                 "torchvision's private v2 helpers", "the model moves to the CUDA device", "a silent failure"):
        assert not development_words(text), text


def test_the_library_map_names_every_module():
    """The README's map of the library has one row per module of bincounter/, and no row for one that is gone."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("The library, one line a module:", 1)[1].split("\n\n", 2)[1]
    named = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    modules = sorted(p.name for p in (ROOT / "bincounter").glob("*.py") if p.name != "__init__.py")
    assert len(named) == len(set(named)), "a module is named twice"
    assert sorted(named) == modules, f"missing: {set(modules) - set(named)}, gone: {set(named) - set(modules)}"
