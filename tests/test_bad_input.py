"""Entry points answer a wrong parameter in one line naming it: no traceback, exit 1, the run FAILED
(bincounter/entry.py). Real bugs keep their traceback; BINCOUNTER_TRACEBACK=1 shows it for all."""
from __future__ import annotations

import argparse
import os
import re

import mlflow
import pytest
from conftest import ROOT, run_entry
from helpers_data import make_split_run

from bincounter import entry
from steps import evaluate, ingest, register, split, train

MISSING = "0123456789abcdef0123456789abcdef"


def error_lines(err: str) -> list[str]:
    """stderr without MLflow's progress bars."""
    return [line for line in err.splitlines() if line.strip() and "Downloading artifacts" not in line]


def test_a_wrong_parameter_fails_in_one_line_through_mlflow_run():
    """The behaviour is the process: `mlflow run` with a run id that does not exist."""
    p = run_entry("split", {"ingest_run_id": MISSING}, check=False, timeout=300)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    step_lines = [line for line in p.stderr.splitlines() if line.startswith("split:")]
    assert step_lines == [f"split: error: ingest_run_id {MISSING}: run {MISSING} not found: "
                          f"Run with id={MISSING} not found"]
    runs = mlflow.search_runs(experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.fixture
def split_run(tmp_path) -> str:
    return make_split_run(tmp_path, n=20)


def cases(split_id: str) -> dict:
    """step, argv, the one line expected."""
    return {
        "wrong step": (split, ["--ingest_run_id", split_id],
                       f"split: error: ingest_run_id {split_id}: run {split_id} is a 'split' run, expected a 'ingest' run"),
        "lr=-1": (train, ["--split_run_id", split_id, "--lr", "-1", "--weights", "none"],
                  "train: error: lr must be a positive number, got -1.0"),
        "image_size=-5": (train, ["--split_run_id", split_id, "--image_size", "-5", "--weights", "none"],
                          "train: error: image_size must be at least 32, got -5"),
        "missing model": (evaluate, ["--model_uri", f"runs:/{MISSING}/model", "--split_run_id", split_id],
                          f"evaluate: error: model_uri runs:/{MISSING}/model: Run with id={MISSING} not found"),
        "register a split run": (register, ["--run_id", split_id],
                                 f"register: error: run_id {split_id}: a 'split' run has no model to register: give a "
                                 "train or ensemble run, or an evaluate run"),
        "missing run": (register, ["--run_id", MISSING],
                        f"register: error: run_id {MISSING}: run {MISSING} not found: Run with id={MISSING} not found"),
        "ingest count range": (ingest, ["--source", "synthetic", "--count_min", "4", "--count_max", "2"],
                               "ingest: error: count_min 4 is above count_max 2"),
        "ingest missing folder": (ingest, ["--source", "local", "--data_dir", "/no/such/dir"],
                                  "ingest: error: data_dir: /no/such/dir does not exist or is not a folder"),
    }


@pytest.mark.parametrize("case", ["wrong step", "lr=-1", "image_size=-5", "missing model", "register a split run",
                                  "missing run", "ingest count range", "ingest missing folder"])
def test_wrong_parameters_fail_in_one_line(split_run, case, capsys):
    step, argv, line = cases(split_run)[case]
    with pytest.raises(SystemExit) as e:
        entry.run(step.main, step.get_args_parser(), argv)
    assert e.value.code == 1
    assert error_lines(capsys.readouterr().err) == [line]
    assert mlflow.active_run() is None


def test_an_old_parameter_name_is_accepted_with_a_notice_and_a_clash_fails_in_one_line(split_run, capsys):
    """evaluate's read_threads was `workers` (ingest's cache_size and downloads: tests/test_ingest.py)."""
    args = evaluate.get_args_parser().parse_args(["--model_uri", "m", "--manifest", "x", "--workers", "3"])
    assert args.read_threads == 3
    notice = "evaluate: warning: --workers is deprecated and goes in the next release: use --read_threads"
    assert error_lines(capsys.readouterr().err) == [notice]
    argv = ["--model_uri", f"runs:/{MISSING}/model", "--split_run_id", split_run, "--read_threads=4", "--workers=3"]
    with pytest.raises(SystemExit) as e:
        entry.run(evaluate.main, evaluate.get_args_parser(), argv)
    assert e.value.code == 1
    clash = "read_threads 4 and workers 3 disagree: workers is the old name of read_threads; give read_threads alone"
    assert error_lines(capsys.readouterr().err) == [notice, f"evaluate: error: {clash}"]


def test_every_step_runs_through_entry_run():
    """A new step gets the one-line errors too."""
    steps = [f for f in sorted((ROOT / "steps").glob("*.py")) if '__name__ == "__main__"' in f.read_text()]
    assert len(steps) >= 10
    for f in steps:
        assert re.search(r'if __name__ == "__main__":\n    entry\.run\(main\b', f.read_text()), f.name


def test_the_open_run_ends_failed_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def fails_in_a_run(args):
        mlflow.start_run()
        raise ValueError(f"threshold must be between 0 and 1, got {args.threshold}")

    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--threshold", type=float)
    with pytest.raises(SystemExit):
        entry.run(fails_in_a_run, parser, ["--threshold", "2"])
    assert error_lines(capsys.readouterr().err) == ["demo: error: threshold must be between 0 and 1, got 2.0"]
    run = mlflow.search_runs(experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]], output_format="list")[0]
    assert run.info.status == "FAILED"

    with pytest.raises(ZeroDivisionError):  # a bug: its traceback stays
        entry.run(lambda args: 1 / 0, parser, [])
    monkeypatch.setenv(entry.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):  # asked for: every traceback
        entry.run(fails_in_a_run, parser, ["--threshold", "2"])


def test_the_samples_sheet_reads_images_with_the_one_decoder(tmp_path):
    """A decompression bomb and a text file among the samples: refused by transforms' limits, each shown with
    its reason, never decoded and never stopping the sheet."""
    from test_serving import png_bomb

    from bincounter import metrics
    from bincounter.synthetic import draw_bin

    good, bomb, text = tmp_path / "good.jpg", tmp_path / "bomb.png", tmp_path / "notes.jpg"
    draw_bin(2, 0, 48).save(good)
    bomb.write_bytes(png_bomb())
    text.write_text("not a photo")
    fig = metrics.plot_samples([str(good), str(bomb), str(text)], ["n=2", "n=3", "n=4"], ["green", "red", "red"])
    cells = fig.axes[:3]
    assert [len(ax.images) for ax in cells] == [1, 0, 0]
    bomb_text, text_text = (ax.texts[0].get_text() for ax in cells[1:])  # wrapped to fit their cells
    assert "decompression bomb" in bomb_text.replace("\n", " ") and str(bomb) in bomb_text.replace("\n", "")
    assert "not an image" in text_text.replace("\n", " ")
