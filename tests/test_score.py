"""Batch scoring on Spark (bincounter/score.py, steps/score.py) in local mode with a tiny model.

One local[2] SparkSession for the module (each start costs seconds). Skipped only where there is no Java
runtime (`make java` installs Debian's default-jre-headless).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from aws import aws, client, moto_server, public_bucket, sample_objects  # noqa: F401 (fixtures)
from conftest import SAMPLE, free_port, last_run, needs_sample, run_entry
from helpers_data import make_manifest
from helpers_model import CLASSES, build_tiny_model
from test_serving import png_bomb

from bincounter import abid, cli, score, spark_job
from bincounter.predict import find_images, local_predictor, predict_files
from bincounter.reconcile import summary
from bincounter.counters import load

pytestmark = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no Java runtime for Spark: `make java` installs default-jre-headless")
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def spark():
    session = spark_job.spark_session("local[2]", batch_size=64)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def model(store):
    return build_tiny_model(store / "tiny-model")


@pytest.fixture(scope="module")
def checked(model):
    return score.check_model(model.model_uri)


def read_table(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / score.TABLE).sort_values("image_id", ignore_index=True)


def bad_files(folder: Path) -> dict[str, str]:
    """Five bad photos in `folder` -> {image id: what its error says}."""
    good = next(iter(sorted(folder.glob("*.jpg")))).read_bytes()
    files = {"bad-empty": (b"", "empty"), "bad-text": (b"not an image at all", "not an image"),
             "bad-truncated": (good[:len(good) // 2], "does not decode"),
             "bad-header": (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "unreadable image header"),
             "bad-bomb": (png_bomb(), "decompression bomb")}
    for name, (data, _) in files.items():
        (folder / f"{name}.jpg").write_bytes(data)
    return {name: why for name, (_, why) in files.items()}


@needs_sample
def test_the_sample_folder_gives_a_row_per_photo(spark, model, checked, tmp_path):
    folder = SAMPLE / "bin-images"
    photos = score.list_photos(str(folder))
    stats = score.score(spark, photos, checked, str(tmp_path / "out"), csv=True)
    df = read_table(tmp_path / "out")
    ids = sorted(p.stem for p in find_images([folder]))
    assert len(ids) == 2017 and stats["images"] == stats["rows"] == stats["scored"] == len(df) == len(ids)
    assert df["image_id"].tolist() == ids and df["error"].isna().all()
    assert set(df["count"]) <= set(CLASSES)
    assert df["review"].dtype == bool  # the model's review flag travels too (a tiny model: none flagged)
    assert list(df.columns[:4]) == ["image_id", "source", "count", "confidence"] and df.columns[-1] == "error"
    assert (df[[f"p_{c}" for c in CLASSES]].sum(axis=1) - 1).abs().max() < 1e-4
    assert df["source"].iloc[0] == str(folder.resolve() / f"{ids[0]}.jpg")
    csv = pd.concat(pd.read_csv(f, dtype={"image_id": str}) for f in (tmp_path / "out" / score.CSV).glob("*.csv"))
    assert sorted(csv["image_id"]) == ids
    marker = json.loads((tmp_path / "out" / score.MARKER).read_text())
    assert marker["rows"] == len(ids) and marker["model_uri"] == model.model_uri
    assert stats["partitions"] == 2 and stats["images_per_s"] > 0


@needs_sample
def test_an_s3_prefix_is_read_in_the_executors(spark, model, checked, aws, tmp_path):
    photo_ids = sorted(p.stem for p in (SAMPLE / "bin-images").glob("*.jpg"))
    with_metadata = {p.stem for p in (SAMPLE / "metadata").glob("*.json")}
    ids = sorted([i for i in photo_ids if i in with_metadata][:16] + [i for i in photo_ids if i not in with_metadata][:4])
    objects = sample_objects(SAMPLE, ids)  # the photos, and the metadata of those that have it
    bucket = public_bucket(aws.url, {**objects, "bin-images/notes.txt": b"not a photo"})
    photos = score.list_photos(f"s3://{bucket}/bin-images/")
    assert photos.rows["image_id"].tolist() == ids and not photos.signed
    client(aws.url).delete_object(Bucket=bucket, Key=f"bin-images/{ids[3]}.jpg")  # gone since it was listed
    # local mode's Python workers start from the JVM's environment, fixed before this test pointed boto3 at moto
    spark.sparkContext.environment.update({k: os.environ[k] for k in AWS_VARS})
    try:
        expected = score.expectations(f"s3://{bucket}/metadata/", checked.check_threshold)  # read per photo
        stats = score.score(spark, photos, checked, str(tmp_path / "out"), expected=expected)
    finally:
        for k in AWS_VARS:
            spark.sparkContext.environment.pop(k, None)
    df = read_table(tmp_path / "out")
    assert df["image_id"].tolist() == ids and stats["unreadable"] == 1
    missing = df[df["image_id"] == ids[3]].iloc[0]
    assert f"s3://{bucket}/bin-images/{ids[3]}.jpg does not exist" in missing["error"] and pd.isna(missing["count"])
    # the same counts as the local model on the same photos
    local = predict_files([SAMPLE / "bin-images" / f"{i}.jpg" for i in ids], local_predictor(load(model.model_uri)))
    ok = df["error"].isna()
    assert df["count"][ok].tolist() == local["count"][ok].tolist()
    # the inventory check with the bucket's metadata, read in the executors under reconcile's rule
    for r in df.itertuples():
        meta = objects.get(f"metadata/{r.image_id}.json")
        if meta is None:
            assert r.status == "no_expected_quantity" and pd.isna(r.expected_quantity)
        else:
            assert r.expected_quantity == abid.parse_metadata(meta)
            assert r.status == ("unreadable" if r.image_id == ids[3] else "checked"
                                if r.expected_quantity in CLASSES else "outside_model_range")
    assert 0 < stats["check"]["bins_checked"] < len(ids) and stats["check"]["no_expected_quantity"] > 0


def test_a_manifest_is_scored_row_for_row(spark, model, checked, tmp_path):
    manifest = make_manifest(tmp_path / "cache", n=12, size=48)
    Path(manifest["path"][5]).unlink()  # the cache lost a file
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "manifest.csv"))
    stats = score.score(spark, score.list_photos(f"runs:/{run.info.run_id}/manifest.csv"), checked,
                        str(tmp_path / "out"))
    df = read_table(tmp_path / "out")
    assert df["image_id"].tolist() == sorted(manifest["image_id"]) and stats["rows"] == 12
    bad = df[df["error"].notna()]
    assert bad["image_id"].tolist() == [manifest["image_id"][5]] and "No such file" in bad["error"].iloc[0]


def test_five_bad_photos_among_good_ones_get_their_errors(spark, model, checked, tmp_path):
    folder = tmp_path / "photos"
    make_manifest(folder, n=20, size=48)
    why = bad_files(folder)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2")  # batches made of bad photos only
    try:
        stats = score.score(spark, score.list_photos(str(folder)), checked, str(tmp_path / "out"))
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
    df = read_table(tmp_path / "out").set_index("image_id")
    assert len(df) == 25 and stats["scored"] == 20 and stats["unreadable"] == 5
    for name, text in why.items():
        assert text in df.loc[name, "error"] and f"{name}.jpg" in df.loc[name, "error"], df.loc[name, "error"]
    bad = df.loc[list(why)]
    assert bad["count"].isna().all() and bad["confidence"].isna().all() and bad["p_1"].isna().all()
    good = df.drop(index=list(why))
    assert good["error"].isna().all() and good["count"].notna().all()


@needs_sample
def test_the_inventory_check_agrees_with_bincounter_reconcile(spark, model, checked, tmp_path):
    meta_ids = sorted(p.stem for p in (SAMPLE / "metadata").glob("*.json"))
    no_meta = sorted({p.stem for p in (SAMPLE / "bin-images").glob("*.jpg")} - set(meta_ids))[:10]
    photos, metadata = tmp_path / "photos", tmp_path / "metadata"
    photos.mkdir()
    metadata.mkdir()
    for i in meta_ids + no_meta:
        (photos / f"{i}.jpg").symlink_to(SAMPLE / "bin-images" / f"{i}.jpg")
    for i in meta_ids:
        shutil.copy(SAMPLE / "metadata" / f"{i}.json", metadata)
    (metadata / f"{meta_ids[0]}.json").write_text("{not json")  # bad metadata
    (metadata / "99999999.json").write_text('{"EXPECTED_QUANTITY": 2}')  # a record without a photo
    assert cli.main(["reconcile", "--images", str(photos), "--expected", str(metadata), "--model", model.model_uri,
                     "--output", str(tmp_path / "reconcile.csv")]) == 0
    want = pd.read_csv(tmp_path / "reconcile.csv", dtype={"image_id": str})
    stats = score.score(spark, score.list_photos(str(photos)), checked, str(tmp_path / "out"),
                        expected=score.expectations(str(metadata), checked.check_threshold))
    got = read_table(tmp_path / "out")
    assert len(got) == len(meta_ids) + len(no_meta)
    both = want.merge(got, on="image_id", how="left", suffixes=("", "_score"))
    photo_rows = both[both["status"] != "no_image"]
    assert len(photo_rows) == len(got)
    assert (photo_rows["status"] == photo_rows["status_score"]).all()
    assert (photo_rows["flagged"] == photo_rows["flagged_score"]).all()
    judged = photo_rows[photo_rows["status"] == "checked"]
    assert len(judged) > 250  # the others' counts are 0 or over 5: outside_model_range
    assert (judged["expected_quantity"] == judged["expected_quantity_score"]).all()
    assert (judged["predicted"] == judged["count"]).all()
    assert (judged["p_expected"] - judged["p_expected_score"]).abs().max() < 1e-5
    assert set(photo_rows["status"]) == {"checked", "outside_model_range", "no_expected_quantity", "bad_metadata"}
    assert stats["check"] == pytest.approx(summary(want, checked.check_threshold))  # reconcile's default
    assert stats["check"]["no_image"] == 1 and stats["check"]["bad_metadata"] == 1


def test_a_rerun_replaces_the_output_as_a_whole(spark, model, checked, tmp_path):
    folder = tmp_path / "photos"
    make_manifest(folder, n=10, size=48)
    out = tmp_path / "out"
    score.score(spark, score.list_photos(str(folder)), checked, str(out))
    first = read_table(out)
    # a run that fails in the executors (the model has no such column) leaves the previous output as it was
    broken = score.Model(checked.uri, checked.columns + [("nope", "double")], checked.check_threshold)
    with pytest.raises(Exception, match="nope"):
        score.score(spark, score.list_photos(str(folder), limit=4), broken, str(out))
    pd.testing.assert_frame_equal(read_table(out), first)
    stats = score.score(spark, score.list_photos(str(folder), limit=4), checked, str(out))
    assert len(read_table(out)) == stats["rows"] == 4
    assert json.loads((out / score.MARKER).read_text())["rows"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]  # nothing left beside it


def test_bad_input_gets_one_line_before_spark_works(spark, model, checked, aws, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"input .*empty: no photos"):
        score.list_photos(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a folder, an s3:// prefix or a manifest"):
        score.list_photos(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="there is no bucket 'no-such-bucket'"):
        score.list_photos("s3://no-such-bucket/bin-images/")
    bucket = public_bucket(aws.url, {"other/1.jpg": b"x"})
    with pytest.raises(ValueError, match="no photos"):
        score.list_photos(f"s3://{bucket}/bin-images/")
    with pytest.raises(ValueError, match="model_uri runs:/0123456789abcdef/model: does not load"):
        score.check_model("runs:/0123456789abcdef/model")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a score output"):
        score.score(spark, score.list_photos(str(model.images)), checked, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "thesis.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="spark_master 'localhost'"):
        spark_job.check_master("localhost")
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"spark_master spark://127.0.0.1:{(port := free_port())}: cannot reach"):
        spark_job.check_master(f"spark://127.0.0.1:{port}")
    assert time.monotonic() - start < spark_job.MASTER_CONNECT_TIMEOUT + 5


def test_the_step_logs_its_run(spark, model, tmp_path):
    folder = tmp_path / "photos"
    manifest = make_manifest(folder, n=10, size=48)
    bad_files(folder)
    pd.DataFrame({"image_id": manifest["image_id"], "expected_quantity": manifest["count"]}).to_csv(
        tmp_path / "expected.csv", index=False)
    args = ["--input", str(folder), "--model_uri", model.model_uri, "--output", str(tmp_path / "out"),
            "--expected", str(tmp_path / "expected.csv"), "--partitions", "3", "--batch_size", "4"]
    from steps import score as step
    stats = step.main(step.get_args_parser().parse_args(args))
    run = last_run("score")
    assert run.info.status == "FINISHED"
    m, tags = run.data.metrics, run.data.tags
    assert (m["images"], m["scored"], m["unreadable"], m["bins_checked"], m["bins_unreadable"]) == (15, 10, 5, 10, 0)
    assert m["no_expected_quantity"] == 5
    assert m["flagged"] == m["bins_flagged"] == stats["flagged"] and m["images_per_s"] > 0
    assert tags["bincounter.output"] == (tmp_path / "out").resolve().as_uri().replace("file:///", "file:/")
    assert tags["spark.master"] == "local[2]" and tags["spark.partitions"] == "3"
    assert run.data.params["input"] == str(folder)
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path="score.json")).read_text())
    assert logged["rows"] == 15
    df = read_table(tmp_path / "out")
    assert set(df["status"]) == {"checked", "no_expected_quantity"}  # the bad files have no expected quantity


def test_the_step_with_expected_writes_and_logs_the_recount_sheet(spark, model, tmp_path):
    """recounts.csv in the output and in the run: the flagged bins alone, riskiest first, their photos' sources."""
    folder = tmp_path / "photos"
    manifest = make_manifest(folder, n=10, size=48)
    bad_files(folder)  # no expected quantity: never on the sheet
    records = manifest["count"] + [(1 if c < 5 else -1) * (n % 2) for n, c in enumerate(manifest["count"])]
    pd.DataFrame({"image_id": manifest["image_id"], "expected_quantity": records}).to_csv(
        tmp_path / "expected.csv", index=False)
    probs = predict_files(manifest["path"], local_predictor(load(model.model_uri)))
    p_expected = sorted(float(probs[f"p_{q}"][n]) for n, q in enumerate(records))
    threshold = (p_expected[4] + p_expected[5]) / 2  # half of the bins below it
    from steps import score as step
    args = ["--input", str(folder), "--model_uri", model.model_uri, "--output", str(tmp_path / "out"),
            "--expected", str(tmp_path / "expected.csv"), "--threshold", str(threshold)]
    stats = step.main(step.get_args_parser().parse_args(args))
    df = read_table(tmp_path / "out")
    flagged = df[df["flagged"].eq(True)].sort_values(["p_expected", "image_id"])
    assert len(flagged) == stats["flagged"] == 5
    written = (tmp_path / "out" / score.RECOUNTS).read_bytes()
    assert written.startswith(b"\xef\xbb\xbf")
    sheet = pd.read_csv(tmp_path / "out" / score.RECOUNTS, dtype={"image_id": str}, encoding="utf-8-sig",
                        keep_default_na=False)
    assert sheet["image_id"].tolist() == flagged["image_id"].tolist()
    assert sheet["rank"].tolist() == [1, 2, 3, 4, 5] and (sheet["recount"] == "").all()
    assert sheet["photo"].tolist() == flagged["source"].tolist()
    assert sheet["expected_quantity"].tolist() == flagged["expected_quantity"].tolist()
    assert sheet["predicted"].tolist() == flagged["count"].tolist()
    run = last_run("score")
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=score.RECOUNTS))
    assert logged.read_bytes() == written

    # without `expected`: no sheet (a rerun replaces the output as a whole)
    step.main(step.get_args_parser().parse_args(args[:6]))
    assert not (tmp_path / "out" / score.RECOUNTS).exists()


def test_mlflow_run_refuses_bad_input_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_entry("score", {"input": str(tmp_path / "empty"), "output": str(tmp_path / "out")}, check=False,
                  timeout=300)
    assert p.returncode != 0
    assert f"score: error: input {tmp_path / 'empty'}: no photos there" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("credentials", [False, True])
def test_an_s3_prefix_that_refuses_reads_is_named(monkeypatch, credentials):
    """S3 answers AccessDenied (moto does not enforce it: a stubbed client does): without credentials, and
    with credentials that may not read either."""
    import boto3
    from botocore.stub import Stubber

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(var, "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(s3)
    for _ in range(2):
        stub.add_client_error("list_objects_v2", "AccessDenied", http_status_code=403)
    stub.activate()
    monkeypatch.setattr(score, "_client", lambda signed, workers=16: s3)
    why = "with the AWS credentials found" if credentials else "anonymously, and there are no AWS credentials"
    with pytest.raises(ValueError, match=f"input s3://private-bucket/bin-images/: not readable {why}"):
        score.list_photos("s3://private-bucket/bin-images/")
