"""ingest: sources (synthetic, local folder, moto S3), the cache and its records, rejects, bad parameters."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from conftest import ROOT, SAMPLE, last_run, needs_sample, run_entry
from PIL import Image
from aws import moto_endpoint, public_bucket, sample_objects

from bincounter import abid
from bincounter.ingest import ingest
from bincounter.manifest import COLUMNS, REJECT_COLUMNS, read_manifest
from bincounter.sources import (LocalSource, MissingObject, NotInFolders, S3Source, Source, SourceError,
                                 SyntheticSource)
from bincounter.synthetic import draw_bin
from steps import ingest as step


# --- helpers ---------------------------------------------------------------------------------------------

def jpeg(count: int = 3, seed: int = 0, size: int = 96) -> bytes:
    buf = io.BytesIO()
    draw_bin(count, seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def metadata(count, items: dict | None = None) -> bytes:
    """ABID-like metadata JSON; `count` None leaves EXPECTED_QUANTITY out."""
    doc = {"BIN_FCSKU_DATA": items if items is not None else {
        "B00TEST001": {"asin": "B00TEST001", "name": "a thing", "quantity": count,
                       "height": {"unit": "IN", "value": 1.0}, "weight": {"unit": "pounds", "value": 0.5}}}}
    if count is not None:
        doc["EXPECTED_QUANTITY"] = count
    return json.dumps(doc).encode()


def file_list(path: Path, labels: dict[str, int]) -> Path:
    by_count: dict[int, list[str]] = {}
    for i, c in sorted(labels.items()):
        by_count.setdefault(c, []).append(i)
    abid.write_file_list(by_count, path)
    return path


def write_folder(root: Path, objects: dict[str, bytes]) -> Path:
    """A folder in the bucket's layout holding `objects` ({key: bytes})."""
    for key, data in objects.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    (root / abid.IMAGE_PREFIX).mkdir(parents=True, exist_ok=True)
    return root


def artifact(run, name: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name))


def rejects_of(run) -> pd.DataFrame:
    return pd.read_csv(artifact(run, "rejects.csv"), dtype=str).set_index("image_id")


def parse(*argv: str):
    return step.get_args_parser().parse_args([str(a) for a in argv])


# --- synthetic end to end ------------------------------------------------------------------------------------

def test_synthetic_end_to_end(tmp_path):
    """Through `mlflow run`, with the old names of cache_size and downloads (accepted until the next release)."""
    p = run_entry("ingest", {"source": "synthetic", "num_images": 40, "image_size": 64, "cache_dir": tmp_path / "cache",
                             "seed": 3, "workers": 4})
    assert "ingest: warning: --image_size is deprecated and goes in the next release: use --cache_size" in p.stderr
    assert "ingest: warning: --workers is deprecated and goes in the next release: use --downloads" in p.stderr
    run = last_run("ingest")
    assert run.info.status == "FINISHED"
    m = read_manifest(artifact(run, "manifest.csv"))
    assert list(m.columns) == COLUMNS and len(m) == 40 and m["image_id"].is_unique
    assert m["count"].value_counts().to_dict() == {1: 8, 2: 8, 3: 8, 4: 8, 5: 8}
    for row in m.itertuples():
        assert Path(row.path).is_relative_to((tmp_path / "cache").resolve())
        with Image.open(row.path) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    assert (m[["width", "height"]] == 64).all().all()
    assert m["source"].str.startswith("synthetic://seed=3/bin-images/syn3-").all()
    rejects = pd.read_csv(artifact(run, "rejects.csv"))
    assert list(rejects.columns) == REJECT_COLUMNS and rejects.empty
    with Image.open(artifact(run, "samples.png")) as sheet:
        assert sheet.width >= 8 * 64
    metrics = run.data.metrics
    assert metrics["ingested"] == 40 and metrics["rejected"] == 0 and metrics["downloaded"] == 40
    assert metrics["cache_hits"] == 0 and metrics["count_3"] == 8 and metrics["rejected_corrupt_image"] == 0
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.name == "ingest-synthetic" and inp.dataset.source_type == "code"
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "ingest"
    assert json.loads(inp.dataset.profile)["num_rows"] == 40


def test_synthetic_rerun_and_damaged_cache(tmp_path):
    """A rerun answers from the cache; a missing or damaged cached file or record is made again."""
    source = SyntheticSource(12, 1, 5, seed=0, size=48)
    items = source.labels()
    m1, _, s1 = ingest(items, source, tmp_path, 48, (1, 5), downloads=3, progress=False)
    assert (s1["downloaded"], s1["cache_hits"], s1["ingested"]) == (12, 0, 12)
    m2, _, s2 = ingest(items, source, tmp_path, 48, (1, 5), downloads=3, progress=False)
    assert (s2["downloaded"], s2["cache_hits"]) == (0, 12) and m2.equals(m1)

    Path(m1.path[0]).write_bytes(b"damaged")
    Path(m1.path[1]).unlink()
    (tmp_path / "records" / "synthetic-0-48" / f"{m1.image_id[2]}.json").write_text("{trunc")
    m3, _, s3 = ingest(items, source, tmp_path, 48, (1, 5), downloads=3, progress=False)
    assert (s3["downloaded"], s3["cache_hits"]) == (3, 9) and m3.equals(m1)

    # a narrower count range needs no download: the records remember the counts
    m4, r4, s4 = ingest(items, source, tmp_path, 48, (2, 3), downloads=3, progress=False)
    assert s4["downloaded"] == 0 and set(m4["count"]) == {2, 3}
    assert set(r4["reason"]) == {"count_out_of_range"} and len(m4) + len(r4) == 12
    for s in (s1, s2, s3, s4):  # where each image came from adds up to the images listed
        assert s["cache_hits"] + s["downloaded"] + s["not_downloaded"] == 12


def test_temporary_files_a_killed_run_left_are_removed(tmp_path):
    """`.<name>.<random>.tmp` files older than the run go; a younger one (a run writing now) stays."""
    source = SyntheticSource(6, 1, 5, seed=0, size=48)
    m, _, _ = ingest(source.labels(), source, tmp_path, 48, (1, 5), downloads=2, progress=False)
    image_dir, record_dir = Path(m.path[0]).parent, tmp_path / "records" / "synthetic-0-48"
    old = [image_dir / f".{Path(m.path[0]).name}.k1ll3d.tmp", record_dir / f".{m.image_id[0]}.json.k1ll3d.tmp"]
    young = image_dir / f".{Path(m.path[1]).name}.wr1t1n.tmp"
    for f in (*old, young):
        f.write_bytes(b"")
    for f in old:
        os.utime(f, (time.time() - 3600,) * 2)
    os.utime(young, (time.time() + 3600,) * 2)  # written after the next run starts
    _, _, stats = ingest(source.labels(), source, tmp_path, 48, (1, 5), downloads=2, progress=False)
    assert stats["temp_files_removed"] == 2 and not any(f.exists() for f in old) and young.exists()
    assert stats["cache_hits"] == 6


# --- every kind of bad item ----------------------------------------------------------------------------------

GOOD = {  # id -> count; each has an image, some have metadata
    "00101": 1,  # no metadata: the count comes from the file list
    "00102": 2,
    "00523": 3,  # `00523` and `523` are different images
    "523": 4,
    "00103": 2,  # metadata items with null fields, keys that are not their asin
    "00104": 5,  # BIN_FCSKU_DATA null
}
BAD = {  # id -> (listed count, reason, words the detail must contain)
    "00201": (1, "not_an_image", ["bin-images/00201.jpg", "not an image"]),
    "00202": (1, "corrupt_image", ["bin-images/00202.jpg", "unreadable image header"]),
    "00203": (2, "corrupt_image", ["bin-images/00203.jpg", "does not decode", "truncated"]),
    "00204": (2, "not_an_image", ["bin-images/00204.jpg", "not an image", "b'this is not"]),
    "00205": (3, "missing_image", ["bin-images/00205.jpg", "does not exist"]),
    "00206": (3, "bad_metadata", ["metadata/00206.json", "malformed JSON"]),
    "00207": (4, "bad_metadata", ["metadata/00207.json", "no EXPECTED_QUANTITY"]),
    "00208": (4, "bad_metadata", ["metadata/00208.json", "EXPECTED_QUANTITY is None"]),
    "00209": (9, "count_out_of_range", ["00209", "count 9 is outside count_min..count_max 1..5"]),
    "00210": (2, "count_mismatch", ["metadata/00210.json", "EXPECTED_QUANTITY 3", "00210 under count 2"]),
}


def bad_items() -> dict[str, bytes]:
    """The objects of a bucket holding the GOOD and the BAD items."""
    rng = random.Random(0)
    objects = {abid.image_key(i): jpeg(c, seed=n) for n, (i, c) in enumerate(GOOD.items())}
    objects |= {abid.metadata_key("00102"): metadata(2), abid.metadata_key("00523"): metadata(3),
                abid.metadata_key("523"): metadata(4)}
    objects[abid.metadata_key("00103")] = metadata(2, items={
        "X-1": {"asin": None, "name": None, "quantity": None, "height": None, "weight": {"unit": None, "value": None}},
        "X-2": {"asin": "B00OTHER", "name": "thing", "quantity": 1, "length": None}})
    objects[abid.metadata_key("00104")] = json.dumps({"BIN_FCSKU_DATA": None, "EXPECTED_QUANTITY": 5}).encode()
    images = {
        "00201": bytes(rng.randrange(256) for _ in range(3000)),
        "00202": b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(3000)),
        "00203": jpeg(2, seed=99)[:1500],
        "00204": b"this is not a picture\n",
        **{i: jpeg(BAD[i][0], seed=n) for n, i in enumerate(["00206", "00207", "00208", "00209", "00210"])},
    }
    objects |= {abid.image_key(i): data for i, data in images.items()}
    objects |= {abid.metadata_key("00206"): b'{"EXPECTED_QUANTITY": 3,', abid.metadata_key("00207"): metadata(None),
                abid.metadata_key("00208"): b'{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": null}',
                abid.metadata_key("00209"): metadata(9), abid.metadata_key("00210"): metadata(3)}
    return objects


@pytest.mark.parametrize("source", ["local", "s3"])
def test_bad_items_are_rejected_and_the_run_succeeds(source, tmp_path):
    """From a local folder and from moto S3, in-process (the step through `mlflow run` is the synthetic test's)."""
    objects = bad_items()
    fl = file_list(tmp_path / "file_list.json", GOOD | {i: c for i, (c, _, _) in BAD.items()})
    params = {"source": source, "file_list": fl, "cache_dir": tmp_path / "cache", "cache_size": 64, "downloads": 4}
    if source == "local":
        params |= {"data_dir": write_folder(tmp_path / "abid", objects)}
    else:
        endpoint = moto_endpoint()
        params |= {"endpoint_url": endpoint, "bucket": public_bucket(endpoint, objects)}
    step.main(parse(*[f"--{k}={v}" for k, v in params.items()]))
    run = last_run("ingest")
    assert run.info.status == "FINISHED"
    m = read_manifest(artifact(run, "manifest.csv")).set_index("image_id")
    assert m["count"].to_dict() == GOOD
    rejects = rejects_of(run)
    assert sorted(rejects.index) == sorted(BAD)
    for image_id, (_, reason, words) in BAD.items():
        assert rejects.loc[image_id, "reason"] == reason, image_id
        for w in words:
            assert w in rejects.loc[image_id, "detail"], (image_id, w, rejects.loc[image_id, "detail"])
    metrics = run.data.metrics
    assert metrics["ingested"] == len(GOOD) and metrics["rejected"] == len(BAD)
    assert metrics["rejected_corrupt_image"] == 2 and metrics["rejected_not_an_image"] == 2
    assert metrics["rejected_bad_metadata"] == 3 and metrics["rejected_missing_image"] == 1
    # every listed image once: the 6 good and 4 bad images whose bytes came; 6 rejected before (metadata, count,
    # missing object)
    assert (metrics["downloaded"], metrics["not_downloaded"], metrics["cache_hits"]) == (10, 6, 0)
    assert metrics["metadata_downloaded"] == 10
    assert metrics["count_2"] == 2 and metrics["count_4"] == 1


def test_nothing_ingested_fails_the_run(tmp_path):
    """Rejects alone are no dataset: the run fails, with rejects.csv logged to say why."""
    root = write_folder(tmp_path / "abid", {"bin-images/1.jpg": b"GIF89a broken"})
    fl = file_list(tmp_path / "fl.json", {"1": 1, "2": 2})
    with pytest.raises(ValueError, match=r"^no image was ingested \(2 rejected, see rejects.csv\)"):
        step.main(parse("--source", "local", "--data_dir", root, "--file_list", fl, "--cache_dir", tmp_path / "c"))
    run = last_run("ingest")
    assert run.info.status == "FAILED"
    assert rejects_of(run)["reason"].to_dict() == {"1": "not_an_image", "2": "missing_image"}


# --- the real sample through moto S3 ------------------------------------------------------------------------

def sample_labels(n_meta: int = 30, n_plain: int = 115) -> dict[str, dict]:
    """A fixed pick of labels.csv rows with counts 1..5: some with metadata, some without, and the short ids."""
    with open(SAMPLE / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if 1 <= int(r["count"]) <= 5]
    rng = random.Random(0)
    short = [r for r in rows if len(r["image_id"]) < 5][:5]
    pick = rng.sample([r for r in rows if r["has_metadata"] == "1"], n_meta)
    pick += rng.sample([r for r in rows if r["has_metadata"] == "0" and len(r["image_id"]) >= 5], n_plain)
    return {r["image_id"]: r for r in pick + short}


@pytest.fixture(scope="module")
def sample_bucket(tmp_path_factory):
    """A moto bucket with 150 real images (and their metadata where the sample has it), and a file_list.json
    built from labels.csv -> (endpoint, bucket, file_list path, expected manifest columns, metadata objects)."""
    labels = sample_labels()
    endpoint = moto_endpoint()
    objects = sample_objects(SAMPLE, sorted(labels))
    bucket = public_bucket(endpoint, objects)
    fl = file_list(tmp_path_factory.mktemp("sample") / "file_list.json",
                   {i: int(r["count"]) for i, r in labels.items()})
    expected = pd.DataFrame([{"image_id": i, "count": int(r["count"]), "sha256": r["sha256"], "width": int(r["width"]),
                              "height": int(r["height"])} for i, r in sorted(labels.items())])
    n_meta = sum(k.startswith(abid.METADATA_PREFIX) for k in objects)
    return endpoint, bucket, fl, expected, n_meta


def s3_args(sample_bucket, cache: Path, downloads: int = 8) -> list[str]:
    endpoint, bucket, fl, _, _ = sample_bucket
    params = {"source": "s3", "endpoint_url": endpoint, "bucket": bucket, "file_list": fl, "cache_dir": cache,
              "cache_size": 64, "downloads": downloads}
    return [f"--{k}={v}" for k, v in params.items()]


def check_manifest(m: pd.DataFrame, expected: pd.DataFrame, bucket: str, cache: Path) -> None:
    """The manifest has exactly the expected images, counts, hashes and sizes; its paths lie in `cache`."""
    pd.testing.assert_frame_equal(m[expected.columns], expected)
    assert (m["source"] == [f"s3://{bucket}/bin-images/{i}.jpg" for i in m["image_id"]]).all()
    for p in m["path"]:
        assert Path(p).is_relative_to(cache.resolve()) and Path(p).exists()


@needs_sample
def test_s3_sample_counts_and_rerun_from_cache(sample_bucket, tmp_path):
    """Real images from moto S3: counts as in labels.csv; a rerun downloads nothing."""
    _, bucket, _, expected, n_meta = sample_bucket
    n = len(expected)
    step.main(parse(*s3_args(sample_bucket, tmp_path / "cache")))
    first = last_run("ingest")
    m1 = read_manifest(artifact(first, "manifest.csv"))
    check_manifest(m1, expected, bucket, tmp_path / "cache")
    assert first.data.metrics["downloaded"] == n and first.data.metrics["cache_hits"] == 0
    assert first.data.metrics["metadata_downloaded"] == n_meta and first.data.metrics["not_downloaded"] == 0
    assert first.data.metrics["ingested"] == n and first.data.metrics["rejected"] == 0
    for p in m1["path"]:
        with Image.open(p) as img:
            assert min(img.size) == 64

    m2, _, stats = step.main(parse(*s3_args(sample_bucket, tmp_path / "cache")))
    assert stats["downloaded"] == 0 and stats["cache_hits"] == n
    pd.testing.assert_frame_equal(m2, m1)


@needs_sample
def test_s3_run_killed_midway_resumes(sample_bucket, tmp_path):
    """SIGKILL the step after some images are done; the next run finishes the rest, with the same result."""
    _, bucket, _, expected, _ = sample_bucket
    n = len(expected)
    cache = tmp_path / "cache"
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "steps.ingest", *s3_args(sample_bucket, cache, downloads=2)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)  # env: the test's tracking store
    records = cache / "records"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list(records.glob("*/*.json"))) < 15:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the step ended before it was killed:\n{log.read_text()[-3000:]}"
    done = len(list(records.glob("*/*.json")))
    assert 15 <= done < n

    m, _, stats = step.main(parse(*s3_args(sample_bucket, cache)))
    check_manifest(m, expected, bucket, cache)  # what the uninterrupted run (test above) gives
    assert stats["cache_hits"] >= done and stats["ingested"] == n
    assert len(list(records.glob("*/*.json"))) == n


@needs_sample
def test_local_all_reads_labels_and_metadata(tmp_path):
    """`file_list=all` on the real sample: counts from metadata or labels.csv (a seeded pick of 40)."""
    args = parse("--source", "local", "--data_dir", SAMPLE, "--file_list", "all", "--limit", 40,
                 "--cache_dir", tmp_path, "--cache_size", 48, "--downloads", 4, "--count_min", 0, "--count_max", 50)
    m, rejects, stats = step.main(args)
    truth = abid.read_label_index(SAMPLE / "labels.csv")
    assert len(m) == 40 and rejects.empty
    assert all(truth[i] == c for i, c in zip(m["image_id"], m["count"]))


# --- pieces -----------------------------------------------------------------------------------------------------

def test_local_labels_need_a_known_count(tmp_path):
    root = write_folder(tmp_path, {"bin-images/a.jpg": b"", "bin-images/b.jpg": b"", "bin-images/c.jpg": b"",
                                   "metadata/b.json": metadata(2), "labels.csv": b"image_id,count\na,1\nz,4\n"})
    assert LocalSource(root).labels() == {"a": 1, "b": None}  # c has no count anywhere; z has no image


def test_every_source_offers_the_same_interface(tmp_path):
    """labels() is a method everywhere: the counts a source knows, or None where a file list names the images;
    check() refuses a source that cannot be read, naming the parameter."""
    root = write_folder(tmp_path / "abid", {"bin-images/a.jpg": jpeg(), "labels.csv": b"image_id,count\na,3\n"})
    synthetic = SyntheticSource(5, 1, 5, seed=0, size=48)
    local = LocalSource(root)
    s3 = S3Source("bucket", "http://127.0.0.1:9")
    elsewhere = NotInFolders([local])
    for source in (s3, local, synthetic, elsewhere):
        assert isinstance(source, Source), type(source).__name__
        assert isinstance(source.tag, str) and source.where("bin-images/a.jpg").endswith("bin-images/a.jpg")
    assert synthetic.labels() == dict(synthesized(5)) and local.labels() == {"a": 3}
    assert s3.labels() is None and elsewhere.labels() == {}
    synthetic.labels()["syn0-0"] = 99  # a copy: the source keeps its own counts
    assert synthetic.labels() == dict(synthesized(5))
    synthetic.check()
    local.check()
    (root / "bin-images" / "a.jpg").unlink()
    with pytest.raises(ValueError, match=f"^data_dir: {root} has no photo in bin-images/"):
        local.check()


def synthesized(n: int) -> list[tuple[str, int]]:
    from bincounter.synthetic import synthetic_items

    return synthetic_items(n, 1, 5, seed=0)


def test_old_parameter_names_parse_into_the_new_ones(capsys):
    """image_size is cache_size and workers is downloads until the next release, each with a notice; the new name
    at its default is what `mlflow run` passes beside an old name given with -P: the old name's value wins."""
    args = parse("--image_size", 300, "--workers", 3)
    assert (args.cache_size, args.downloads) == (300, 3)
    err = capsys.readouterr().err.splitlines()
    assert err == ["ingest: warning: --image_size is deprecated and goes in the next release: use --cache_size",
                   "ingest: warning: --workers is deprecated and goes in the next release: use --downloads"]
    for argv in (["--cache_size", 256, "--image_size", 300], ["--image_size", 300, "--cache_size", 300]):
        args = parse(*argv)
        step.check_args(args)
        assert args.cache_size == 300 and "_old_names" not in vars(args)  # nothing left over to log as a param
    for argv in (["--cache_size", 320, "--image_size", 300], ["--image_size", 300, "--cache_size", 320]):
        with pytest.raises(ValueError, match="^cache_size 320 and image_size 300 disagree"):
            step.check_args(parse(*argv))
    assert parse().cache_size == 256 and parse().downloads == 16


def test_limit_is_a_seeded_pick(tmp_path):
    labels = {f"{c}{k:03d}": c for c in range(1, 6) for k in range(20)}
    fl = file_list(tmp_path / "fl.json", labels)

    def pick(seed, limit):
        items, owner, duplicates = step.list_items(parse("--file_list", fl, "--seed", seed, "--limit", limit), ["s3"])
        assert set(owner) == set(items) and set(owner.values()) == {"s3"} and duplicates == {}
        return items

    a = pick(1, 25)
    assert len(a) == 25 and a == pick(1, 25) and a != pick(2, 25)
    assert set(a.values()) == {1, 2, 3, 4, 5} and all(labels[i] == c for i, c in a.items())
    assert pick(1, 0) == labels and list(a) == sorted(a)


class FlakyClient:
    """Stands in for a boto3 client: get_object fails with `errors` in turn, then answers `body`."""

    def __init__(self, errors, body=b"data"):
        self.errors, self.body, self.calls = list(errors), body, 0

    def get_object(self, Bucket, Key):  # noqa: N803 - boto3's names
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"Body": io.BytesIO(self.body)}


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_s3_source_retries_transient_errors_only():
    src = S3Source("bucket", "http://127.0.0.1:9", attempts=3, backoff=0)
    src.client = FlakyClient([client_error("SlowDown", 503), ReadTimeoutError(endpoint_url="http://x")])
    assert src.get_image("1") == b"data" and src.client.calls == 3

    src.client = FlakyClient([client_error("NoSuchKey", 404)])
    with pytest.raises(MissingObject, match="s3://bucket/bin-images/1.jpg does not exist"):
        src.get_image("1")
    assert src.client.calls == 1
    src.client = FlakyClient([client_error("NoSuchKey", 404)])
    assert src.get_metadata("1") is None

    src.client = FlakyClient([client_error("InternalError", 500)] * 3)
    with pytest.raises(SourceError, match="bin-images/1.jpg"):
        src.get_image("1")
    assert src.client.calls == 3
    src.client = FlakyClient([client_error("AccessDenied", 403)])
    with pytest.raises(SourceError, match="AccessDenied"):
        src.get_image("1")
    assert src.client.calls == 1


# --- bad parameters ---------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "abid", {"bin-images/1.jpg": jpeg()})


BAD_PARAMS = [  # (argv, the message); {tmp}, {folder} and {endpoint} are filled in by the test
    (["--source", "ftp"], "source: unknown source 'ftp' (expected one of s3, local, synthetic)"),
    (["--source", "local"], "data_dir: source=local needs data_dir"),
    (["--source", "local", "--data_dir", "/no/such/dir"], "data_dir: /no/such/dir does not exist"),
    (["--source", "local", "--data_dir", "{tmp}"], "data_dir: {tmp} has no bin-images/ folder"),
    (["--source", "local", "--data_dir", "{folder}", "--file_list", "{tmp}/nope.json"],
     "file_list: file list {tmp}/nope.json does not exist"),
    (["--source", "local", "--data_dir", "{folder}", "--file_list", "{tmp}/broken.json"],
     "file_list: file list {tmp}/broken.json: malformed JSON"),
    (["--source", "local", "--data_dir", "{folder}", "--file_list", "{tmp}/empty.json"],
     "file_list: {tmp}/empty.json lists no images"),
    (["--source", "s3", "--file_list", "all"], "file_list: 'all' works only with source=local, not source=s3"),
    (["--source", "synthetic", "--count_min", "4", "--count_max", "2"], "count_min 4 is above count_max 2"),
    (["--source", "synthetic", "--cache_size", "16"], "cache_size: must be at least 32 pixels, got 16"),
    (["--source", "synthetic", "--image_size", "16"], "cache_size: must be at least 32 pixels, got 16"),  # old name
    (["--source", "synthetic", "--downloads", "0"], "downloads: must be at least 1, got 0"),
    (["--source", "synthetic", "--cache_size", "300", "--image_size", "320"],
     "cache_size 300 and image_size 320 disagree: image_size is the old name of cache_size; give cache_size alone"),
    (["--source", "synthetic", "--limit", "-1"], "limit: must be 0 (all) or more, got -1"),
    (["--source", "synthetic", "--num_images", "0"], "num_images: must be at least 1, got 0"),
    (["--source", "s3", "--file_list", "{tmp}/ok.json", "--endpoint_url", "{endpoint}", "--bucket", "no-such-bucket"],
     "bucket: there is no bucket 'no-such-bucket' at {endpoint}"),
    (["--source", "s3", "--file_list", "{tmp}/ok.json", "--endpoint_url", "http://127.0.0.1:9"],
     "endpoint_url: cannot reach S3 at http://127.0.0.1:9"),
]


@pytest.mark.parametrize("argv, message", BAD_PARAMS, ids=[f"{n}-{m.split()[0].rstrip(':')}" for n, (_, m) in
                                                             enumerate(BAD_PARAMS)])
def test_bad_parameters_fail_at_once(argv, message, tmp_path, folder):
    (tmp_path / "broken.json").write_text('{"1": [')
    (tmp_path / "empty.json").write_text("{}")
    file_list(tmp_path / "ok.json", {"1": 1})
    fill = {"tmp": tmp_path, "folder": folder, "endpoint": moto_endpoint() if "{endpoint}" in " ".join(argv) else ""}
    with pytest.raises(ValueError) as e:
        step.main(parse(*[a.format(**fill) for a in argv], "--cache_dir", tmp_path / "cache"))
    assert message.format(**fill) in str(e.value)
    assert mlflow.search_runs(output_format="list") == []  # no run was opened


def test_bad_parameter_exit_status(tmp_path):
    p = subprocess.run([sys.executable, "-m", "steps.ingest", "--source=synthetic", "--count_min=3", "--count_max=1",
                        f"--cache_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == "ingest: error: count_min 3 is above count_max 1"


def test_unparsable_parameter(capsys):
    with pytest.raises(SystemExit):
        parse("--limit", "ten")
    assert "argument --limit: expected a whole number, got 'ten'" in capsys.readouterr().err


def test_ingest_reads_a_select_runs_file_list_by_uri(tmp_path):
    """main's select -> ingest hand-over: file_list=runs:/<select run>/file_list.json."""
    from steps import select

    root = write_folder(tmp_path / "abid", {f"bin-images/{i}.jpg": jpeg(c, seed=i) for i, c in
                                            [(1, 1), (2, 2), (3, 2), (4, 9)]})
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,expected_quantity\n1,1\n2,2\n3,2\n4,9\n")
    select.main(select.get_args_parser().parse_args(["--labels", str(labels), "--per_count", "5", "--output", ""]))
    chosen = last_run("select").info.run_id
    step.main(parse("--source", "local", "--data_dir", root, "--file_list", f"runs:/{chosen}/file_list.json",
                    "--cache_dir", tmp_path / "cache"))
    manifest = read_manifest(artifact(last_run("ingest"), "manifest.csv"))
    assert dict(zip(manifest["image_id"], manifest["count"])) == {"1": 1, "2": 2, "3": 2}  # 9 was not selected
