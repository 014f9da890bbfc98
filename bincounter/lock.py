"""The lock: `requirements.lock`, every package of `pyproject.toml` (all extras) and what they pull in, pinned
(`make lock` writes it with pip-compile). `make venv`, conda.yaml, the SageMaker job's requirements and the GPU
bundle install from it, so that two machines run the same stack on any day.

    python -m bincounter.lock check     # exit 1, naming each disagreement and the refresh command, when
                                        # pyproject.toml and the lock disagree (what `make venv` runs first)

Only the standard library and `packaging` here: `make venv` runs the check before anything else is installed.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
REFRESH = "make lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
_DIRECT = "bincounter (pyproject.toml)"  # pip-compile's `# via` note for a package pyproject.toml asks for


class LockError(RuntimeError):
    """The lock is missing or does not cover what is asked of it; the message says how to refresh it."""


def read_lock(path: str | Path = LOCK) -> dict[str, str]:
    """requirements.lock -> {canonical name: version}. LockError when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise LockError(f"{path}: no lock file; write it with `{REFRESH}`")
    pins = {}
    for line in path.read_text().splitlines():
        if m := _PIN.match(line):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def direct_in_lock(path: str | Path = LOCK) -> set[str]:
    """The packages the lock says pyproject.toml asked for (pip-compile's `# via bincounter (pyproject.toml)`)."""
    direct, current = set(), None
    for line in Path(path).read_text().splitlines():
        if m := _PIN.match(line):
            current = canonicalize_name(m[1])
        elif current and _DIRECT in line:
            direct.add(current)
    return direct


def project_requirements(path: str | Path = PYPROJECT) -> list[Requirement]:
    """pyproject.toml's dependencies and every optional dependency, as parsed requirements."""
    project = tomllib.loads(Path(path).read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]
    return [Requirement(line) for line in lines]


def check(pyproject: str | Path = PYPROJECT, lock: str | Path = LOCK) -> list[str]:
    """What disagrees between pyproject.toml and the lock, one line each (empty: they agree): a requirement
    the lock lacks or pins outside its specifier, and a package the lock still lists as asked for that
    pyproject.toml no longer names."""
    pins, asked = read_lock(lock), project_requirements(pyproject)
    problems = []
    for req in asked:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in {Path(lock).name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: {Path(lock).name} pins {name}=={pins[name]}")
    for name in sorted(direct_in_lock(lock) - {canonicalize_name(r.name) for r in asked}):
        problems.append(f"{name}: in {Path(lock).name} for pyproject.toml, which no longer asks for it")
    return problems


def pinned(names, lock: str | Path = LOCK) -> list[str]:
    """`name==version` for each distribution in `names`, versions from the lock; LockError naming those it
    lacks."""
    pins = read_lock(lock)
    missing = [n for n in names if canonicalize_name(n) not in pins]
    if missing:
        raise LockError(f"{Path(lock).name} has no pin for {', '.join(missing)}: add it to pyproject.toml, "
                        f"then `{REFRESH}`")
    return [f"{n}=={pins[canonicalize_name(n)]}" for n in names]


def main(argv: list[str]) -> int:
    if argv != ["check"]:
        print("usage: python -m bincounter.lock check", file=sys.stderr)
        return 2
    try:
        problems = check()
    except LockError as e:
        print(f"lock: {e}", file=sys.stderr)
        return 1
    if problems:
        print(f"lock: pyproject.toml and {LOCK.name} disagree; refresh the lock with `{REFRESH}`:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
