"""Several folders into one manifest (ingest data_dir=A,B,C), and the split by count and source.

Generated folders (helpers_data.make_abid_folder): an id in two or three of them, a labels.csv count that the
metadata contradicts, every refusal of a bad data_dir; the real folders in ../shared when they are there.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import ROOT, last_run
from helpers_data import make_abid_folder

from bincounter import abid
from bincounter.manifest import COLUMNS, read_manifest, source_group, stratified_split, write_csv
from steps import ingest as step
from steps import split as split_step

SHARED = ROOT.parent / "shared"
REAL = [SHARED / "abid-sample", SHARED / "abid-more", SHARED / "abid-thumbs"]


def parse(*argv) -> object:
    return step.get_args_parser().parse_args([str(a) for a in argv])


def artifact(run, name: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- three small folders -------------------------------------------------------------------------------------

@pytest.fixture
def shelves(tmp_path) -> list[Path]:
    """shelf-a, shelf-b, shelf-c. 00002 is in all three (three different photos), 00005 in b and c; 00006's
    labels.csv says 2 where its metadata says 3; 00004 and 00009 are known by their metadata alone."""
    a = make_abid_folder(tmp_path / "shelf-a", {"00001": 1, "00002": 2, "00003": 3, "00004": 4},
                         metadata={"00004": 4}, labels={"00001": 1, "00002": 2, "00003": 3}, seed=1)
    b = make_abid_folder(tmp_path / "shelf-b", {"00002": 5, "00005": 2, "00006": 3, "00007": 1},
                         metadata={"00006": 3}, labels={"00002": 5, "00005": 2, "00006": 2, "00007": 1}, seed=2)
    c = make_abid_folder(tmp_path / "shelf-c", {"00002": 1, "00005": 4, "00008": 5, "00009": 1},
                         metadata={"00009": 1}, labels={"00002": 1, "00005": 4, "00008": 5}, seed=3)
    return [a, b, c]


def ingest_folders(folders, cache: Path, *extra):
    return step.main(parse("--source", "local", "--data_dir", ",".join(str(f) for f in folders), "--file_list", "all",
                           "--cache_dir", cache, "--cache_size", 48, "--downloads", 2, *extra))


def test_several_folders_make_one_manifest_and_the_first_folder_wins(shelves, tmp_path, capsys):
    a, b, c = shelves
    manifest, rejects, stats = ingest_folders(shelves, tmp_path / "cache")
    run = last_run("ingest")
    assert run.info.status == "FINISHED"
    m = read_manifest(artifact(run, "manifest.csv")).set_index("image_id")
    assert list(m.reset_index().columns) == COLUMNS
    assert m["source"].to_dict() == {"00001": "shelf-a", "00002": "shelf-a", "00003": "shelf-a", "00004": "shelf-a",
                                     "00005": "shelf-b", "00006": "shelf-b", "00007": "shelf-b",
                                     "00008": "shelf-c", "00009": "shelf-c"}
    assert m["count"].to_dict() == {"00001": 1, "00002": 2, "00003": 3, "00004": 4, "00005": 2, "00006": 3,
                                    "00007": 1, "00008": 5, "00009": 1}
    # 00006: labels.csv says 2, its metadata 3: the metadata's count, and the manifest says so
    assert m["count_from"].to_dict() == {"00001": "labels", "00002": "labels", "00003": "labels", "00004": "metadata",
                                         "00005": "labels", "00006": "metadata", "00007": "labels",
                                         "00008": "labels", "00009": "metadata"}
    assert m.loc["00002", "sha256"] == sha(a / "bin-images/00002.jpg") != sha(b / "bin-images/00002.jpg")
    assert m.loc["00005", "sha256"] == sha(b / "bin-images/00005.jpg")

    r = pd.read_csv(artifact(run, "rejects.csv"), dtype=str).set_index("image_id")
    assert r["reason"].to_dict() == {"00002": "duplicate_id", "00005": "duplicate_id"}
    ra, rb, rc = (f.resolve() for f in shelves)
    assert r.loc["00002", "detail"] == (f"00002: bin-images/00002.jpg is in shelf-a ({ra}), shelf-b ({rb}) and "
                                        f"shelf-c ({rc}); took shelf-a's")
    assert r.loc["00005", "detail"] == (f"00005: bin-images/00005.jpg is in shelf-b ({rb}) and shelf-c ({rc}); "
                                        f"took shelf-b's")

    metrics = run.data.metrics
    assert metrics["ingested"] == 9 and metrics["rejected"] == 0  # ingested + rejected: the bins listed
    assert metrics["duplicate_ids"] == 2 and metrics["label_conflicts"] == 1
    assert (metrics["ingested_shelf-a"], metrics["ingested_shelf-b"], metrics["ingested_shelf-c"]) == (4, 3, 2)
    assert metrics["rejected_shelf-a"] == metrics["rejected_shelf-b"] == metrics["rejected_shelf-c"] == 0
    assert metrics["downloaded"] == 9 and metrics["count_1"] == 3

    out = capsys.readouterr().out
    assert "ingest: 2 bin ids are in several folders, each taken from the first listed" in out
    assert "e.g. 00002, 00005" in out
    assert "ingest: 1 bins have a labels.csv count that their metadata contradicts" in out
    assert "00006 (shelf-b): labels 2, metadata 3" in out
    [inp] = run.inputs.dataset_inputs
    assert json.loads(inp.dataset.source)["uri"] == ",".join(str(f) for f in shelves)


def test_a_cached_record_is_never_another_folders_photo(shelves, tmp_path):
    """Records are kept per folder: listing the folders the other way round takes 00002 and 00005 from shelf-c,
    its own photos (read now), never shelf-a's or shelf-b's cached ones; the others come from the cache."""
    a, b, c = shelves
    cache = tmp_path / "cache"
    ingest_folders(shelves, cache)
    m, _, stats = ingest_folders([c, b, a], cache)
    m = m.set_index("image_id")
    assert m.loc["00002", "sha256"] == sha(c / "bin-images/00002.jpg") and m.loc["00002", "count"] == 1
    assert m.loc["00005", "sha256"] == sha(c / "bin-images/00005.jpg") and m.loc["00005", "count"] == 4
    assert m.loc[["00002", "00005"], "source"].tolist() == ["shelf-c", "shelf-c"]
    assert (stats["downloaded"], stats["cache_hits"]) == (2, 7)
    assert stats["ingested_shelf-c"] == 4 and stats["ingested_shelf-a"] == 3

    # one folder alone, as before: its name is the source; all from the cache
    m1, _, s1 = step.main(parse("--source", "local", "--data_dir", a, "--file_list", "all", "--cache_dir", cache,
                                "--cache_size", 48, "--downloads", 2))
    assert set(m1["source"]) == {"shelf-a"} and s1["cache_hits"] == 4 and s1["duplicate_ids"] == 0


def test_records_made_before_sources_were_named_still_serve(shelves, tmp_path):
    """A record written by an earlier version (the photo's path as source, no count_from) is a cache hit; the
    row gets this run's source and count_from."""
    a = shelves[0]
    cache = tmp_path / "cache"
    ingest_folders([a], cache)
    for record in (cache / "records").glob("*/*.json"):
        rec = json.loads(record.read_text())
        del rec["count_from"]
        rec["source"] = str(a / "bin-images" / f"{rec['image_id']}.jpg")
        record.write_text(json.dumps(rec))
    m, _, stats = ingest_folders([a], cache)
    assert stats["cache_hits"] == 4 and set(m["source"]) == {"shelf-a"}
    assert m.set_index("image_id")["count_from"].to_dict() == {"00001": "labels", "00002": "labels",
                                                               "00003": "labels", "00004": "metadata"}


def test_a_file_list_looks_each_id_up_in_the_folders_in_order(shelves, tmp_path):
    a, b, c = shelves
    fl = tmp_path / "file_list.json"
    abid.write_file_list({1: ["00009"], 2: ["00002", "00005", "00006"], 3: ["00099"]}, fl)
    m, r, stats = step.main(parse("--source", "local", "--data_dir", f"{a},{b},{c}", "--file_list", fl,
                                  "--cache_dir", tmp_path / "cache", "--cache_size", 48, "--downloads", 2))
    m = m.set_index("image_id")
    assert m["source"].to_dict() == {"00002": "shelf-a", "00005": "shelf-b", "00009": "shelf-c"}
    assert m.loc["00002", "sha256"] == sha(a / "bin-images/00002.jpg")
    assert m["count_from"].to_dict() == {"00002": "labels", "00005": "labels", "00009": "metadata"}
    r = r.set_index("image_id")
    assert r["reason"].to_dict() == {"00002": "duplicate_id", "00005": "duplicate_id", "00006": "count_mismatch",
                                     "00099": "missing_image"}
    # a file list's count is what was selected: a mismatch is still a reject, not a label conflict
    assert "metadata/00006.json says EXPECTED_QUANTITY 3" in r.loc["00006", "detail"]
    assert r.loc["00099", "detail"] == " and ".join(str(f.resolve() / "bin-images/00099.jpg") for f in shelves) + \
        " do not exist"
    assert (stats["ingested"], stats["rejected"], stats["duplicate_ids"], stats["label_conflicts"]) == (3, 2, 2, 0)
    assert stats["rejected_missing_image"] == 1 and stats["rejected_shelf-b"] == 1  # 00006


def test_one_folder_with_a_file_list_is_as_before(shelves, tmp_path):
    """One folder answers for every listed id: a missing photo is named by its path there."""
    a = shelves[0]
    fl = tmp_path / "file_list.json"
    abid.write_file_list({1: ["00001"], 3: ["00099"]}, fl)
    m, r, stats = step.main(parse("--source", "local", "--data_dir", a, "--file_list", fl,
                                  "--cache_dir", tmp_path / "cache", "--cache_size", 48, "--downloads", 2))
    assert m["image_id"].tolist() == ["00001"] and m["source"].tolist() == ["shelf-a"]
    assert r.to_dict("records") == [{"image_id": "00099", "reason": "missing_image",
                                     "detail": f"{a.resolve() / 'bin-images/00099.jpg'} does not exist"}]
    assert stats["duplicate_ids"] == 0 and stats["ingested_shelf-a"] == 1 and stats["rejected_shelf-a"] == 1


# --- refusals --------------------------------------------------------------------------------------------------

REFUSED = {  # data_dir (folders: {a}, {b}, {tmp}) -> the message
    "missing": ("{a},{tmp}/nowhere", "data_dir: {tmp}/nowhere does not exist or is not a folder"),
    "no bin-images": ("{a},{tmp}/plain", "data_dir: {tmp}/plain has no bin-images/ folder"),
    "no photo": ("{a},{tmp}/hollow",
                 "data_dir: {tmp}/hollow has no photo in bin-images/ (no .jpg, .jpeg or .png file)"),
    "twice": ("{a},{b},{tmp}/shelf-b/../shelf-a",
              "data_dir: {tmp}/shelf-b/../shelf-a is given twice (as {a} and {tmp}/shelf-b/../shelf-a, both {ra})"),
    "same name": ("{a},{tmp}/elsewhere/shelf-a",
                  "data_dir: {a} and {tmp}/elsewhere/shelf-a are both named 'shelf-a', and the manifest's source is "
                  "the folder's name: give one of them under another name (a symbolic link)"),
    "alike in metrics": ("{tmp}/shelf a,{tmp}/shelf_a",  # metric names spell both `shelf_a`
                         "data_dir: {tmp}/shelf a and {tmp}/shelf_a are named 'shelf a' and 'shelf_a', alike in "
                         "metric names"),
    "empty entry": ("{a},,{b}", "data_dir: '{a},,{b}' has an empty entry between its commas"),
    "only commas": (",", "data_dir: source=local needs data_dir"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_folders_are_refused_by_name_before_anything_is_read(case, shelves, tmp_path):
    a, b, _ = shelves
    (tmp_path / "plain").mkdir()
    (tmp_path / "hollow" / "bin-images").mkdir(parents=True)
    (tmp_path / "hollow" / "bin-images" / "notes.txt").write_text("no photo")
    make_abid_folder(tmp_path / "elsewhere" / "shelf-a", {"00001": 1}, labels={"00001": 1})
    make_abid_folder(tmp_path / "shelf a", {"00011": 1}, labels={"00011": 1})
    make_abid_folder(tmp_path / "shelf_a", {"00012": 1}, labels={"00012": 1})
    data_dir, message = (t.format(a=a, b=b, tmp=tmp_path, ra=a.resolve()) for t in REFUSED[case])
    with pytest.raises(ValueError) as e:
        step.main(parse("--source", "local", "--data_dir", data_dir, "--file_list", "all",
                        "--cache_dir", tmp_path / "cache"))
    assert str(e.value).startswith(message)
    assert mlflow.search_runs(output_format="list") == []  # no run was opened
    assert not (tmp_path / "cache").exists()  # nothing was read into the cache


def test_a_symbolic_link_gives_a_folder_another_name(shelves, tmp_path):
    """The way out the same-name refusal names: the link's name is the source."""
    a = shelves[0]
    make_abid_folder(tmp_path / "elsewhere" / "shelf-a", {"00011": 3}, labels={"00011": 3})
    (tmp_path / "shelf-a2").symlink_to(tmp_path / "elsewhere" / "shelf-a")
    m, _, stats = ingest_folders([a, tmp_path / "shelf-a2"], tmp_path / "cache")
    assert m.set_index("image_id").loc["00011", "source"] == "shelf-a2" and stats["ingested_shelf-a2"] == 1


# --- the split by count and source -----------------------------------------------------------------------------

def golden_manifest(source=lambda i: "abid-sample") -> pd.DataFrame:
    """37 rows, counts 1-5 unevenly (a group of 2 among them), ids not in order."""
    counts = [1] * 2 + [2] * 9 + [3] * 14 + [4] * 5 + [5] * 7
    ids = [f"{(i * 7919) % 1000:05d}" for i in range(len(counts))]
    rows = [{"image_id": i, "count": c, "path": f"/x/{i}.jpg", "sha256": "", "width": 1, "height": 1,
             "source": source(i), "count_from": "labels"} for i, c in zip(ids, counts)]
    return pd.DataFrame(rows, columns=COLUMNS).sample(frac=1, random_state=1)


# What stratified_split (by count alone) gave for golden_manifest() before it learned sources: val and test ids.
GOLDEN = {
    42: {"val": ["00084", "00352", "00380", "00514", "00623", "00785", "00894"],
         "test": ["00028", "00056", "00137", "00271", "00408", "00813", "00838"]},
    7: {"val": ["00056", "00246", "00352", "00623", "00676", "00894", "00947"],
        "test": ["00028", "00327", "00380", "00461", "00514", "00595", "00732"]},
}


@pytest.mark.parametrize("source", [lambda i: "abid-sample", lambda i: f"s3://aft-vbi-pds/bin-images/{i}.jpg",
                                    lambda i: f"/old/abid-sample/bin-images/{i}.jpg", lambda i: None],
                         ids=["folder", "s3 objects", "old local paths", "no source"])
@pytest.mark.parametrize("seed", list(GOLDEN))
def test_one_source_splits_exactly_as_before(seed, source):
    parts = stratified_split(golden_manifest(source), (0.6, 0.2, 0.2), seed)
    assert {k: parts[k]["image_id"].tolist() for k in ("val", "test")} == GOLDEN[seed]
    assert len(parts["train"]) == 37 - 14


def mixed_manifest() -> pd.DataFrame:
    """Three sources of different sizes and count mixes; tiny (count, source) groups of 1 and 2 rows."""
    sizes = {"abid-sample": {1: 10, 2: 20, 3: 25, 4: 20, 5: 15},  # 90
             "abid-more": {1: 30, 2: 8, 4: 7, 5: 17},  # 62, skewed
             "abid-thumbs": {1: 1, 2: 2, 3: 6, 5: 4}}  # 13
    rows = [{"image_id": f"{src[5]}{c}{k:03d}", "count": c, "path": "", "sha256": "", "width": 1, "height": 1,
             "source": src, "count_from": "labels"}
            for src, mix in sizes.items() for c, n in mix.items() for k in range(n)]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_every_source_keeps_its_share_of_every_count():
    df = mixed_manifest()
    parts = stratified_split(df, (0.6, 0.2, 0.2), seed=3)
    assert sorted(pd.concat(parts.values())["image_id"]) == sorted(df["image_id"])  # each row once
    sizes = {k: v.groupby(["source", "count"]).size() for k, v in parts.items()}
    for (src, count), n in df.groupby(["source", "count"]).size().items():
        got = {k: int(s.get((src, count), 0)) for k, s in sizes.items()}
        assert abs(got["val"] - 0.2 * n) <= 0.5 and abs(got["test"] - 0.2 * n) <= 0.5, (src, count, got)
        assert abs(got["train"] - 0.6 * n) <= 1, (src, count, got)
        if n < 3:  # too few for a row in val or test: all in train
            assert got["train"] == n
    for src, n in df["source"].value_counts().items():  # each source's share of test: within a row per count
        in_test = int((parts["test"]["source"] == src).sum())
        assert abs(in_test - 0.2 * n) <= 0.5 * df.loc[df["source"] == src, "count"].nunique(), (src, in_test)
    again = stratified_split(df.sample(frac=1, random_state=0), (0.6, 0.2, 0.2), seed=3)
    assert all(again[k].equals(parts[k]) for k in parts)  # the rows decide, not their order
    other = stratified_split(df, (0.6, 0.2, 0.2), seed=4)
    assert not other["test"]["image_id"].equals(parts["test"]["image_id"])


def test_source_group_names_the_collection():
    assert source_group("abid-more") == "abid-more"
    assert source_group("s3://aft-vbi-pds/bin-images/00012.jpg") == "s3://aft-vbi-pds"
    assert source_group("synthetic://seed=3/bin-images/syn3-17") == "synthetic://seed=3"
    assert source_group("/work/shared/abid-sample/bin-images/523.jpg") == "/work/shared/abid-sample"


def test_the_split_step_logs_the_sources(tmp_path, capsys):
    df = mixed_manifest()
    with mlflow.start_run(run_name="ingest (test data)") as ingest_run:
        mlflow.set_tag("bincounter.step", "ingest")
        mlflow.log_params({"count_min": 1, "count_max": 5})
        mlflow.log_artifact(str(write_csv(df, tmp_path / "manifest.csv")))
    run_id = split_step.main(split_step.get_args_parser().parse_args(["--ingest_run_id", ingest_run.info.run_id]))
    run = mlflow.get_run(run_id)
    table = pd.read_csv(artifact(run, "sources.csv"))
    assert list(table.columns) == ["source", "count", "train", "val", "test", "total"]
    assert table.set_index(["source", "count"])["total"].to_dict() == df.groupby(["source", "count"]).size().to_dict()
    splits = {k: read_manifest(artifact(run, f"splits/{k}.csv")) for k in ("train", "val", "test")}
    assert list(splits["test"].columns) == COLUMNS
    m = run.data.metrics
    for src in ("abid-sample", "abid-more", "abid-thumbs"):
        for k, part in splits.items():
            assert m[f"{k}_size_{src}"] == (part["source"] == src).sum() > 0, (k, src)
    assert m["test_size_abid-more"] + m["test_size_abid-sample"] + m["test_size_abid-thumbs"] == m["test_size"]
    assert "split: per source (train/val/test): abid-more " in capsys.readouterr().out


def test_a_split_of_some_sources_keeps_each_bin_where_the_split_of_all_puts_it(tmp_path):
    df = mixed_manifest()
    with mlflow.start_run(run_name="ingest (test data)") as ingest_run:
        mlflow.set_tag("bincounter.step", "ingest")
        mlflow.log_params({"count_min": 1, "count_max": 5})
        mlflow.log_artifact(str(write_csv(df, tmp_path / "manifest.csv")))
    parse_split = split_step.get_args_parser().parse_args
    every = mlflow.get_run(split_step.main(parse_split(["--ingest_run_id", ingest_run.info.run_id])))
    some = mlflow.get_run(split_step.main(parse_split(["--ingest_run_id", ingest_run.info.run_id,
                                                       "--sources", "abid-sample,abid-thumbs"])))
    for k in ("train", "val", "test"):
        a, b = (read_manifest(artifact(r, f"splits/{k}.csv")) for r in (every, some))
        assert b["image_id"].tolist() == a.loc[a["source"] != "abid-more", "image_id"].tolist() and len(b), k
    with pytest.raises(ValueError, match="sources: abid-other not in the manifest; its sources are abid-more, "
                                         "abid-sample, abid-thumbs"):
        split_step.main(parse_split(["--ingest_run_id", ingest_run.info.run_id, "--sources", "abid-other"]))


# --- the real folders -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not all((d / "labels.csv").exists() for d in REAL),
                    reason=f"the real ABID folders are not all in {SHARED}")
def test_the_real_folders_into_one_manifest(tmp_path):
    """abid-sample, abid-more and abid-thumbs together (a seeded pick of 45): counts as their labels.csv say,
    sources by folder name, no id in two folders, nothing rejected."""
    m, rejects, stats = step.main(parse("--source", "local", "--data_dir", ",".join(map(str, REAL)), "--file_list",
                                        "all", "--limit", 45, "--cache_dir", tmp_path, "--cache_size", 48,
                                        "--downloads", 2, "--count_min", 0, "--count_max", 100))
    truth = {}
    for d in REAL:
        with open(d / "labels.csv", newline="") as f:
            truth |= {(d.name, r["image_id"]): (int(r["count"]), r["sha256"]) for r in csv.DictReader(f)}
    assert len(m) == 45 and rejects.empty and stats["duplicate_ids"] == 0 and stats["label_conflicts"] == 0
    assert set(m["source"]) == {d.name for d in REAL}
    for row in m.itertuples():
        assert truth[(row.source, row.image_id)] == (row.count, row.sha256), row.image_id
    assert sum(stats[f"ingested_{d.name}"] for d in REAL) == 45
