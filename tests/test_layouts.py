"""Labelled photos in the three layouts (bincounter.layouts): 30-photo samples with mixed-case extensions, the
ids, counts and paths they give, and every reason a photo or CSV row is rejected. Photos are tiny files made with
Pillow: nothing here decodes them."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bincounter.layouts import (MAX_ID, PHOTO_COLUMNS, REASONS, abid_photos, detect_layout, discover, items,
                                readable_id)
from bincounter.manifest import REJECT_COLUMNS

EXTS = [".jpg", ".JPG", ".jpeg", ".Png", ".PNG", ".png", ".JPEG", ".Jpg"]
SAFE = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"


def photo(path: Path, shade: int = 0) -> Path:
    """A 4x4 photo at `path`, PNG or JPEG as its extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (shade % 256, 0, 0)).save(buf, "PNG" if path.suffix.lower() == ".png" else "JPEG")
    path.write_bytes(buf.getvalue())
    return path


def sample(n: int = 30) -> list[tuple[str, int]]:
    """(relative path, count) of n photos, 6 per count 1..5, names repeating across count folders."""
    return [(f"{1 + i % 5}/IMG_{i // 5:04d}{EXTS[i % len(EXTS)]}", 1 + i % 5) for i in range(n)]


def reasons(rejects: pd.DataFrame) -> dict[str, int]:
    return rejects["reason"].value_counts().to_dict()


def detail(rejects: pd.DataFrame, reason: str) -> str:
    return " | ".join(rejects.loc[rejects["reason"] == reason, "detail"])


def check_tables(photos: pd.DataFrame, rejects: pd.DataFrame) -> None:
    assert list(photos.columns) == PHOTO_COLUMNS and list(rejects.columns) == REJECT_COLUMNS
    assert photos["image_id"].is_unique and photos["image_id"].str.fullmatch(SAFE).all()
    assert photos["image_id"].str.lower().is_unique  # one cache file per id, on any file system
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in photos["path"])
    assert set(rejects["reason"]) <= set(REASONS)
    assert list(photos["image_id"]) == sorted(photos["image_id"])


# --- imagefolder ---------------------------------------------------------------------------------------------

def test_imagefolder_sample(tmp_path):
    root = tmp_path / "photos"
    for i, (rel, _) in enumerate(sample()):
        photo(root / rel, i)
    assert detect_layout(root) == "imagefolder"
    photos, rejects = discover(root, 1, 5)
    check_tables(photos, rejects)
    assert rejects.empty and len(photos) == 30
    want = {rel.rsplit(".", 1)[0].replace("/", "-"): (rel, c) for rel, c in sample()}  # 1/IMG_0000.jpg -> 1-IMG_0000
    assert set(photos["image_id"]) == set(want)
    for r in photos.itertuples():
        assert (r.original, r.count) == want[r.image_id]
        assert r.path == str((root / r.original).resolve())
    assert items(photos) == {i: c for i, (_, c) in want.items()}
    assert discover(root, 1, 5)[0].equals(photos)  # the same ids on every run


def test_imagefolder_rejects_and_clashing_ids(tmp_path):
    root = tmp_path / "photos"
    photo(root / "3" / "IMG_1.jpg")
    photo(root / "3" / "shelf a" / "IMG_2.JPEG")  # nested: still count 3
    photo(root / "7" / "IMG_3.jpg")  # count_max 5
    photo(root / "0" / "IMG_4.jpg")  # count_min 1
    photo(root / "three" / "IMG_5.png")
    photo(root / "3.0" / "IMG_6.png")
    photo(root / "IMG_7.jpg")  # not in a count folder
    (root / "3" / "notes.txt").write_text("x")
    (root / "3" / ".DS_Store").write_bytes(b"\0")
    photo(root / "4" / "dup.PNG")
    photo(root / "4" / "Dup.jpg")  # clashes with 4/dup.PNG once case is ignored
    photo(tmp_path / "elsewhere" / "linked.jpg")
    (root / "5").mkdir()
    (root / "5" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "linked.jpg")  # a link to a photo: followed
    (root / "5" / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    (root / "5" / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "2").mkdir()
    (root / "2" / "same.jpg").symlink_to(root / "3" / "IMG_1.jpg")  # the same photo under counts 2 and 3
    (root / "1").mkdir()
    (root / "1" / "weird (1).jpg").symlink_to(tmp_path / "elsewhere" / "linked.jpg")  # the same photo, count 5 and 1

    photos, rejects = discover(root, 1, 5)
    check_tables(photos, rejects)
    assert reasons(rejects) == {"bad_count": 3, "count_out_of_range": 2, "not_a_photo": 3, "missing_image": 1,
                                "duplicate": 4}
    assert "folder 'three' is not a count" in detail(rejects, "bad_count")
    assert "'3.0'" in detail(rejects, "bad_count")
    assert "IMG_7.jpg: not in a count folder" in detail(rejects, "bad_count")
    assert "count 7 is outside count_min..count_max 1..5" in detail(rejects, "count_out_of_range")
    assert "notes.txt" in detail(rejects, "not_a_photo") and ".DS_Store" in detail(rejects, "not_a_photo")
    assert "a link to a folder, not followed" in detail(rejects, "not_a_photo")
    assert "counts 2, 3 differ: none is kept" in detail(rejects, "duplicate")
    assert "counts 1, 5 differ: none is kept" in detail(rejects, "duplicate")
    by_id = photos.set_index("image_id")
    assert set(by_id.index) == {"3-shelf_a-IMG_2", f"4-dup-{hashlib.sha256(b'4/dup.PNG').hexdigest()[:8]}",
                                f"4-Dup-{hashlib.sha256(b'4/Dup.jpg').hexdigest()[:8]}"}
    assert by_id.loc["3-shelf_a-IMG_2", "count"] == 3
    assert by_id.loc["3-shelf_a-IMG_2", "original"] == "3/shelf a/IMG_2.JPEG"


def test_imagefolder_override_and_count_range(tmp_path):
    root = tmp_path / "flat"
    photo(root / "a" / "x.jpg")
    with pytest.raises(ValueError, match=f"{root}: cannot tell its layout"):
        detect_layout(root)
    photos, rejects = discover(root, 1, 5, layout="imagefolder")  # named: every photo is rejected, nothing stops
    assert photos.empty and reasons(rejects) == {"bad_count": 1}
    photo(root / "0" / "y.jpg")
    photos, rejects = discover(root, 0, 0)  # a count of 0 is a count when count_min allows it
    assert list(photos["image_id"]) == ["0-y"] and photos["count"].tolist() == [0]


# --- csv -----------------------------------------------------------------------------------------------------

def test_csv_of_paths_sample(tmp_path):
    home = tmp_path / "sheet"
    lines = ["path,count"]
    for i, (rel, count) in enumerate(sample()):
        f = photo(home / "pics" / rel, i)
        # relative, ./relative or absolute; counts as a spreadsheet may export them
        cell = [f"pics/{rel}", f"./pics/{rel}", str(f)][i % 3]
        lines.append(f"{cell},{[str(count), f'{count}.0', f' {count} '][i % 3]}")
    (home / "labels.csv").write_text("\n".join(lines) + "\n")
    assert detect_layout(home / "labels.csv") == "csv"
    photos, rejects = discover(home / "labels.csv", 1, 5)
    check_tables(photos, rejects)
    assert rejects.empty and len(photos) == 30
    by_id = photos.set_index("image_id")
    for i, (rel, count) in enumerate(sample()):
        r = by_id.loc["pics-" + rel.rsplit(".", 1)[0].replace("/", "-")]  # an absolute path inside: the same id
        assert r["count"] == count and r["path"] == str((home / "pics" / rel).resolve())
        assert r["original"] == lines[i + 1].split(",")[0]


def test_csv_rejects_each_bad_row_by_number(tmp_path):
    home = tmp_path / "sheet"
    for name in ["a.jpg", "b.JPG", "c.png", "d.jpeg", "e.jpg", "f.jpg", "g.jpg", "h.jpg", "i.jpg", "j.jpg"]:
        photo(home / name)
    photo(tmp_path / "outside" / "x.jpg")
    (home / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (home / "leak.jpg").symlink_to(tmp_path / "outside" / "x.jpg")
    (home / "inside.jpg").symlink_to(home / "a.jpg")
    (home / "notes.txt").write_text("x")
    rows = [
        ("a.jpg", "1"),             # row 2: fine
        ("b.JPG", "abc"),           # 3: bad_count
        ("c.png", "3.5"),           # 4: bad_count
        ("d.jpeg", ""),             # 5: bad_count (blank)
        ("e.jpg", "9"),             # 6: count_out_of_range
        ("f.jpg", "-1"),            # 7: bad_count (negative)
        ("nope.jpg", "2"),          # 8: missing_image
        ("../outside/x.jpg", "2"),  # 9: outside_folder
        ("out/x.jpg", "2"),         # 10: outside_folder through a linked folder
        ("leak.jpg", "2"),          # 11: outside_folder through a linked photo
        ("notes.txt", "2"),         # 12: not_a_photo
        ("", "2"),                  # 13: missing_image (blank path)
        ("g.jpg", "4"),             # 14: kept
        ("./g.jpg", "4"),           # 15: the same photo, same count: duplicate, g kept once
        ("h.jpg", "2"),             # 16: the same photo with another count (row 17): both rejected
        ("h.jpg", "3"),             # 17
        ("inside.jpg", "1"),        # 18: a link inside the folder to a.jpg (row 2), same count: duplicate
        (str(tmp_path / "outside" / "x.jpg"), "5"),  # 19: an absolute path may lie anywhere
        ("i.jpg", "2.0"),           # 20: kept
    ]
    sheet = home / "sheet.csv"
    pd.DataFrame(rows, columns=["path", "count"]).to_csv(sheet, index=False)
    photos, rejects = discover(sheet, 1, 5)
    check_tables(photos, rejects)
    assert reasons(rejects) == {"bad_count": 4, "count_out_of_range": 1, "missing_image": 2, "outside_folder": 3,
                                "not_a_photo": 1, "duplicate": 4}
    numbered = {int(d.split(" row ")[1].split(":")[0]): r for d, r in zip(rejects["detail"], rejects["reason"])}
    assert numbered == {3: "bad_count", 4: "bad_count", 5: "bad_count", 6: "count_out_of_range", 7: "bad_count",
                        8: "missing_image", 9: "outside_folder", 10: "outside_folder", 11: "outside_folder",
                        12: "not_a_photo", 13: "missing_image", 15: "duplicate", 16: "duplicate", 17: "duplicate",
                        18: "duplicate"}
    assert all(d.startswith(f"{sheet} row ") for d in rejects["detail"])
    assert f"outside the CSV's folder {home.resolve()}" in detail(rejects, "outside_folder")
    assert "'abc', not a whole number" in detail(rejects, "bad_count")
    outside = readable_id(str((tmp_path / "outside" / "x.jpg").resolve()))  # the whole path: `tmp-...-outside-x`
    assert photos.set_index("image_id")["count"].to_dict() == {"a": 1, "g": 4, "i": 2, outside: 5}


def test_csv_of_ids_with_a_photo_folder(tmp_path):
    folder = tmp_path / "bins"
    ids = [f"{i:05d}" for i in range(30)]
    for i, image_id in enumerate(ids):
        photo(folder / f"{image_id}{EXTS[i % len(EXTS)]}", i)
    photo(folder / "00099.jpg")
    photo(folder / "00099.PNG")  # two photos of one id
    rows = [(i, 1 + n % 5) for n, i in enumerate(ids)]
    rows += [("00042", "2"), ("../etc", "1"), ("", "1"), ("00099", "1"), ("00007", "4")]  # 00007 is 3 above
    sheet = tmp_path / "counts.csv"
    pd.DataFrame(rows, columns=["Image_ID", " count"]).to_csv(sheet, index=False)  # headers: any case, spaces
    photos, rejects = discover(sheet, 1, 5, images=folder)
    check_tables(photos, rejects)
    assert reasons(rejects) == {"missing_image": 1, "bad_id": 2, "duplicate": 3}
    assert "row 32: no 00042.jpg, .jpeg or .png" in detail(rejects, "missing_image")
    assert "row 33: image_id '../etc' is not safe" in detail(rejects, "bad_id")
    assert set(rejects.loc[rejects["reason"] == "duplicate", "image_id"]) == {"00099", "00007"}
    assert len(photos) == 29 and "00007" not in set(photos["image_id"])  # ids as written: zeros kept
    assert photos.set_index("image_id").loc["00003", "count"] == 4
    assert photos.set_index("image_id").loc["00003", "original"] == "00003.Png"
    # without `images`, the photos are looked up beside the CSV
    (folder / "own.csv").write_text("image_id,count\n00001,2\n")
    assert items(discover(folder / "own.csv", 1, 5)[0]) == {"00001": 2}


def test_csv_ids_naming_two_photos_are_rejected(tmp_path):
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]:
        photo(tmp_path / name)
    sheet = tmp_path / "s.csv"
    sheet.write_text("path,image_id,count\na.jpg,BIN-1,1\nb.jpg,bin-1,2\nc.jpg,BIN-2,3\nd.jpg,,4\n")
    photos, rejects = discover(sheet, 1, 5)
    assert items(photos) == {"BIN-2": 3, "d": 4}  # a blank image_id: the id from its path
    assert reasons(rejects) == {"duplicate": 2}
    assert "row 3: image_id bin-1 names other photos" in detail(rejects, "duplicate")


def test_csv_without_the_columns_is_refused_whole(tmp_path):
    sheet = tmp_path / "s.csv"
    sheet.write_text("file,qty\na.jpg,1\n")
    with pytest.raises(ValueError, match=rf"{sheet}: missing columns count, path or image_id \(it has file, qty\)"):
        discover(sheet, 1, 5)
    sheet.write_text("path,qty\na.jpg,1\n")
    with pytest.raises(ValueError, match="missing columns count "):
        discover(sheet, 1, 5)
    sheet.write_text("")
    with pytest.raises(ValueError, match="not a readable CSV"):
        discover(sheet, 1, 5)
    with pytest.raises(ValueError, match="does not exist"):
        discover(tmp_path / "none.csv", 1, 5)
    with pytest.raises(ValueError, match="layout csv needs a CSV file"):
        discover(tmp_path, 1, 5, layout="csv")


# --- abid ----------------------------------------------------------------------------------------------------

def test_abid_sample_any_case(tmp_path):
    root = tmp_path / "abid"
    ids = [f"{i:05d}" for i in range(1, 31)]
    for n, image_id in enumerate(ids):
        photo(root / "bin-images" / f"{image_id}{EXTS[n % len(EXTS)]}", n)
    (root / "metadata").mkdir()
    for image_id in ids[:15]:  # the metadata knows these; labels.csv the rest
        (root / "metadata" / f"{image_id}.json").write_text(json.dumps({"EXPECTED_QUANTITY": 2}))
    (root / "labels.csv").write_text("image_id,count\n" + "".join(f"{i},4\n" for i in ids[15:]))
    photo(root / "bin-images" / "00077.jpg")  # neither metadata nor a labels.csv row
    photo(root / "bin-images" / "00088.jpg")
    photo(root / "bin-images" / "00088.JPEG")  # one id, two photos
    (root / "bin-images" / "Thumbs.db").write_bytes(b"\0")
    assert detect_layout(root) == "abid"
    photos, rejects = discover(root, 1, 5)
    check_tables(photos, rejects)
    assert list(photos["image_id"]) == ids
    assert items(photos) == {**dict.fromkeys(ids[:15]), **dict.fromkeys(ids[15:], 4)}
    assert photos["original"].tolist()[:3] == ["bin-images/00001.jpg", "bin-images/00002.JPG",
                                               "bin-images/00003.jpeg"]
    assert reasons(rejects) == {"unknown_count": 1, "duplicate": 2, "not_a_photo": 1}
    found, bad = abid_photos(root)  # what a local folder lists: every photo, any case
    assert set(found) == {*ids, "00077"} and found["00004"].name == "00004.Png"
    assert bad.equals(rejects[rejects["reason"] != "unknown_count"].reset_index(drop=True))


def test_abid_layout_needs_its_folder(tmp_path):
    photo(tmp_path / "3" / "a.jpg")
    with pytest.raises(ValueError, match="needs a bin-images/ folder"):
        discover(tmp_path, 1, 5, layout="abid")
    with pytest.raises(ValueError, match="layout 'voc' is not one of"):
        discover(tmp_path, 1, 5, layout="voc")
    with pytest.raises(ValueError, match="count_min 3 and count_max 1"):
        discover(tmp_path, 3, 1)


# --- ids -----------------------------------------------------------------------------------------------------

def test_readable_ids_are_safe_file_names(tmp_path):
    assert readable_id("3/IMG_0042.JPG") == "3-IMG_0042"
    assert readable_id("3/my photo (1).png") == "3-my_photo__1_"
    assert readable_id(".hidden.jpg") == "_hidden"
    assert readable_id("./a\\b/c.jpg") == "a-b-c"
    root = tmp_path / "photos"
    long = "x" * 150
    photo(root / "2" / f"{long}.jpg")
    photos, _ = discover(root, 1, 5)
    tail = hashlib.sha256(f"2/{long}.jpg".encode()).hexdigest()[:8]
    assert photos["image_id"][0] == f"2-{long}"[:MAX_ID] + "-" + tail
    assert os.pathconf(tmp_path, "PC_NAME_MAX") > len(photos["image_id"][0]) + 40
