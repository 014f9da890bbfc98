"""The recount loop end to end on a tiny model: train and register a champion on bins whose records are partly
wrong, run the inventory check, fill the recount sheet as a person would, ingest the recounts, split keeping the
champion's test bins, fine-tune the champion, evaluate both on the new split and register the fine-tuned model.
Each step runs in-process (as `mlflow run` runs it, one MLflow run each), to stay fast."""
from __future__ import annotations

import random
import re
from pathlib import Path

import mlflow
import pandas as pd
from conftest import last_run, stamped_today
from mlflow import MlflowClient

from bincounter import cli, registry
from bincounter.recounts import SHEET_COLUMNS
from bincounter.runs import read_split
from bincounter.synthetic import draw_bin
from steps import evaluate, ingest, register, split, train

NAME = "bin-counter-recount-loop"  # a registered model of this test's own
BINS = 60
TINY = ["--arch", "resnet18", "--image_size", "32", "--epochs", "1", "--max_steps", "2", "--workers", "0"]


def step(module, *argv):
    """Run a step in-process as `mlflow run . -e <step>` would -> what its main returns (a run id, for ingest the
    manifest, rejects and stats)."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def ingest_run(root: Path, cache: Path, *extra) -> tuple[str, pd.DataFrame, pd.DataFrame, dict]:
    manifest, rejects, stats = step(ingest, "--source", "local", "--data_dir", root, "--file_list", "all",
                                    "--cache_dir", cache, "--cache_size", 32, "--downloads", 2, *extra)
    return last_run("ingest").info.run_id, manifest, rejects, stats


def warehouse(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """An ABID-layout folder of BINS generated bins (bin-images/<id>.jpg) whose labels.csv holds the inventory
    records, a fifth of them off by one, as a warehouse's records are -> ({id: true count}, {id: record})."""
    (root / "bin-images").mkdir(parents=True)
    truth = {f"{n:05d}": 1 + n % 5 for n in range(BINS)}
    wrong = set(random.Random(0).sample(sorted(truth), BINS // 5))
    records = {i: (c + 1 if c < 5 else c - 1) if i in wrong else c for i, c in truth.items()}
    for n, (image_id, count) in enumerate(truth.items()):
        draw_bin(count, n, 48).save(root / "bin-images" / f"{image_id}.jpg", "JPEG")
    (root / "labels.csv").write_text("image_id,count\n" + "".join(f"{i},{c}\n" for i, c in records.items()))
    return truth, records


def test_recounts_fine_tune_the_champion_and_the_gate_compares_on_the_kept_test_bins(tmp_path, capsys):
    root, cache = tmp_path / "warehouse", tmp_path / "cache"
    truth, records = warehouse(root)
    wrong = {i for i in truth if records[i] != truth[i]}

    # 1. the champion: ingest, split, train, evaluate, register (no champion yet: it becomes version 1)
    ingest1, manifest1, _, _ = ingest_run(root, cache)
    assert len(manifest1) == BINS and dict(zip(manifest1["image_id"], manifest1["count"])) == records
    split1 = step(split, "--ingest_run_id", ingest1)
    old_test = sorted(read_split(split1, "test")["image_id"])
    train1 = step(train, "--split_run_id", split1, "--weights", "none", *TINY)
    step(evaluate, "--model_uri", f"runs:/{train1}/model", "--split_run_id", split1)
    step(register, "--run_id", train1, "--name", NAME)
    champion = registry.champion(NAME)
    assert str(champion.version) == "1" and champion.run_id == train1

    # 2. the inventory check on 20 bins: the old test bins and 8 others, the wrong records among them first; at
    # threshold 1 every record is flagged (the tiny model's probabilities say little), so the sheet is all 20
    others = sorted(set(truth) - set(old_test), key=lambda i: (i not in wrong, i))[:8]
    checked = old_test + others
    assert 0 < len(wrong & set(checked)) < len(checked)  # a known share of the records checked is wrong
    photos = tmp_path / "check"
    photos.mkdir()
    for i in checked:
        (photos / f"{i}.jpg").write_bytes((root / "bin-images" / f"{i}.jpg").read_bytes())
    (tmp_path / "expected.csv").write_text("image_id,expected_quantity\n"
                                           + "".join(f"{i},{records[i]}\n" for i in checked))
    sheet_path = tmp_path / "recounts.csv"
    assert cli.main(["reconcile", "--images", str(photos), "--expected", str(tmp_path / "expected.csv"),
                     "--model", f"models:/{NAME}@champion", "--threshold", "1", "--recounts", str(sheet_path),
                     "--log-mlflow"]) == 0
    assert last_run("reconcile").data.metrics["bins_checked"] == len(checked)
    sheet = pd.read_csv(sheet_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    assert list(sheet.columns) == SHEET_COLUMNS and sorted(sheet["image_id"]) == sorted(checked)
    assert (sheet["recount"] == "").all()

    # 3. a person recounts: the true count in every row but one (a bin outside the old test part) left empty
    skipped = others[-1]
    sheet["recount"] = [str(truth[i]) if i != skipped else "" for i in sheet["image_id"]]
    sheet.to_csv(sheet_path, index=False)  # as a spreadsheet saves it
    recounted = set(checked) - {skipped}
    fixed = wrong & recounted  # records the recounts correct
    assert fixed - set(old_test)  # some recounts correct a label the champion trained on

    # 4. ingest the folder and the filled sheet; split keeping the champion's test bins; fine-tune the champion
    ingest2, manifest2, rejects2, stats2 = ingest_run(root, cache, "--recounts", sheet_path)
    assert (stats2["recount_rows"], stats2["recount_skipped_empty"], stats2["recount_rejected"]) == (20, 1, 0)
    by_id = manifest2.set_index("image_id")
    assert len(by_id) == BINS
    assert by_id["count"].to_dict() == {i: truth[i] if i in recounted else records[i] for i in truth}
    assert set(rejects2.loc[rejects2["reason"] == "duplicate_id", "image_id"]) == recounted  # the records' copies
    split2 = step(split, "--ingest_run_id", ingest2, "--keep_test_of", split1)
    parts = {p: read_split(split2, p) for p in ("train", "val", "test")}
    assert sorted(parts["test"]["image_id"]) == old_test
    test = parts["test"].set_index("image_id")
    recounted_test = sorted(recounted & set(old_test))
    assert recounted_test and (test.loc[recounted_test, "source"] == "recount").all()
    assert test.loc[recounted_test, "count"].to_dict() == {i: truth[i] for i in recounted_test}
    trained_on = set(parts["train"]["image_id"]) | set(parts["val"]["image_id"])
    assert not trained_on & set(old_test) and trained_on == set(truth) - set(old_test)

    train2 = step(train, "--split_run_id", split2, "--weights", f"models:/{NAME}@champion", *TINY)
    assert mlflow.get_run(train2).data.params["weights"] == f"models:/{NAME}@champion"
    step(evaluate, "--model_uri", f"runs:/{train2}/model", "--split_run_id", split2)
    # the champion on the same bins, by version: the gate matches an evaluation to the champion by its version
    step(evaluate, "--model_uri", f"models:/{NAME}@champion", "--split_run_id", split2)  # found by its version
    capsys.readouterr()
    reg = mlflow.get_run(step(register, "--run_id", train2, "--name", NAME))

    # 5. version 2 is registered and gated against version 1 on the new split, whatever the verdict
    version = MlflowClient().get_model_version(NAME, "2")
    assert version.run_id == train2 and version.tags["split_run_id"] == split2
    assert version.tags["test_data"] == f"split_run_id={split2}"
    reason = reg.data.tags["bincounter.gate_reason"]
    assert re.match(rf"test_accuracy \S+ vs champion version 1's \S+ on split_run_id={split2}: ", reason), reason
    assert version.tags["gate"] == reason and reason in capsys.readouterr().out
    verdict = reg.data.tags["bincounter.verdict"]
    assert str(registry.champion(NAME).version) == ("2" if verdict == "champion" else "1")
    # the recounts in the manifest: source and count_from `recount`, dated; the bin left empty keeps its record
    rows = by_id.loc[sorted(recounted)]
    assert (rows["source"] == "recount").all() and (rows["count_from"] == "recount").all()
    assert stamped_today(rows["recounted_on"])
    assert by_id.at[skipped, "source"] != "recount" and pd.isna(by_id.at[skipped, "recounted_on"])
    assert last_run("ingest").data.params["recounts"] == str(sheet_path)
