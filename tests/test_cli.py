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

from bincounter import cli, counters, deploy, reconcile, recounts, report


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
    assert cli.main([*args, "--output", str(tmp_path / "out.csv")]) == 0  # some counted: success
    out, err = capsys.readouterr()
    assert "10 counted, 3 unreadable" in out
    assert err.endswith("bincounter predict: 3 of 13 images could not be counted (see the error column)\n")
    assert "not an image" in out and "truncated" in out and "cannot read" in out

    table = pd.read_csv(tmp_path / "out.csv")
    assert list(table.columns) == ["image", "count", "confidence", "review", *[f"p_{c}" for c in CLASSES], "error"]
    good, unreadable = table[table["error"].isna()], table[table["error"].notna()]
    assert len(good) == 10 and set(good["count"]) <= set(CLASSES) and unreadable["count"].isna().all()
    counter = counters.load(tiny_model.model_uri)  # the same numbers as the library
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
    # an --output that cannot be written is refused before any model is looked up (this one does not exist)
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", str(tiny_model.images), "--model", "runs:/0123456789abcdef0123456789abcdef/model",
                  "--output", str(tmp_path / "no-such-folder" / "out.csv")])
    assert e.value.code == 2
    assert f"--output {tmp_path / 'no-such-folder' / 'out.csv'}: folder {tmp_path / 'no-such-folder'} does not exist" \
        in capsys.readouterr().err


def test_predict_exits_1_when_nothing_was_counted(tiny_model, tmp_path, capsys):
    """A missing, empty, truncated or text file: each listed, and a script can tell that nothing was counted."""
    bad = bad_files(tmp_path / "bad", tiny_model)
    (tmp_path / "bad" / "empty.jpg").write_bytes(b"")
    out_csv = tmp_path / "out.csv"
    assert cli.main(["predict", *map(str, bad), str(tmp_path / "bad" / "empty.jpg"), "--model", tiny_model.model_uri,
                     "--output", str(out_csv)]) == 1
    out, err = capsys.readouterr()
    assert "0 counted, 4 unreadable" in out and "empty (0 bytes)" in out
    assert err.endswith("bincounter predict: error: none of the 4 images could be counted\n")
    assert pd.read_csv(out_csv)["error"].notna().all()  # the table is still written


def test_console_script(tiny_model, capsys):
    """The installed script in a process of its own: cli.main's 1 is its exit status (the counting itself
    in-process)."""
    exe = Path(sys.executable).parent / "bincounter"
    p = subprocess.run([str(exe), "predict", "x.jpg", "--model", "runs:/0123456789abcdef0123456789abcdef/model"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("bincounter predict: error:"), p.stderr[-2000:]
    assert cli.main(["predict", str(tiny_model.images / "3-0.jpg"), "--model", tiny_model.model_uri]) == 0
    out = capsys.readouterr().out
    assert "3-0.jpg" in out and "1 counted, 0 unreadable" in out


def test_predict_through_a_sagemaker_endpoint(aws, tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    good = sorted(tiny_model.images.glob("*.jpg"))[:3]
    bad = bad_files(tmp_path / "bad", tiny_model)[:1]
    answer = [{"count": 2, "confidence": 0.6, **{f"p_{c}": 0.1 for c in CLASSES}, "p_2": 0.6, "error": None},
              {"count": 4, "confidence": 0.7, **{f"p_{c}": 0.075 for c in CLASSES}, "p_4": 0.7, "error": None},
              {"count": None, "confidence": None, **{f"p_{c}": None for c in CLASSES},
               "error": "row 0: 1000x1000 over the endpoint's limit"}]  # the served model's per-row answer
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
    assert "2 counted, 2 unreadable" in capsys.readouterr().out
    records = json.loads(out_json.read_text())
    assert [r["count"] for r in records] == [2, 4, None, None] and "not an image" in records[3]["error"]
    assert records[2]["error"] == f"{good[2]}: endpoint: row 0: 1000x1000 over the endpoint's limit"

    assert len(sent) == 3  # the unreadable image never reaches the endpoint
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
    # 9 is not one of the model's classes: it cannot judge it, so not flagged and out of the agreement rate
    assert rows.loc["c", ["predicted", "flagged", "status"]].tolist() == [3, False, "outside_model_range"]
    assert np.isnan(rows.loc["c", "p_expected"]) and "9 is not one of the model's counts" in rows.loc["c", "error"]
    assert rows.loc["d", "status"] == "unreadable" and "cannot decode" in rows.loc["d", "error"]
    assert rows.loc["orphan", "status"] == "no_expected_quantity" and rows.loc["gone", "status"] == "no_image"
    assert rows.loc["x", "status"] == "bad_metadata"
    stats = reconcile.summary(df, 0.25)
    assert stats == {"bins_checked": 2, "bins_flagged": 1, "agreement_rate": 0.5, "threshold": 0.25,
                     "outside_model_range": 1, "no_expected_quantity": 1, "no_image": 1, "unreadable": 1,
                     "bad_metadata": 1}
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
    out, err = capsys.readouterr()
    assert "bins_checked=3  bins_flagged=3" in out  # a 5-class model never gives 0.5 to anything here
    assert "outside_model_range=1" in out and "outside_model_range 00001: expected quantity 12" in err
    assert "unreadable 00007:" in err and "bad_metadata 00666: 00666.json: no EXPECTED_QUANTITY field" in err

    df = pd.read_csv(table, dtype={"image_id": str}).set_index("image_id")
    assert df.loc[["00001", "00004", "00005", "00009"], "expected_quantity"].tolist() == [12, 5, 4, 1]
    assert df.loc["00001", "status"] == "outside_model_range" and not df.loc["00001", "flagged"]  # 12 items
    assert df.loc[["00007", "00595", "00006", "00666"], "status"].tolist() == [
        "unreadable", "no_expected_quantity", "no_image", "bad_metadata"]
    page = report.read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and "00666.json: no EXPECTED_QUANTITY field" in page
    assert "<td>00595</td><td>no_expected_quantity</td><td></td>" in page

    run = last_run("reconcile")
    assert run.data.metrics["bins_checked"] == 3 and run.data.metrics["bins_flagged"] == 3
    assert run.data.metrics["outside_model_range"] == 1
    assert run.data.params["threshold"] == "0.5"
    assert {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)} == {
        "report.html", "reconcile.csv", "recounts.csv"}


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


def test_reconcile_writes_the_recount_sheet_of_its_flagged_bins_riskiest_first(tiny_model, tmp_path, capsys):
    """Beside the report by default, where --recounts says otherwise; the report links it, the MLflow run logs
    it, and a person's spreadsheet reads it as a recount sheet."""
    photos = sorted(tiny_model.images.glob("*.jpg"))  # <count>-<k>.jpg: every other record is off by one
    expected = tmp_path / "expected.csv"
    expected.write_text("image_id,expected_quantity\n" + "".join(
        f"{p.stem},{int(p.stem[0]) + (n % 2) * (1 if p.stem[0] < '5' else -1)}\n" for n, p in enumerate(photos)))
    args = ["reconcile", "--images", str(tiny_model.images), "--expected", str(expected), "--model",
            tiny_model.model_uri]
    assert cli.main([*args, "--output", str(tmp_path / "bins.csv")]) == 0  # no --report, no --recounts: no sheet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bins.csv", "expected.csv"]
    checked = pd.read_csv(tmp_path / "bins.csv", dtype={"image_id": str})
    threshold = float(checked["p_expected"].median())  # about half the bins flagged
    capsys.readouterr()

    report_path = tmp_path / "out" / "check.html"
    report_path.parent.mkdir()
    assert cli.main([*args, "--threshold", str(threshold), "--report", str(report_path), "--log-mlflow"]) == 0
    sheet_path = tmp_path / "out" / "check.recounts.csv"
    flagged = checked[checked["p_expected"] < threshold].sort_values(["p_expected", "image_id"])
    assert 0 < len(flagged) < len(checked)
    assert f"wrote {sheet_path}: {len(flagged)} bins to recount, riskiest first" in capsys.readouterr().out
    assert sheet_path.read_bytes().startswith(b"\xef\xbb\xbf")  # a BOM: spreadsheets read it as UTF-8
    sheet = pd.read_csv(sheet_path, dtype={"image_id": str}, encoding="utf-8-sig", keep_default_na=False)
    assert list(sheet.columns) == recounts.SHEET_COLUMNS
    assert sheet["image_id"].tolist() == flagged["image_id"].tolist()
    assert sheet["rank"].tolist() == list(range(1, len(flagged) + 1))
    assert sheet["p_expected"].astype(float).is_monotonic_increasing and (sheet["recount"] == "").all()
    assert sheet["expected_quantity"].tolist() == flagged["expected_quantity"].tolist()
    assert sheet["photo"].tolist() == [str((tiny_model.images / f"{i}.jpg").resolve()) for i in sheet["image_id"]]
    assert "<a href='check.recounts.csv'>check.recounts.csv</a>" in report_path.read_text()
    _, _, read_back = recounts.read_sheet(sheet_path)  # what ingest reads: every row waiting for a recount
    assert read_back["rows"] == read_back["skipped_empty"] == len(flagged)
    run = last_run("reconcile")
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="recounts.csv")
    assert Path(logged).read_bytes() == sheet_path.read_bytes()

    # --recounts elsewhere: written there, and the report links it relative to itself
    (tmp_path / "sheets").mkdir()
    assert cli.main([*args, "--threshold", str(threshold), "--report", str(report_path), "--recounts",
                     str(tmp_path / "sheets" / "monday.csv")]) == 0
    assert (tmp_path / "sheets" / "monday.csv").read_bytes() == sheet_path.read_bytes()
    assert "<a href='../sheets/monday.csv'>../sheets/monday.csv</a>" in report_path.read_text()
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--recounts", str(tmp_path / "monday.xlsx")])
    assert e.value.code == 2 and "--recounts must end in .csv" in capsys.readouterr().err


BAD_VALUES = {"neg": ("-2", -2, "is negative (-2)"), "text": ("abc", "abc", "is 'abc', not a whole number"),
              "half": ("3.5", 3.5, "is 3.5, not a whole number"), "blank": ("", None, "")}


def test_expected_quantities_follow_one_rule_in_a_csv_and_in_metadata(tmp_path):
    """The same values in a CSV and in ABID JSON: the same bins usable, the same bins refused with a reason,
    and nothing stops the reading."""
    csv_path, meta = tmp_path / "expected.csv", tmp_path / "metadata"
    meta.mkdir()
    good = {"ok": ("3", 3), "whole": ("3.0", 3.0), "many": ("12", 12)}
    cells = {**{k: v[0] for k, v in good.items()}, **{k: v[0] for k, v in BAD_VALUES.items()}}
    csv_path.write_text("image_id,expected_quantity\n" + "".join(f"{i},{v}\n" for i, v in cells.items()))
    for i, v in {**{k: v[1] for k, v in good.items()}, **{k: v[1] for k, v in BAD_VALUES.items()}}.items():
        (meta / f"{i}.json").write_text(json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": v}))

    from_csv, csv_problems = reconcile.read_expected(csv_path)
    from_json, json_problems = reconcile.read_expected(meta)
    assert from_csv == from_json == {"ok": 3, "whole": 3, "many": 12}
    assert set(csv_problems) == set(json_problems) == set(BAD_VALUES)
    for i, (_, _, why) in BAD_VALUES.items():
        assert why in json_problems[i] and json_problems[i].startswith(f"{i}.json: EXPECTED_QUANTITY")
    assert csv_problems["neg"] == "expected.csv line 5: expected_quantity is negative (-2)"
    assert csv_problems["text"] == "expected.csv line 6: expected_quantity is 'abc', not a whole number"
    assert csv_problems["blank"] == "expected.csv line 8: expected_quantity is blank"
    assert json_problems["blank"] == "blank.json: EXPECTED_QUANTITY is None, not a whole number"  # JSON null

    # only some bins (as batch scoring asks): a folder opens just their files
    assert reconcile.read_expected(meta, ["ok", "neg", "absent"]) == ({"ok": 3}, {"neg": json_problems["neg"]})
    assert reconcile.read_expected(csv_path, ["ok", "neg"]) == ({"ok": 3}, {"neg": csv_problems["neg"]})

    # a bin listed twice with two quantities, a row without an id: problems of those rows; no columns: the file
    (tmp_path / "twice.csv").write_text("image_id,count\na,1\na,2\n,4\nb,5\n")
    assert reconcile.read_expected(tmp_path / "twice.csv") == (
        {"b": 5}, {"a": "twice.csv line 3: a is listed again, with 2 after 1", "line 4": "twice.csv line 4: no image_id"})
    (tmp_path / "cols.csv").write_text("id,qty\na,1\n")
    with pytest.raises(ValueError, match=r"cols.csv: needs columns image_id and expected_quantity \(has \['id', 'qty'\]\)"):
        reconcile.read_expected(tmp_path / "cols.csv")


def test_reconcile_goes_on_past_bad_expectations_and_lists_them(tiny_model, tmp_path, capsys):
    """One CSV with bad values and quantities the model has no class for: the good bins are checked, the console
    names the first five problems and how many more, and the agreement rate counts only checked bins."""
    photos = sorted(tiny_model.images.glob("*.jpg"))  # <count>-<k>.jpg, counts 1..5
    values = ["-2", "abc", "", "3.5", "-1", "x", "7e", "12", "17"]
    lines = [f"{p.stem},{v}" for p, v in zip(photos, values)] + [f"{photos[-1].stem},{photos[-1].stem[0]}"]
    (tmp_path / "expected.csv").write_text("image_id,expected_quantity\n" + "\n".join(lines) + "\n")
    out_csv = tmp_path / "bins.csv"
    assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(tmp_path / "expected.csv"),
                     "--model", tiny_model.model_uri, "--output", str(out_csv)]) == 0
    out, err = capsys.readouterr()
    assert "bins_checked=1 " in out and "outside_model_range=2" in out and "bad_metadata=7" in out
    bad_lines = [line for line in err.splitlines() if line.startswith("bad_metadata")]
    assert bad_lines[0] == f"bad_metadata {photos[0].stem}: expected.csv line 2: expected_quantity is negative (-2)"
    assert len(bad_lines) == 6 and bad_lines[-1] == "bad_metadata: and 2 more (all in the --output table)"
    assert f"outside_model_range {photos[7].stem}: expected quantity 12 is not one of the model's counts" in err
    df = pd.read_csv(out_csv)
    assert df["status"].value_counts().to_dict() == {"bad_metadata": 7, "outside_model_range": 2, "checked": 1}
    assert not df.loc[df["status"] == "outside_model_range", "flagged"].any()


def test_reconcile_checks_its_output_paths_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "e.csv").write_text("image_id,expected_quantity\n")
    (tmp_path / "taken.csv").mkdir()
    for option, path in (("--report", "/nonexistent/r.html"), ("--output", str(tmp_path / "taken.csv"))):
        with pytest.raises(SystemExit) as e:  # the model does not exist: had it been loaded first, exit 1
            cli.main(["reconcile", "--images", str(tmp_path / "images"), "--expected", str(tmp_path / "e.csv"),
                      "--model", "runs:/0123456789abcdef0123456789abcdef/model", option, path])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (f"{option} {path}: folder /nonexistent does not exist" if option == "--report"
                else f"--output {path}: {path} is a folder") in err


def test_a_write_that_fails_after_the_work_keeps_the_finished_table(tiny_model, tmp_path, monkeypatch, capsys):
    """The report cannot be written once the counting is done (a full disk): the table is written all the
    same, the run says what failed and where the table is, and exits 1."""
    expected = tmp_path / "expected.csv"
    expected.write_text("image_id,expected_quantity\n" + "".join(
        f"{p.stem},{p.stem.split('-')[0]}\n" for p in sorted(tiny_model.images.glob("*.jpg"))))

    def full_disk(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report, "html_report", full_disk)
    args = ["reconcile", "--images", str(tiny_model.images), "--expected", str(expected), "--model",
            tiny_model.model_uri, "--report", str(tmp_path / "r.html")]
    assert cli.main([*args, "--output", str(tmp_path / "bins.csv")]) == 1
    out, err = capsys.readouterr()
    assert f"wrote {tmp_path / 'bins.csv'}" in out and len(pd.read_csv(tmp_path / "bins.csv")) == 10
    assert err.endswith(f"bincounter reconcile: error: could not write --report {tmp_path / 'r.html'}: "
                        "No space left on device\n")

    assert cli.main(args) == 1  # no --output: the table goes to a file of its own, and the run says where
    saved = [line for line in capsys.readouterr().err.splitlines() if "the table is saved in" in line]
    assert len(saved) == 1
    path = Path(saved[0].split("saved in ")[1])
    assert pd.read_csv(path)["status"].eq("checked").sum() == 10
    path.unlink()


def test_reconcile_exits_1_when_no_bin_could_be_checked(tiny_model, tmp_path, capsys):
    (tmp_path / "expected.csv").write_text("image_id,expected_quantity\nnot-a-photo,3\n")
    assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(tmp_path / "expected.csv"),
                     "--model", tiny_model.model_uri]) == 1
    out, err = capsys.readouterr()
    assert "agreement_rate=n/a (no bin checked)" in out and "no_image=1" in out
    assert err.endswith("bincounter reconcile: error: no bin could be checked (no photo with a usable expected "
                        "quantity was read)\n")
