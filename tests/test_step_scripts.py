"""Every step runs the way the docs run it: as `python steps/<name>.py` (what spark-submit and a Databricks
script task do), from any folder, not only as `python -m steps.<name>` under `mlflow run`."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from conftest import ROOT, SAMPLE, needs_sample
from helpers_model import tiny_model  # noqa: F401 (fixture)

# the entry points: not the SageMaker job's entry, nor the module the steps share (options)
STEPS = sorted(p.stem for p in (ROOT / "steps").glob("*.py")
               if not p.stem.startswith("_") and p.stem not in ("sagemaker_job", "options"))


def script(name: str, *args: str, cwd, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "steps" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_step_runs_as_a_script(tmp_path):
    """`select` among them: steps/select.py must not shadow the standard library's select (which subprocess
    and asyncio import) when steps/ is the script's folder."""
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(STEPS, pool.map(lambda s: script(s, "--help", cwd=tmp_path), STEPS)))
    for name, p in done.items():
        assert p.returncode == 0, f"python steps/{name}.py --help: {p.stderr[-2000:]}"
        assert p.stdout.startswith(f"usage: {name} "), p.stdout[:200]


def test_a_wrong_option_is_one_line_naming_it(tmp_path):
    p = script("split", "--ingest_run_id", "x", "--no_such_option", "1", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["split: error: unrecognized arguments: --no_such_option 1 (--help lists the options)"]


def spark_submit_command() -> list[str]:
    """The local spark-submit command of docs/spark.md, as words."""
    text = (ROOT / "docs" / "spark.md").read_text()
    block = next(b for b in re.findall(r"```\n(.*?)```", text, re.S) if "spark-submit --master \"local" in b)
    line = next(ln for ln in block.replace("\\\n", " ").splitlines() if ln.startswith("spark-submit"))
    return shlex.split(line)


@pytest.mark.slow
@needs_sample
@pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime for Spark: `make java` installs it")
def test_the_documented_spark_submit_command_scores_photos(tmp_path, tiny_model):
    words = spark_submit_command()
    photos = tmp_path / "photos"
    photos.mkdir()
    ids = sorted(p.stem for p in (SAMPLE / "bin-images").glob("*.jpg"))[:6]
    for i in ids:
        shutil.copy(SAMPLE / "bin-images" / f"{i}.jpg", photos)
    assert words[0] == "spark-submit" and "steps/score.py" in words
    swap = {"photos/": str(photos), "models:/bin-counter@champion": tiny_model.model_uri,
            "steps/score.py": str(ROOT / "steps" / "score.py")}
    words = [swap.get(w, w) for w in words]
    words[0] = str(shutil.which("spark-submit", path=os.path.dirname(sys.executable)))
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    p = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "score: 6 of 6 photos counted, 0 unreadable" in p.stdout
    out = tmp_path / "scores-submit"
    df = pd.read_parquet(out / "scores.parquet")
    assert sorted(df["image_id"]) == ids and df["count"].notna().all()
