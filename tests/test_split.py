"""The split step keeping an earlier split's test bins (keep_test_of): the loop from recounts to a fine-tuned model
tested on the champion's test bins."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers_data import make_manifest

from bincounter.manifest import read_manifest, write_csv
from bincounter.runs import read_split
from steps import split as step


def ingest_run(df: pd.DataFrame, folder: Path) -> str:
    """A FINISHED ingest run whose manifest is `df` -> its id."""
    folder.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run(run_name="ingest (test data)") as run:
        mlflow.set_tag("bincounter.step", "ingest")
        mlflow.log_params({"count_min": 1, "count_max": 5})
        mlflow.log_artifact(str(write_csv(df, folder / "manifest.csv")))
    return run.info.run_id


def split(*argv) -> str:
    return step.main(step.get_args_parser().parse_args([str(a) for a in argv]))


def parts(run_id: str) -> dict[str, pd.DataFrame]:
    return {k: read_split(run_id, k) for k in ("train", "val", "test")}


def test_keep_test_of_keeps_exactly_the_old_test_bins_with_their_recounts(tmp_path, capsys):
    old = make_manifest(tmp_path / "photos", n=100, size=32)
    first = split("--ingest_run_id", ingest_run(old, tmp_path / "a"))
    before = parts(first)
    test_ids = before["test"]["image_id"].tolist()
    train_ids = before["train"]["image_id"].tolist()

    # the next manifest: recounts of two test bins and two training bins, one test bin gone, twenty new bins
    recounted = {test_ids[0]: 5, test_ids[1]: 1, train_ids[0]: 2, train_ids[1]: 3}
    gone = test_ids[2]
    new = old[old["image_id"] != gone].copy()
    for image_id, count in recounted.items():
        new.loc[new["image_id"] == image_id, ["count", "source", "count_from"]] = [count, "recount", "labels"]
    more = make_manifest(tmp_path / "more", n=20, size=32, seed=1, name="new{i:03d}")
    new = pd.concat([new, more], ignore_index=True)
    capsys.readouterr()
    second = split("--ingest_run_id", ingest_run(new, tmp_path / "b"), "--keep_test_of", first, "--seed", 7)
    after = parts(second)

    # test: exactly the old test bins, a recount's label where there is one, the gone bin as the old split had it
    assert after["test"]["image_id"].tolist() == sorted(test_ids)
    test = after["test"].set_index("image_id")
    assert test.loc[test_ids[0], ["count", "source"]].tolist() == [5, "recount"]
    assert test.loc[test_ids[1], ["count", "source"]].tolist() == [1, "recount"]
    assert test.loc[gone, "path"] == before["test"].set_index("image_id").loc[gone, "path"]
    # train and val: every other bin of the new manifest, once, in the ratio 0.6:0.2 per count and source
    rest = set(new["image_id"]) - set(test_ids)
    train, val = set(after["train"]["image_id"]), set(after["val"]["image_id"])
    assert train | val == rest and not train & val
    assert {train_ids[0], train_ids[1]} <= train | val and {"new000", "new019"} <= train | val
    for key, group in pd.concat([after["train"], after["val"]]).groupby(["count", "source"]):
        assert (group["image_id"].isin(val)).sum() == round(len(group) * 0.25), key

    run = mlflow.get_run(second)
    assert run.data.tags["bincounter.keep_test_of"] == first and run.data.params["keep_test_of"] == first
    m = run.data.metrics
    assert m["kept_test_missing"] == 1 and m["test_size"] == len(test_ids) and m["test_size_recount"] == 2
    assert m["train_size"] + m["val_size"] == len(rest)
    out = capsys.readouterr().out
    assert f"split: the test part is split run {first}'s ({len(test_ids)} bins, 2 recounted)" in out
    assert f"split: 1 of its test bins are not in this manifest, kept as that split had them: {gone}" in out

    # the same split again gives the same parts (seeded); a split without keep_test_of would move test bins
    again = parts(split("--ingest_run_id", ingest_run(new, tmp_path / "c"), "--keep_test_of", first, "--seed", 7))
    for k in after:
        assert again[k]["image_id"].tolist() == after[k]["image_id"].tolist(), k
    plain = parts(split("--ingest_run_id", ingest_run(new, tmp_path / "d"), "--seed", 7))
    assert set(plain["test"]["image_id"]) != set(test_ids)


def test_keep_test_of_needs_a_finished_split_run(tmp_path):
    df = make_manifest(tmp_path / "photos", n=20, size=32)
    ingest = ingest_run(df, tmp_path / "a")
    with pytest.raises(ValueError, match=f"run {ingest} is a 'ingest' run, expected a 'split' run"):
        split("--ingest_run_id", ingest, "--keep_test_of", ingest)
    with pytest.raises(ValueError, match="run 0123456789abcdef not found"):
        split("--ingest_run_id", ingest, "--keep_test_of", "0123456789abcdef")


def test_keep_test_with_no_val_share_trains_on_every_other_bin(tmp_path):
    df = make_manifest(tmp_path / "photos", n=30, size=32)
    first = split("--ingest_run_id", ingest_run(df, tmp_path / "a"))
    kept = read_manifest(mlflow.artifacts.download_artifacts(run_id=first, artifact_path="splits/test.csv"))
    second = parts(split("--ingest_run_id", ingest_run(df, tmp_path / "b"), "--keep_test_of", first,
                         "--train_frac", 0.8, "--val_frac", 0, "--test_frac", 0.2))
    assert second["val"].empty and second["test"]["image_id"].tolist() == kept["image_id"].tolist()
    assert set(second["train"]["image_id"]) == set(df["image_id"]) - set(kept["image_id"])
