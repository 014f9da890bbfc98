"""The recount sheet: flagged bins out (riskiest first), a person's recounts back as labels, bad rows rejected."""
from __future__ import annotations


import pandas as pd
import pytest

from bincounter import recounts
from bincounter.manifest import REJECT_COLUMNS
from conftest import stamped_today

# reconcile.COLUMNS, written out: importing reconcile loads torch, seconds this test does not need
COLUMNS = ["image_id", "path", "expected_quantity", "predicted", "confidence", "p_expected", "flagged", "status",
           "error"]


def check_table() -> pd.DataFrame:
    """A hand-made reconcile.check table: 4 flagged bins (two tied), one checked and fine, one without a photo."""
    rows = [("00523", "/photos/00523.jpg", 3, 4, 0.20, True),
            ("00100", "s3://bucket/bin-images/00100.jpg", 2, 5, 0.01, True),
            ("00777", "/photos/00777.jpg", 1, 3, 0.20, True),
            ("00042", "/photos/00042.jpg", 4, 4, 0.90, False),
            ("00300", "/photos/00300.jpg", 5, 2, 0.05, True),
            ("00900", None, 2, None, None, False)]
    df = pd.DataFrame([{"image_id": i, "path": p, "expected_quantity": q, "predicted": c, "confidence": 0.5,
                        "p_expected": pe, "flagged": f, "status": "checked" if c else "no_image", "error": None}
                       for i, p, q, c, pe, f in rows], columns=COLUMNS)
    for c in ("expected_quantity", "predicted"):
        df[c] = df[c].astype("Float64").astype("Int64")
    return df.assign(p_1=0.1, p_2=0.2)


def test_sheet_has_only_flagged_bins_riskiest_first_with_an_empty_recount():
    sheet = recounts.recount_sheet(check_table())
    assert list(sheet.columns) == recounts.SHEET_COLUMNS
    assert {"image_id", "photo", "expected_quantity", "predicted", "p_expected", "recount"} <= set(sheet.columns)
    assert sheet["image_id"].tolist() == ["00100", "00300", "00523", "00777"]  # 0.20 tie: by image_id
    assert sheet["rank"].tolist() == [1, 2, 3, 4]
    assert sheet["photo"].iloc[0] == "s3://bucket/bin-images/00100.jpg"
    assert sheet.loc[0, ["expected_quantity", "predicted"]].tolist() == [2, 5]
    assert (sheet["recount"] == "").all()
    assert recounts.recount_sheet(check_table().assign(flagged=False)).empty


def test_sheet_refuses_a_table_that_is_not_a_check():
    with pytest.raises(ValueError, match="p_expected, flagged"):
        recounts.recount_sheet(check_table().drop(columns=["p_expected", "flagged"]))


def write_filled(tmp_path, fills: dict, **kw):
    """The check's sheet written, read back with pandas, `fills` ({image_id: recount}) typed in, saved."""
    path = recounts.write_sheet(recounts.recount_sheet(check_table()), tmp_path / "recounts.csv")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # a BOM: a spreadsheet reads it as UTF-8
    sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
    for image_id, value in fills.items():
        sheet.loc[sheet["image_id"] == image_id, "recount"] = value
    sheet.to_csv(path, index=False, **kw)
    return path


def test_write_fill_read_back(tmp_path):
    path = write_filled(tmp_path, {"00100": "2", "00523": "3.0"})
    assert not list(tmp_path.glob(".*.tmp"))
    labels, rejects, stats = recounts.read_sheet(path, [1, 2, 3, 4, 5], recounted_on="2024-05-31")
    assert list(labels.columns) == recounts.LABEL_COLUMNS
    assert labels["image_id"].tolist() == ["00100", "00523"]  # zeros kept
    assert labels["count"].tolist() == [2, 3]
    assert labels["photo"].tolist() == ["s3://bucket/bin-images/00100.jpg", "/photos/00523.jpg"]
    assert set(labels["source"]) == {"recount"} and set(labels["recounted_on"]) == {"2024-05-31"}
    assert rejects.empty and list(rejects.columns) == REJECT_COLUMNS
    assert stats["rows"] == 4 and stats["recounted"] == 2 and stats["skipped_empty"] == 2
    assert stats["rejected"] == 0 and stats["rejected_bad_count"] == 0
    today = recounts.read_sheet(path)[0]
    assert stamped_today(today["recounted_on"])


@pytest.mark.parametrize("value, reason, says", [
    ("three", "bad_count", "not a whole number"), ("2.5", "bad_count", "not a whole number"),
    ("-1", "bad_count", "negative"), ("9", "count_out_of_range", "not one of the model's counts 1, 2, 3, 4, 5")])
def test_bad_recount_rejected_with_its_row(tmp_path, value, reason, says):
    path = write_filled(tmp_path, {"00300": value, "00777": "1"})
    labels, rejects, stats = recounts.read_sheet(path, [1, 2, 3, 4, 5], "2024-05-31")
    assert labels["image_id"].tolist() == ["00777"]
    assert rejects.to_dict("records") == [{"image_id": "00300", "reason": reason, "detail": rejects["detail"][0]}]
    assert "recounts.csv row 3" in rejects["detail"][0] and says in rejects["detail"][0]  # row 1: the header
    assert stats["rejected"] == 1 and stats[f"rejected_{reason}"] == 1


def test_any_whole_number_without_classes(tmp_path):
    labels, rejects, _ = recounts.read_sheet(write_filled(tmp_path, {"00300": "9"}), None, "2024-05-31")
    assert labels["count"].tolist() == [9] and rejects.empty


def test_bin_listed_twice(tmp_path):
    path = tmp_path / "twice.csv"
    pd.DataFrame({"image_id": ["a", "b", "a", "b", "c", "c"], "photo": [""] * 6,
                  "recount": ["3", "1", "3.0", "2", "x", "2"]}).to_csv(path, index=False)
    labels, rejects, stats = recounts.read_sheet(path, None, "2024-05-31")
    assert labels[["image_id", "count"]].values.tolist() == [["a", 3]]  # same recount: kept once
    assert rejects[["image_id", "reason"]].values.tolist() == [
        ["b", "duplicate"], ["b", "duplicate"], ["c", "bad_count"], ["c", "duplicate"]]  # in row order
    assert "twice.csv row 3: bin b is listed more than once and recounts 1, 2 differ" in rejects["detail"][0]
    assert stats["rejected_duplicate"] == 3


def test_blank_id_and_per_row_dates(tmp_path):
    path = tmp_path / "dated.csv"
    pd.DataFrame({"image_id": ["a", "", "b", "c"], "photo": [""] * 4, "recount": ["1", "2", "3", "4"],
                  "recounted_on": ["2024-01-02", "", "31/05/2024", ""]}).to_csv(path, index=False)
    labels, rejects, _ = recounts.read_sheet(path, None, "2024-05-31")
    assert labels[["image_id", "recounted_on"]].values.tolist() == [["a", "2024-01-02"], ["c", "2024-05-31"]]
    assert rejects[["reason", "detail"]].values.tolist() == [
        ["bad_id", "dated.csv row 3: image_id is blank"],
        ["bad_date", "dated.csv row 4: recounted_on '31/05/2024' is not a date like 2024-05-31"]]
    with pytest.raises(ValueError, match="recounted_on 'May 31'"):
        recounts.read_sheet(path, None, "May 31")


def test_not_a_recount_sheet_is_refused_naming_the_missing_columns(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"image_id": ["a"], "count": [3]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"recount sheet .*labels.csv: missing columns photo, recount"):
        recounts.read_sheet(path, None)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.csv: not a readable CSV"):
        recounts.read_sheet(tmp_path / "empty.csv", None)
    (tmp_path / "latin.csv").write_bytes("image_id,photo,recount\na,caf\xe9.jpg,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv: not UTF-8"):
        recounts.read_sheet(tmp_path / "latin.csv", None)


def test_a_sheet_saved_by_a_spreadsheet_still_reads(tmp_path):
    # columns reordered, padded headers in another case, an added column, ids that lost their zeros, `3.0`,
    # `;` between cells (Excel in many locales), blank trailing rows
    text = (" Recount ;Shelf; photo ;IMAGE_ID;note\n"
            "3.0;A1;/photos/00523.jpg;523;looked twice\n"
            " 2 ;A2;s3://bucket/bin-images/00100.jpg;100;\n"
            ";A3;/photos/00300.jpg;300;\n"
            ";;;;\n;;;;\n")
    path = tmp_path / "saved.csv"
    path.write_bytes(text.encode("utf-8-sig"))
    labels, rejects, stats = recounts.read_sheet(path, [1, 2, 3], "2024-05-31")
    assert labels[["image_id", "count"]].values.tolist() == [["00100", 2], ["00523", 3]]
    assert rejects.empty and stats["rows"] == 3 and stats["skipped_empty"] == 1
    assert recounts._image_id("523", "") == "523" and recounts._image_id("0523", "/p/00523.jpg") == "00523"


def test_an_id_that_is_not_a_safe_file_name_is_rejected(tmp_path):
    """Ingest's cache names a file by the id: `../x` would write outside it."""
    path = tmp_path / "ids.csv"
    ids = pd.DataFrame({"image_id": ["../x", "a b", "00523"], "photo": [""] * 3, "recount": ["1"] * 3})
    ids.to_csv(path, index=False)
    labels, rejects, _ = recounts.read_sheet(path, None, "2024-05-31")
    assert labels["image_id"].tolist() == ["00523"]
    assert rejects[["image_id", "reason"]].values.tolist() == [["../x", "bad_id"], ["a b", "bad_id"]]
    assert "ids.csv row 2: image_id '../x' is not safe as a file name" in rejects["detail"][0]
