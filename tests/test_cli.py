"""The `bincounter` console script: predict (local model or SageMaker endpoint) and reconcile."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from aws import REGION, aws, moto_server  # noqa: F401 (fixtures)
from conftest import SAMPLE, last_run, needs_sample
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)

from bincounter import cli, deploy, reconcile, serving


def bad_files(folder: Path, tiny) -> list[Path]:
    """A text file named .jpg, a truncated JPEG and a path that does not exist."""
    folder.mkdir(exist_ok=True)
    text = folder / "notes.jpg"
    text.write_text("not a photo")
    jpeg = next(tiny.images.glob("*.jpg")).read_bytes()
    cut = folder / "cut.jpg"
    cut.write_bytes(jpeg[: len(jpeg) // 2])
    return [text, cut, folder / "missing.jpg"]


def test_predict_counts_files_and_folders_and_lists_unreadable_images(tiny_model, tmp_path, capsys):
    bad = bad_files(tmp_path / "bad", tiny_model)
    args = ["predict", str(tiny_model.images), *map(str, bad), "--model", tiny_model.model_uri]
    assert cli.main([*args, "--output", str(tmp_path / "out.csv")]) == 0
    out = capsys.readouterr().out
    assert "10 counted, 3 unreadable" in out
    assert "not an image" in out and "truncated" in out and "cannot read" in out

    table = pd.read_csv(tmp_path / "out.csv")
    assert list(table.columns) == ["image", "count", "confidence", *[f"p_{c}" for c in CLASSES], "error"]
    good, unreadable = table[table["error"].isna()], table[table["error"].notna()]
    assert len(good) == 10 and set(good["count"]) <= set(CLASSES) and unreadable["count"].isna().all()
    counter = serving.load(tiny_model.model_uri)  # the same numbers as the library
    probs, _ = counter.probabilities([Path(good["image"].iloc[0]).read_bytes()])
    assert good[[f"p_{c}" for c in CLASSES]].iloc[0].to_numpy() == pytest.approx(probs[0], abs=1e-6)

    assert cli.main([*args, "--output", str(tmp_path / "out.json")]) == 0
    records = json.loads((tmp_path / "out.json").read_text())
    assert len(records) == 13 and records[-1]["count"] is None and "cannot read" in records[-1]["error"]


def test_predict_refuses_an_output_it_cannot_write(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", str(tiny_model.images), "--output", str(tmp_path / "out.xlsx")])
    assert e.value.code == 2 and "--output must end in .csv or .json" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty")]) == 1
    assert "no images in" in capsys.readouterr().err


def test_console_script(tiny_model):
    exe = Path(sys.executable).parent / "bincounter"
    p = subprocess.run([str(exe), "predict", str(tiny_model.images / "3-0.jpg"), "--model", tiny_model.model_uri],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "3-0.jpg" in p.stdout and "1 counted, 0 unreadable" in p.stdout
    p = subprocess.run([str(exe), "predict", "x.jpg", "--model", "runs:/0123456789abcdef0123456789abcdef/model"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("bincounter predict: error:")


def test_predict_through_a_sagemaker_endpoint(aws, tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    good = sorted(tiny_model.images.glob("*.jpg"))[:2]
    bad = bad_files(tmp_path / "bad", tiny_model)[:1]
    answer = [{"count": 2, "confidence": 0.6, **{f"p_{c}": 0.1 for c in CLASSES}, "p_2": 0.6},
              {"count": 4, "confidence": 0.7, **{f"p_{c}": 0.075 for c in CLASSES}, "p_4": 0.7}]
    for a in answer:  # one image per request: moto answers each new request body with the next queued result
        aws.queue_endpoint_result({"predictions": [a]})
    monkeypatch.setattr(deploy, "MAX_PAYLOAD", 1)
    sent = []
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", boto3.Session())  # a session of our own, to watch its calls
    boto3.DEFAULT_SESSION.events.register("before-call.sagemaker-runtime.InvokeEndpoint",
                                          lambda params, **_: sent.append(params))

    out_json = tmp_path / "out.json"
    assert cli.main(["predict", *map(str, good + bad), "--endpoint", "bin-counter-cli", "--region", REGION,
                     "--output", str(out_json)]) == 0
    assert "2 counted, 1 unreadable" in capsys.readouterr().out
    records = json.loads(out_json.read_text())
    assert [r["count"] for r in records] == [2, 4, None] and "not an image" in records[2]["error"]

    assert len(sent) == 2  # the unreadable image never reaches the endpoint
    for params, path in zip(sent, good):
        assert params["headers"]["Content-Type"] == "application/json"
        body = json.loads(params["body"])
        assert body["dataframe_split"]["columns"] == ["image"]
        assert [base64.b64decode(row[0]) for row in body["dataframe_split"]["data"]] == [path.read_bytes()]


def test_reconcile_flags_unlikely_quantities_and_reports_what_it_could_not_check(tmp_path):
    """The rules with a stub model: p(expected), the threshold, agreement and every status."""
    images = tmp_path / "images"
    images.mkdir()
    for i in ("a", "b", "c", "d", "orphan"):
        shutil.copy(Path(__file__).with_name("conftest.py"), images / f"{i}.jpg")  # bytes are the stub's business
    probs = {"a": [0.1, 0.8, 0.1], "b": [0.7, 0.2, 0.1], "c": [0.3, 0.3, 0.4]}

    def stub(data: list[bytes], names: list[str]):
        rows = [probs.get(Path(n).stem, [np.nan] * 3) for n in names]
        table = pd.DataFrame({"count": [[1, 2, 3][int(np.nanargmax(r))] if not np.isnan(r[0]) else 1 for r in rows],
                              "confidence": [np.nanmax(r) if not np.isnan(r[0]) else np.nan for r in rows],
                              **{f"p_{c}": [r[j] for r in rows] for j, c in enumerate([1, 2, 3])}})
        return table, [None if Path(n).stem in probs else f"{n}: cannot decode" for n in names]

    expected = {"a": 2, "b": 2, "c": 9, "d": 1, "gone": 3}
    df = reconcile.reconcile(sorted(images.iterdir()), expected, {"x": "x.json: no EXPECTED_QUANTITY field"}, stub, 0.25)
    rows = df.set_index("image_id")
    assert rows.loc["a", ["predicted", "p_expected", "flagged", "status"]].tolist() == [2, 0.8, False, "checked"]
    assert rows.loc["b", ["predicted", "p_expected", "flagged"]].tolist() == [1, 0.2, True]
    assert rows.loc["c", ["p_expected", "flagged"]].tolist() == [0.0, True]  # 9 is not one of the classes
    assert rows.loc["d", "status"] == "unreadable" and "cannot decode" in rows.loc["d", "error"]
    assert rows.loc["orphan", "status"] == "no_expected_quantity" and rows.loc["gone", "status"] == "no_image"
    assert rows.loc["x", "status"] == "bad_metadata"
    stats = reconcile.summary(df, 0.25)
    assert stats == {"bins_checked": 3, "bins_flagged": 2, "agreement_rate": pytest.approx(1 / 3), "threshold": 0.25,
                     "no_expected_quantity": 1, "no_image": 1, "unreadable": 1, "bad_metadata": 1}
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        reconcile.reconcile([], {}, {}, stub, 1.5)


@needs_sample
def test_reconcile_real_abid_bins_from_metadata_with_report_and_mlflow_run(tiny_model, tmp_path, capsys):
    images, meta = tmp_path / "bin-images", tmp_path / "metadata"
    images.mkdir()
    meta.mkdir()
    for i in ("00001", "00004", "00005", "00009", "00007"):  # EXPECTED_QUANTITY 12, 5, 4, 1, 4
        shutil.copy(SAMPLE / "bin-images" / f"{i}.jpg", images)
        shutil.copy(SAMPLE / "metadata" / f"{i}.json", meta)
    jpeg = (images / "00007.jpg").read_bytes()
    (images / "00007.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # a truncated upload
    shutil.copy(SAMPLE / "bin-images" / "00595.jpg", images)  # a photo without metadata
    shutil.copy(SAMPLE / "metadata" / "00006.json", meta)  # metadata without a photo
    (meta / "00666.json").write_text('{"BIN_FCSKU_DATA": {}}')  # metadata without EXPECTED_QUANTITY
    report, table = tmp_path / "report.html", tmp_path / "bins.csv"

    assert cli.main(["reconcile", "--images", str(images), "--expected", str(meta), "--model", tiny_model.model_uri,
                     "--threshold", "0.5", "--report", str(report), "--output", str(table), "--log-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "bins_checked=4  bins_flagged=4" in out  # a 5-class model never gives 0.5 to anything here

    df = pd.read_csv(table, dtype={"image_id": str}).set_index("image_id")
    assert df.loc[["00001", "00004", "00005", "00009"], "expected_quantity"].tolist() == [12, 5, 4, 1]
    assert df.loc["00001", "p_expected"] == 0  # 12 items: not a count the model knows
    assert df.loc[["00007", "00595", "00006", "00666"], "status"].tolist() == [
        "unreadable", "no_expected_quantity", "no_image", "bad_metadata"]
    page = report.read_text()
    assert page.count("data:image/jpeg;base64,") == 4 and "00666.json: no EXPECTED_QUANTITY field" in page
    assert "<td>00595</td><td>no_expected_quantity</td><td></td>" in page

    run = last_run("reconcile")
    assert run.data.metrics["bins_checked"] == 4 and run.data.metrics["bins_flagged"] == 4
    assert run.data.params["threshold"] == "0.5"
    assert {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)} == {"report.html", "reconcile.csv"}


def test_reconcile_generated_bins_from_a_csv(tiny_model, tmp_path, capsys):
    expected = tmp_path / "expected.csv"
    expected.write_text("image_id,expected_quantity\n" + "".join(
        f"{p.stem},{p.stem.split('-')[0]}\n" for p in sorted(tiny_model.images.glob("*.jpg"))))
    assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(expected), "--model",
                     tiny_model.model_uri, "--threshold", "0", "--report", str(tmp_path / "r.html")]) == 0
    assert "bins_checked=10  bins_flagged=0" in capsys.readouterr().out  # nothing is below probability 0
    assert "Flagged bins (0)" in (tmp_path / "r.html").read_text()
    assert cli.main(["reconcile", "--images", str(tmp_path / "nope"), "--expected", str(expected)]) == 1
    assert "is not a folder" in capsys.readouterr().err
