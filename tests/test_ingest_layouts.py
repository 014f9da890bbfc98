"""ingest source=local in the three layouts (a folder per count, a CSV, the ABID layout) and with a filled recount
sheet, through the step: 30-photo samples with mixed-case extensions, the manifest's ids, counts, source and
original path, and every bad input rejected per photo or row while the run goes on."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from aws import moto_endpoint, public_bucket
from conftest import last_run, stamped_today

from bincounter import entry
from bincounter.layouts import readable_id
from bincounter.manifest import COLUMNS, read_manifest
from bincounter.recounts import SHEET_COLUMNS
from bincounter.synthetic import draw_bin
from steps import ingest as step

EXTS = [".JPG", ".jpeg", ".Png", ".jpg", ".PNG", ".Jpeg"]


def photo(path: Path, count: int, seed: int) -> Path:
    """A small generated bin photo of `count` items at `path`, PNG or JPEG as its extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    draw_bin(count, seed, 40).save(buf, "PNG" if path.suffix.lower() == ".png" else "JPEG")
    path.write_bytes(buf.getvalue())
    return path


def sample(n: int = 30) -> list[tuple[str, int]]:
    """(relative path, count) of n photos, 6 per count 1..5; the same file names in every count folder."""
    return [(f"{1 + i % 5}/IMG_{i // 5:04d}{EXTS[i % len(EXTS)]}", 1 + i % 5) for i in range(n)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ingest(*argv) -> tuple[pd.DataFrame, pd.DataFrame, dict, object]:
    """Run the step in-process -> (manifest.csv and rejects.csv as logged, the run's metrics, the run)."""
    step.main(step.get_args_parser().parse_args([str(a) for a in argv]))
    run = last_run("ingest")
    assert run.info.status == "FINISHED"
    got = {n: Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=n))
           for n in ("manifest.csv", "rejects.csv")}
    return (read_manifest(got["manifest.csv"]), pd.read_csv(got["rejects.csv"], dtype=str, keep_default_na=False),
            run.data.metrics, run)


def local(data_dir, cache: Path, *extra) -> list:
    return ["--source", "local", "--data_dir", data_dir, "--cache_dir", cache, "--cache_size", 32,
            "--downloads", 2, *extra]


def reasons(rejects: pd.DataFrame) -> dict[str, str]:
    """{image_id: reason} of the rejects (each id once here)."""
    assert rejects["image_id"].is_unique, rejects
    return dict(zip(rejects["image_id"], rejects["reason"]))


def detail(rejects: pd.DataFrame, image_id: str) -> str:
    return rejects.set_index("image_id").at[image_id, "detail"]


# --- a folder per count ---------------------------------------------------------------------------------------

def test_a_folder_per_count(tmp_path):
    root = tmp_path / "photos"
    for n, (rel, count) in enumerate(sample()):
        photo(root / rel, count, n)
    photo(root / "seven" / "IMG_0100.jpg", 3, 100)  # not a count
    photo(root / "9" / "IMG_0101.JPG", 3, 101)  # outside count_min..count_max
    (root / "2" / "IMG_0102.JPG").write_bytes(b"this is not a photo")  # does not decode
    (root / "2" / "notes.txt").write_text("shelf 2")

    m, rejects, metrics, run = ingest(*local(root, tmp_path / "cache"))
    assert list(m.columns) == COLUMNS
    expected = {f"{c}-{Path(rel).stem}": c for rel, c in sample()}  # 3/IMG_0002.jpeg -> 3-IMG_0002
    assert dict(zip(m["image_id"], m["count"])) == expected
    assert m["original"].tolist() == sorted((rel for rel, _ in sample()), key=readable_id)
    assert set(m["source"]) == {"photos"} and set(m["count_from"]) == {"labels"} and m["recounted_on"].isna().all()
    assert m["sha256"].tolist() == [sha(root / rel) for rel in m["original"]]  # each photo its own

    assert reasons(rejects) == {"seven-IMG_0100": "bad_count", "9-IMG_0101": "count_out_of_range",
                                "2-IMG_0102": "not_an_image", "2-notes": "not_a_photo"}
    assert "folder 'seven' is not a count" in detail(rejects, "seven-IMG_0100")
    assert "count 9 is outside count_min..count_max 1..5" in detail(rejects, "9-IMG_0101")
    assert str(root.resolve() / "2" / "IMG_0102.JPG") in detail(rejects, "2-IMG_0102")
    assert (metrics["ingested"], metrics["rejected"], metrics["ingested_photos"], metrics["rejected_photos"]) == \
        (30, 4, 30, 4)
    assert metrics["rejected_bad_count"] == metrics["rejected_count_out_of_range"] == 1
    assert metrics["rejected_not_an_image"] == metrics["rejected_not_a_photo"] == 1
    assert metrics["count_3"] == 6 and metrics["downloaded"] == 31  # the 30 and the one that does not decode
    [inp] = run.inputs.dataset_inputs
    assert json.loads(inp.dataset.source)["uri"] == str(root.resolve())

    # a rerun answers from the cache (records kept per folder), with the same manifest
    m2, _, metrics2, _ = ingest(*local(root, tmp_path / "cache", "--layout", "imagefolder"))
    assert metrics2["cache_hits"] == 30 and metrics2["downloaded"] == 1
    pd.testing.assert_frame_equal(m2.drop(columns="path"), m.drop(columns="path"))


# --- a CSV --------------------------------------------------------------------------------------------------

def test_a_csv_of_paths_and_counts(tmp_path):
    shelf = tmp_path / "shelf"
    rows = [(f"img/{c}_{Path(rel).name}", c) for rel, c in sample()]  # file names unique in one folder
    for n, (cell, c) in enumerate(rows):
        photo(shelf / cell, c, n)
    rows[3] = (str(shelf / rows[3][0]), rows[3][1])  # an absolute path
    outside = photo(tmp_path / "elsewhere" / "secret.jpg", 2, 99)
    (shelf / "img" / "link.jpg").symlink_to(outside)  # inside the folder, leading out of it
    photo(shelf / "img" / "bad.jpg", 2, 98)
    broken = photo(shelf / "img" / "broken.PNG", 4, 97)
    broken.write_bytes(broken.read_bytes()[:300])  # cut short: does not decode
    lines = ["path,count", *(f"{p},{c}" for p, c in rows), "img/bad.jpg,three", "img/gone.jpg,2",
             "img/link.jpg,2", "img/broken.PNG,4"]
    (shelf / "counts.csv").write_text("\n".join(lines) + "\n")

    m, rejects, metrics, _ = ingest(*local(shelf / "counts.csv", tmp_path / "cache"))
    assert dict(zip(m["image_id"], m["count"])) == {f"img-{Path(p).stem}": c for p, c in rows}
    assert set(m["source"]) == {"counts.csv"} and set(m["count_from"]) == {"labels"}
    by_id = m.set_index("image_id")
    assert by_id.at["img-4_IMG_0000", "original"] == str(shelf / "img/4_IMG_0000.jpg")  # row 5: as written
    assert by_id.at["img-4_IMG_0000", "sha256"] == sha(shelf / "img" / "4_IMG_0000.jpg")
    assert by_id.at["img-1_IMG_0000", "original"] == "img/1_IMG_0000.JPG"

    assert reasons(rejects) == {"img-bad": "bad_count", "img-gone": "missing_image", "img-link": "outside_folder",
                                "img-broken": "corrupt_image"}
    csv = shelf / "counts.csv"
    assert detail(rejects, "img-bad").startswith(f"{csv} row 32: ") and "'three', not a whole number" in \
        detail(rejects, "img-bad")
    assert detail(rejects, "img-gone").startswith(f"{csv} row 33: img/gone.jpg: ")
    assert detail(rejects, "img-link") == (f"{csv} row 34: img/link.jpg leads to {outside.resolve()}, outside the "
                                           f"CSV's folder {shelf.resolve()}")
    assert (metrics["ingested"], metrics["rejected"], metrics["rejected_counts_csv"]) == (30, 4, 4)
    assert metrics["rejected_outside_folder"] == metrics["rejected_missing_image"] == 1


def test_a_csv_of_ids_beside_its_photos(tmp_path):
    folder = tmp_path / "bins"
    ids = {f"B{n:03d}": c for n, (_, c) in enumerate(sample())}
    for n, (image_id, c) in enumerate(ids.items()):
        photo(folder / f"{image_id}{EXTS[n % len(EXTS)]}", c, n)
    (folder / "labels.csv").write_text("image_id,count\n" + "".join(f"{i},{c}\n" for i, c in ids.items())
                                       + "B900,2\nB000,7\n")
    m, rejects, metrics, _ = ingest(*local(folder / "labels.csv", tmp_path / "cache", "--layout", "csv"))
    assert dict(zip(m["image_id"], m["count"])) == ids
    assert m.set_index("image_id").at["B002", "original"] == "B002.Png"
    assert rejects[["image_id", "reason"]].values.tolist() == [["B000", "count_out_of_range"],
                                                                ["B900", "missing_image"]]
    assert metrics["ingested_labels_csv"] == 30  # B000's good row is ingested once, its bad row rejected


# --- the ABID layout ------------------------------------------------------------------------------------------

def test_the_abid_layout_in_any_case(tmp_path):
    root = tmp_path / "abid"
    ids = {f"{n:05d}": c for n, (_, c) in enumerate(sample())}
    for n, (image_id, c) in enumerate(ids.items()):
        photo(root / "bin-images" / f"{image_id}{EXTS[n % len(EXTS)]}", c, n)
    photo(root / "bin-images" / "00900.jpg", 1, 90)
    photo(root / "bin-images" / "00900.PNG", 1, 91)  # one id, two photos
    photo(root / "bin-images" / "00901.jpg", 1, 92)  # no count anywhere
    (root / "bin-images" / "notes.txt").write_text("shelf A")
    (root / "bin-images" / "00902.jpeg").write_bytes(b"GIF89a not a jpeg")
    (root / "metadata").mkdir()
    (root / "metadata" / "00000.json").write_text(json.dumps({"EXPECTED_QUANTITY": 1}))
    (root / "labels.csv").write_text("image_id,count\n" + "".join(f"{i},{c}\n" for i, c in ids.items())
                                     + "00900,1\n00902,2\n")

    m, rejects, metrics, _ = ingest(*local(root, tmp_path / "cache", "--file_list", "all"))
    assert dict(zip(m["image_id"], m["count"])) == ids
    by_id = m.set_index("image_id")
    assert by_id.at["00001", "original"] == "bin-images/00001.jpeg"
    assert by_id.at["00002", "sha256"] == sha(root / "bin-images" / "00002.Png")
    assert by_id.at["00000", "count_from"] == "metadata" and by_id.at["00001", "count_from"] == "labels"
    assert set(m["source"]) == {"abid"}
    assert rejects[["image_id", "reason"]].values.tolist() == [
        ["00900", "duplicate"], ["00900", "duplicate"], ["00901", "unknown_count"], ["00902", "not_an_image"],
        ["notes", "not_a_photo"]]
    assert "00900.PNG and 00900.jpg are both image 00900; none is taken" in rejects["detail"][0]
    assert (metrics["ingested"], metrics["rejected"], metrics["rejected_abid"]) == (30, 5, 5)

    # a file list: a listed id whose photos are refused is rejected as what they are, not as missing
    fl = tmp_path / "file_list.json"
    fl.write_text(json.dumps({"1": ["metadata/00000.json", "metadata/00900.json"], "3": ["metadata/00903.json"]}))
    m, rejects, metrics, _ = ingest(*local(root, tmp_path / "cache", "--file_list", fl))
    assert m["image_id"].tolist() == ["00000"]
    assert rejects[["image_id", "reason"]].values.tolist() == [["00900", "duplicate"], ["00900", "duplicate"],
                                                                ["00903", "missing_image"]]


# --- a filled recount sheet -----------------------------------------------------------------------------------

def sheet(path: Path, rows: list[dict]) -> Path:
    """A recount sheet (recounts.SHEET_COLUMNS) with these rows filled in, as a person leaves it."""
    full = [{"rank": n + 1, "expected_quantity": 2, "predicted": 3, "p_expected": 0.01, "note": "", **r}
            for n, r in enumerate(rows)]
    extra = [c for r in rows for c in r if c not in SHEET_COLUMNS]  # recounted_on, where a row has a date
    pd.DataFrame(full, columns=[*SHEET_COLUMNS, *dict.fromkeys(extra)]).to_csv(path, index=False)
    return path


def test_recounts_win_over_every_other_label(tmp_path):
    root = tmp_path / "photos"
    for n, (rel, count) in enumerate(sample()[:10]):
        photo(root / rel, count, n)
    recounted = photo(tmp_path / "recount" / "1-IMG_0000.jpg", 4, 500)  # the bin, photographed again
    new = photo(tmp_path / "recount" / "bin-77.JPG", 2, 501)
    endpoint = moto_endpoint()
    buf = io.BytesIO()
    draw_bin(5, 502, 40).save(buf, "JPEG")
    bucket = public_bucket(endpoint, {"bin-images/bin-78.jpg": buf.getvalue()})
    path = sheet(tmp_path / "recount_sheet.csv", [
        {"image_id": "1-IMG_0000", "photo": str(recounted), "recount": "4"},  # row 2: also in data_dir
        {"image_id": "bin-77", "photo": str(new), "recount": "2.0"},
        {"image_id": "bin-78", "photo": f"s3://{bucket}/bin-images/bin-78.jpg", "recount": "5"},
        {"image_id": "bin-79", "photo": str(new), "recount": ""},  # row 5: left empty
        {"image_id": "2-IMG_0000", "photo": str(new), "recount": "two"},  # row 6
        {"image_id": "bin-80", "photo": str(new), "recount": "9"},  # row 7: not one of the model's counts
        {"image_id": "bin-81", "photo": str(tmp_path / "gone.jpg"), "recount": "1"}])

    m, rejects, metrics, _ = ingest(*local(root, tmp_path / "cache", "--recounts", path, "--endpoint_url", endpoint))
    by_id = m.set_index("image_id")
    assert len(m) == 12 and m["image_id"].is_unique  # 10 from the folder, the recount of one of them, 2 new
    recounts = by_id[by_id["source"] == "recount"]
    assert recounts["count"].to_dict() == {"1-IMG_0000": 4, "bin-77": 2, "bin-78": 5}
    assert set(recounts["count_from"]) == {"recount"} and stamped_today(recounts["recounted_on"])
    assert recounts.at["1-IMG_0000", "sha256"] == sha(recounted)  # the recount's photo, not the folder's
    assert recounts.at["bin-78", "original"] == f"s3://{bucket}/bin-images/bin-78.jpg"
    assert by_id.at["2-IMG_0000", "source"] == "photos" and by_id.at["2-IMG_0000", "count"] == 2
    assert by_id.loc[by_id["source"] == "photos", "recounted_on"].isna().all()

    rows = rejects.set_index(["image_id", "reason"])["detail"]
    assert sorted(rows.index) == [("1-IMG_0000", "duplicate_id"), ("2-IMG_0000", "bad_count"),
                                  ("bin-80", "count_out_of_range"), ("bin-81", "missing_image")]
    assert rows["1-IMG_0000", "duplicate_id"] == (f"1-IMG_0000: bin 1-IMG_0000 is in recount ({path}) and photos "
                                                  f"({root.resolve()}); took recount's")
    assert rows["2-IMG_0000", "bad_count"].startswith("recount_sheet.csv row 6: ")
    assert rows["bin-80", "count_out_of_range"].startswith("recount_sheet.csv row 7: recount 9 is not one of")
    assert (metrics["recount_rows"], metrics["recount_skipped_empty"], metrics["recount_rejected"]) == (7, 1, 2)
    assert (metrics["ingested_recount"], metrics["rejected_recount"], metrics["ingested_photos"]) == (3, 3, 9)
    assert metrics["duplicate_ids"] == 1 and metrics["rejected"] == 3


def test_recounts_alone_from_a_run(tmp_path):
    """source=local without data_dir: the manifest is the recounts; the sheet as a run's artifact."""
    shot = photo(tmp_path / "p" / "00523.png", 3, 7)
    path = sheet(tmp_path / "recount_sheet.csv", [{"image_id": "00523", "photo": str(shot), "recount": "3"},
                                                  {"image_id": "00524", "photo": str(shot), "recount": ""}])
    with mlflow.start_run() as reconcile:
        mlflow.log_artifact(str(path))
    uri = f"runs:/{reconcile.info.run_id}/recount_sheet.csv"
    m, rejects, metrics, run = ingest("--source", "local", "--recounts", uri, "--cache_dir", tmp_path / "cache",
                                      "--cache_size", 32)
    assert m[["image_id", "count", "source", "count_from", "original"]].values.tolist() == [
        ["00523", 3, "recount", "recount", str(shot)]]
    assert rejects.empty and metrics["recount_skipped_empty"] == 1 and metrics["ingested"] == 1
    assert run.data.params["recounts"] == uri
    [inp] = run.inputs.dataset_inputs  # the copy read: MLflow takes no runs:/ URI as a dataset's source
    assert json.loads(inp.dataset.source)["uri"].endswith("recount_sheet.csv")


def test_a_recount_of_a_generated_bin(tmp_path):
    """Recounts beside another source (here the generator): the recount wins, the generated copy is a duplicate."""
    shot = photo(tmp_path / "p" / "again.jpg", 5, 3)
    path = sheet(tmp_path / "s.csv", [{"image_id": "syn0-000001", "photo": str(shot), "recount": "5",
                                       "recounted_on": "2024-05-31"}])
    m, rejects, metrics, _ = ingest("--source", "synthetic", "--num_images", 5, "--seed", 0, "--recounts", path,
                                    "--cache_dir", tmp_path / "cache", "--cache_size", 32)
    by_id = m.set_index("image_id")
    assert len(m) == 5 and by_id.at["syn0-000001", "source"] == "recount" and by_id.at["syn0-000001", "count"] == 5
    assert by_id.at["syn0-000001", "recounted_on"] == "2024-05-31"
    assert by_id.at["syn0-000002", "source"].startswith("synthetic://seed=0/")
    assert rejects[["image_id", "reason"]].values.tolist() == [["syn0-000001", "duplicate_id"]]
    assert metrics["duplicate_ids"] == 1 and metrics["ingested_recount"] == 1


def test_a_sheet_that_is_not_a_recount_sheet_fails_in_one_line(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["a"], "count": [3]}).to_csv(path, index=False)
    argv = ["--source", "local", "--recounts", str(path), "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as e:
        entry.run(step.main, step.get_args_parser(), argv)
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ingest: error: recounts: recount sheet {path}: missing columns photo, recount (it has image_id, count); "
        f"not a recount sheet"]
    assert mlflow.search_runs(output_format="list") == []


def test_a_sheet_with_nothing_filled_in_is_refused(tmp_path):
    path = sheet(tmp_path / "s.csv", [{"image_id": "a", "photo": "/p/a.jpg", "recount": ""}])
    with pytest.raises(ValueError, match=r"^recounts: .*s.csv has no recount filled in \(1 rows left empty\)"):
        step.main(step.get_args_parser().parse_args(["--source", "local", "--recounts", str(path)]))


# --- refused parameters ---------------------------------------------------------------------------------------

REFUSED = {  # argv ({photos}, {abid}, {tmp} filled in) -> the message's start
    "layout": (["--data_dir", "{photos}", "--layout", "zip"],
               "layout: unknown layout 'zip' (expected one of auto, imagefolder, csv, abid)"),
    "no layout": (["--data_dir", "{tmp}/plain"], "data_dir: {tmp}/plain has no bin-images/ folder (the ABID "
                                                 "layout) and no folder named by a count, such as 3/"),
    "not a csv": (["--data_dir", "{tmp}/photos.zip"], "data_dir: {tmp}/photos.zip is a file but not a .csv"),
    "file list": (["--data_dir", "{photos}", "--file_list", "{tmp}/fl.json"],
                  "file_list: {photos} labels its own photos (layout imagefolder); a file list picks bins of "
                  "ABID-layout folders"),
    "mixed": (["--data_dir", "{photos},{abid}"], "file_list: {photos} labels its own photos"),
    "named recount": (["--data_dir", "{tmp}/recount", "--recounts", "{tmp}/s.csv"],
                      "data_dir: a path is named 'recount', the source of recounts"),
    "missing sheet": (["--data_dir", "{photos}", "--recounts", "{tmp}/nope.csv"],
                      "recounts: recount sheet {tmp}/nope.csv does not exist"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_parameters_are_refused_before_a_run(case, tmp_path):
    photo(tmp_path / "photos" / "2" / "a.jpg", 2, 0)
    photo(tmp_path / "recount" / "2" / "a.jpg", 2, 0)
    photo(tmp_path / "abid" / "bin-images" / "1.jpg", 2, 0)
    (tmp_path / "plain").mkdir()
    (tmp_path / "photos.zip").write_bytes(b"PK")
    sheet(tmp_path / "s.csv", [{"image_id": "a", "photo": "/p/a.jpg", "recount": "1"}])
    fill = {"photos": tmp_path / "photos", "abid": tmp_path / "abid", "tmp": tmp_path}
    argv, message = REFUSED[case]
    with pytest.raises(ValueError) as e:
        step.main(step.get_args_parser().parse_args(["--source", "local", "--cache_dir", str(tmp_path / "cache"),
                                                     *(a.format(**fill) for a in argv)]))
    assert str(e.value).startswith(message.format(**fill))
    assert mlflow.search_runs(output_format="list") == []
