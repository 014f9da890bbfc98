"""select: a label index (CSV, or the metadata in a moto S3 bucket) -> file_list.json."""
from __future__ import annotations

import functools
import json

import mlflow
import pytest
from conftest import last_run, run_entry
from aws import moto_endpoint, public_bucket

from bincounter import abid, bucket_scan, entry
from bincounter.bucket_scan import scan_bucket_counts
from steps import select


def label_index(path, per_count: int = 6, counts=range(0, 8)):
    """A CSV with `per_count` images of each count; ids zero-padded, plus un-padded twins for count 2."""
    rows = [(f"{c * 100 + k:05d}", c) for c in counts for k in range(per_count)]
    rows += [(str(200 + k), 2) for k in range(per_count)]  # `200` is another image than `00200`
    path.write_text("image_id,expected_quantity\n" + "".join(f"{i},{c}\n" for i, c in rows))
    return dict(rows)


def downloaded_file_list(run) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/file_list.json"))


def test_select_from_csv(tmp_path):
    labels = label_index(tmp_path / "labels.csv")
    out = tmp_path / "out.json"
    run_entry("select", {"labels": tmp_path / "labels.csv", "per_count": "2,20,3,1,0", "output": out, "seed": 7})
    run = last_run("select")
    doc = downloaded_file_list(run)
    assert json.loads(out.read_text()) == doc
    assert sorted(doc) == ["1", "2", "3", "4", "5"]
    assert [len(doc[c]) for c in "12345"] == [2, 12, 3, 1, 0]  # count 2 has only 12: all of them
    picked = abid.read_file_list(out)
    assert all(labels[i] == c for i, c in picked.items())
    assert {"00200", "200"} <= set(picked)  # padded and un-padded ids are different images
    assert {k: run.data.metrics[f"selected_{k}"] for k in range(1, 6)} == {1: 2, 2: 12, 3: 3, 4: 1, 5: 0}


def test_select_seed_determines_the_choice(tmp_path):
    label_index(tmp_path / "labels.csv", per_count=30)
    args = lambda seed, out: select.get_args_parser().parse_args(  # noqa: E731
        ["--labels", str(tmp_path / "labels.csv"), "--per_count", "5", "--seed", str(seed), "--output", str(out)])
    a = select.main(args(1, tmp_path / "a.json"))
    b = select.main(args(1, tmp_path / "b.json"))
    c = select.main(args(2, tmp_path / "c.json"))
    assert a == b and (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a != c
    assert all(len(ids) == 5 for ids in a.values())


def test_select_rejects_a_per_count_of_the_wrong_length(tmp_path, capsys):
    """As the entry point fails (entry.run in-process; the exit status through `mlflow run` is test_bad_input's)."""
    label_index(tmp_path / "labels.csv")
    with pytest.raises(SystemExit) as e:
        entry.run(select.main, select.get_args_parser(),
                  ["--labels", str(tmp_path / "labels.csv"), "--per_count", "1,2,3", "--output", ""])
    assert e.value.code == 1
    assert "per_count has 3 numbers for 5 counts 1..5" in capsys.readouterr().err


def metadata_doc(count) -> bytes:
    return json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}).encode()


@pytest.fixture
def metadata_bucket():
    """A public bucket with 8 metadata documents for each count 0..6, three bad ones and a stray file
    -> (endpoint, bucket, labels)."""
    labels = {f"{c}{k:04d}": c for c in range(7) for k in range(8)}
    objects = {abid.metadata_key(i): metadata_doc(c) for i, c in labels.items()}
    objects |= {"metadata/bad1.json": b"{not json", "metadata/bad2.json": b'{"EXPECTED_QUANTITY": null}',
                "metadata/bad3.json": b"[]", "metadata/readme.txt": b"not metadata"}
    endpoint = moto_endpoint()
    return endpoint, public_bucket(endpoint, objects), labels


def test_scan_bucket_counts_meets_quotas(metadata_bucket, capsys):
    endpoint, bucket, labels = metadata_bucket
    quotas = {1: 3, 2: 8, 3: 20, 4: 0}
    got = scan_bucket_counts(quotas, seed=5, endpoint_url=endpoint, bucket=bucket, workers=4)
    assert all(labels[i] == c for i, c in got.items())
    per_count = {c: sum(1 for v in got.values() if v == c) for c in quotas}
    assert per_count == {1: 3, 2: 8, 3: 8, 4: 0}  # count 3 has only 8 images
    assert scan_bucket_counts(quotas, seed=5, endpoint_url=endpoint, bucket=bucket, workers=2) == got
    err = capsys.readouterr().err
    assert "skipped 3 images with bad metadata" in err  # the whole bucket was read: count 3 ran out
    assert "ran out of images for counts [3]" in err


def test_scan_bucket_counts_stops_when_quotas_are_met(metadata_bucket):
    endpoint, bucket, _ = metadata_bucket
    got = scan_bucket_counts({0: 1}, seed=1, endpoint_url=endpoint, bucket=bucket, workers=2)
    assert len(got) == 1 and list(got.values()) == [0]


def test_select_from_s3(metadata_bucket, tmp_path, monkeypatch):
    endpoint, bucket, labels = metadata_bucket
    # select has no bucket parameter (it reads aft-vbi-pds); send its scan to the test bucket
    monkeypatch.setattr(bucket_scan, "scan_bucket_counts", functools.partial(scan_bucket_counts, bucket=bucket))
    args = select.get_args_parser().parse_args(
        ["--labels", "s3", "--endpoint_url", endpoint, "--per_count", "2", "--output", str(tmp_path / "f.json")])
    selection = select.main(args)
    assert {c: len(ids) for c, ids in selection.items()} == {1: 2, 2: 2, 3: 2, 4: 2, 5: 2}
    assert all(labels[i] == c for c, ids in selection.items() for i in ids)
    assert downloaded_file_list(last_run("select")) == json.loads((tmp_path / "f.json").read_text())
