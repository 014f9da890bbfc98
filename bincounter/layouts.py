"""Labelled photos from a folder or a CSV, in the layouts people already have: finding them only (ingest reads
and decodes each photo later).

Layouts (`detect_layout` tells them apart; `discover(layout=...)` overrides), extensions .jpg/.jpeg/.png in any case:
- `imagefolder`: `<root>/<count>/<any name>.<ext>` (torchvision's ImageFolder). Folders inside a count folder are
  walked (`3/shelf-a/IMG_1.jpg` counts 3); links to photos are followed, links to folders (they could loop) not.
- `csv`: a CSV of `path,count` (paths relative to the CSV's folder, or absolute), or `image_id,count` with a photo
  folder (`images`, by default the CSV's folder) of `<image_id>.<ext>`; with both, the id names the photo at the
  path. `3.0` (a spreadsheet's export) is a count. A relative path must stay in the CSV's folder, links resolved.
- `abid`: the bucket's layout, `bin-images/<id>.<ext>` with `metadata/<id>.json` or a `labels.csv` of ids.

Ids (imagefolder, CSV paths): the path relative to the root (the CSV's folder; an absolute path outside it: the
whole path), extension dropped, parts joined by `-`, characters other than `A-Za-z0-9._-` made `_`:
`3/IMG_0042.JPG` -> `3-IMG_0042`. Photos whose ids would be equal ignoring case (the cache keeps a file per id,
and some file systems ignore case), and ids over MAX_ID characters, get `-` and 8 hex digits of the sha256 of
the relative path: `3-IMG_0042-5d41402a`. An id so depends on its photo's path (and on whether another photo
clashes with it), not on the order found: the same on every run and machine (a photo moved to another count
folder gets another). An `image_id` column or ABID file name gives the id as written. Duplicates: a photo (resolved path) listed twice is kept once if the counts agree, else not at
all; photos given one id (an `image_id` column, ABID `7.jpg` beside `7.PNG`) are all rejected.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath

import pandas as pd

from bincounter import abid
from bincounter.manifest import REJECT_COLUMNS

LAYOUTS = ("imagefolder", "csv", "abid")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")  # every photo the product reads (ingest, predict, reconcile, score); lower case
PHOTO_COLUMNS = ["image_id", "path", "count", "original"]
REASONS = ["not_a_photo", "bad_count", "count_out_of_range", "missing_image", "outside_folder", "duplicate",
           "bad_id", "unknown_count"]
MAX_ID = 120  # the cache names a file <id>.json and writes temporary copies beside it: well under 255 bytes
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # no separators, no leading dot (`..`, hidden files)
_WHOLE = re.compile(r"[0-9]+")  # a count folder's name: ASCII digits only (`3`, `03`; not `3.0`, `-1`, `³`)


class _Bad(Exception):
    """One photo or row rejected: `reason` (one of REASONS) and `detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def readable_id(relative: str) -> str:
    """A photo's path relative to its root -> its readable id, safe as a file name: `3/IMG_0042.JPG` ->
    `3-IMG_0042`, `3/my photo.png` -> `3-my_photo`. Not unique by itself: see the module's notes."""
    p = PurePosixPath(relative.replace("\\", "/"))
    parts = [part for part in (*p.parent.parts, p.stem) if part not in ("/", ".", "")]
    text = re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts)) or "_"
    return "_" + text[1:] if text.startswith(".") else text


def safe_id(image_id: str) -> bool:
    """Whether an id given as written (a CSV's, a recount sheet's) is safe as a file name, as the cache names
    one: letters, digits, `.`, `_` and `-`, not starting with a dot, at most MAX_ID characters."""
    return bool(_SAFE_ID.fullmatch(image_id)) and len(image_id) <= MAX_ID


def path_hash(relative: str) -> str:
    """A relative path -> the 8 hex digits an id that clashes is given (the start of its sha256)."""
    return hashlib.sha256(relative.encode()).hexdigest()[:8]


def detect_layout(path: str | Path) -> str:
    """A path -> `csv` (a .csv file), `abid` (a folder with bin-images/) or `imagefolder` (a folder with a
    folder named by a count, such as 3/). Raises ValueError naming the path when it is none of them."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv"
    if p.is_dir() and (p / abid.IMAGE_PREFIX).is_dir():
        return "abid"
    if p.is_dir() and any(d.is_dir() and _WHOLE.fullmatch(d.name) for d in p.iterdir()):
        return "imagefolder"
    raise ValueError(f"{path}: cannot tell its layout: it is not a .csv file, nor a folder with "
                     f"{abid.IMAGE_PREFIX} or with folders named by a count (such as 3/); give the layout "
                     f"({', '.join(LAYOUTS)})")


def discover(path: str | Path, count_min: int, count_max: int, layout: str | None = None,
             images: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A folder or CSV of labelled photos -> (photos, rejects). photos: PHOTO_COLUMNS, sorted by image_id;
    path absolute (links resolved), count an int (None in `abid` where the metadata must say), original the path
    as given (relative to the root, the CSV's cell). rejects: REJECT_COLUMNS in the order found, one row per
    photo or CSV row (its row number in detail), reason one of REASONS. `layout`: None detects it; `images`: the
    photo folder of a CSV of image ids. Counts outside count_min..count_max are rejected (in `abid`, ingest checks
    them once the metadata is read). Raises ValueError naming the path for a whole input it cannot read."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path} does not exist")
    if not 0 <= count_min <= count_max:
        raise ValueError(f"count_min {count_min} and count_max {count_max}: need 0 <= count_min <= count_max")
    layout = layout or detect_layout(p)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if images is not None and layout != "csv":
        raise ValueError(f"images {images}: a photo folder goes with a CSV of image ids, not layout {layout}")
    if (layout == "csv") != p.is_file():
        raise ValueError(f"{path}: layout {layout} needs {'a CSV file' if layout == 'csv' else 'a folder'}")
    rejects: list[dict] = []
    if layout == "imagefolder":
        rows = _imagefolder(p.resolve(), (count_min, count_max), rejects)
    elif layout == "csv":
        rows = _csv(p, (count_min, count_max), images, rejects)
    else:
        rows = _abid(p, rejects)
    photos = pd.DataFrame({c: [r[c] for r in rows] for c in PHOTO_COLUMNS}, columns=PHOTO_COLUMNS)
    photos["count"] = pd.Series([r["count"] for r in rows], dtype=object)  # ints and None, not floats and NaN
    return photos.sort_values("image_id", ignore_index=True), pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def items(photos: pd.DataFrame) -> dict[str, int | None]:
    """discover's photos -> {image_id: count, or None where the metadata must say}: what ingest lists."""
    return {i: None if pd.isna(c) else int(c) for i, c in zip(photos["image_id"], photos["count"])}


def abid_photos(root: str | Path) -> tuple[dict[str, Path], pd.DataFrame]:
    """An ABID-layout folder -> ({image_id: its photo in bin-images/, .jpg/.jpeg/.png in any case}, rejects:
    other files (not_a_photo) and ids with several photos, such as `7.jpg` and `7.PNG` (duplicate, none kept)).
    Raises ValueError when the folder has no bin-images/."""
    folder = Path(root) / abid.IMAGE_PREFIX
    if not folder.is_dir():
        raise ValueError(f"{root}: layout abid needs a {abid.IMAGE_PREFIX} folder")
    by_stem = _by_stem(folder)
    rejects = [_row(f.stem, "not_a_photo", f"{f}: not a .jpg, .jpeg or .png file")
               for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() not in PHOTO_SUFFIXES]
    for stem, found in by_stem.items():
        if len(found) > 1:
            names = " and ".join(f.name for f in found)
            rejects += [_row(stem, "duplicate", f"{f}: {names} are both image {stem}; none is taken") for f in found]
    return {s: f[0] for s, f in by_stem.items() if len(f) == 1}, pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    """The photos in `folder` (not below it) by name without extension: `7` -> [7.jpg, 7.PNG]."""
    by_stem: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in PHOTO_SUFFIXES and f.is_file():
            by_stem.setdefault(f.stem, []).append(f)
    return by_stem


def _row(image_id: str, reason: str, detail: str) -> dict:
    return {"image_id": image_id, "reason": reason, "detail": detail}


def _imagefolder(root: Path, count_range: tuple[int, int], rejects: list[dict]) -> list[dict]:
    """Every file under `root` (resolved) -> rows (rel, path, count, original, where); the rest to rejects."""
    rows = []
    for f in sorted(root.rglob("*")):  # rglob does not enter links to folders
        rel = f.relative_to(root).as_posix()
        if f.is_dir() and not f.is_symlink():
            continue
        try:
            if f.is_dir() or f.suffix.lower() not in PHOTO_SUFFIXES:
                link = " (a link to a folder, not followed)" if f.is_dir() else ""
                raise _Bad("not_a_photo", f"not a .jpg, .jpeg or .png file{link}")
            if "/" not in rel:
                raise _Bad("bad_count", "not in a count folder")
            name = rel.split("/")[0]
            if not _WHOLE.fullmatch(name):
                raise _Bad("bad_count", f"folder {name!r} is not a count (a whole number)")
            count = _in_range(int(name), count_range)
            real = f.resolve()
            if not real.is_file():
                raise _Bad("missing_image", f"a link to {real}, which does not exist")
        except _Bad as b:
            rejects.append(_row(readable_id(rel), b.reason, f"{f}: {b.detail}"))
            continue
        rows.append({"rel": rel, "path": str(real), "count": count, "original": rel, "where": str(f)})
    return _assign_ids(_dedupe(rows, rejects), rejects)


def _in_range(count: int, count_range: tuple[int, int]) -> int:
    lo, hi = count_range
    if not lo <= count <= hi:
        raise _Bad("count_out_of_range", f"count {count} is outside count_min..count_max {lo}..{hi}")
    return count


def _csv(csv_path: Path, count_range: tuple[int, int], images, rejects: list[dict]) -> list[dict]:
    """A CSV of path,count or image_id,count -> rows (rel, path, count, original, where, given id or None)."""
    try:  # every cell as text: ids keep their zeros (`00523`), a blank cell stays ""
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise ValueError(f"{csv_path}: not a readable CSV ({e})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("count", "path or image_id") if not set(c.split(" or ")) & set(table.columns)]
    if missing:
        raise ValueError(f"{csv_path}: missing columns {', '.join(missing)} (it has {', '.join(table.columns)}); "
                         f"needs path,count or image_id,count")
    home = csv_path.resolve().parent
    folder = Path(images).resolve() if images is not None else home
    if "path" not in table and not folder.is_dir():
        raise ValueError(f"images {images}: does not exist or is not a folder")
    by_stem = {} if "path" in table else _by_stem(folder)  # a CSV of ids: the photo folder's photos by name
    rows = []
    for n, rec in enumerate(table.to_dict("records"), start=2):  # row 1 is the header, as a spreadsheet shows
        given = rec.get("image_id", "").strip() or None
        cell = rec.get("path", "").strip()
        try:
            if given is not None and not safe_id(given):
                raise _Bad("bad_id", f"image_id {given!r} is not safe as a file name (letters, digits, . _ -)")
            rel, real = _csv_path(cell, home) if "path" in table else _id_photo(given, by_stem, folder)
            count = _in_range(abid.quantity(rec["count"], "count"), count_range)  # metadata's rule: `3.0` is 3
        except (_Bad, abid.MetadataError) as e:
            reason, why = (e.reason, e.detail) if isinstance(e, _Bad) else ("bad_count", str(e))
            rejects.append(_row(given or (readable_id(cell) if cell else ""), reason, f"{csv_path} row {n}: {why}"))
            continue
        rows.append({"rel": rel, "path": str(real), "count": count, "original": cell or rel,
                     "where": f"row {n}", "given": given})
    return _assign_ids(_dedupe(rows, rejects, f"{csv_path} "), rejects, f"{csv_path} ")


def _csv_path(cell: str, home: Path) -> tuple[str, Path]:
    """A path cell -> (path relative to the CSV's folder, resolved path); absolute paths may lie anywhere."""
    if not cell:
        raise _Bad("missing_image", "path is blank")
    if Path(cell).suffix.lower() not in PHOTO_SUFFIXES:
        raise _Bad("not_a_photo", f"{cell} is not a .jpg, .jpeg or .png file")
    real = (home / cell).resolve()  # an absolute cell replaces home
    inside = real.is_relative_to(home)
    if not Path(cell).is_absolute() and not inside:  # `..`, or a link inside the folder that leads out of it
        raise _Bad("outside_folder", f"{cell} leads to {real}, outside the CSV's folder {home}")
    if not real.is_file():
        raise _Bad("missing_image", f"{cell}: {real} does not exist")
    if Path(cell).is_absolute():
        return (real.relative_to(home) if inside else real.relative_to(real.anchor)).as_posix(), real
    return PurePosixPath(os.path.normpath(cell)).as_posix(), real  # as written: a link inside keeps its name


def _id_photo(image_id: str | None, by_stem: dict[str, list[Path]], folder: Path) -> tuple[str, Path]:
    """An image_id -> (its photo's name, resolved path): the one `<id>.<jpg|jpeg|png>`, any case, in `folder`."""
    if image_id is None:
        raise _Bad("bad_id", "image_id is blank")
    found = by_stem.get(image_id, [])
    if not found:
        raise _Bad("missing_image", f"no {image_id}.jpg, .jpeg or .png (any case) in {folder}")
    if len(found) > 1:
        raise _Bad("duplicate", f"{' and '.join(f.name for f in found)} in {folder} are both {image_id}")
    return found[0].name, found[0].resolve()


def _dedupe(rows: list[dict], rejects: list[dict], prefix: str = "") -> list[dict]:
    """Each photo (resolved path) once: kept once where its listings agree on the count, not at all where not.
    `prefix` starts each reject's detail (the CSV's path)."""
    by_path: dict[str, list[dict]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    kept = []
    for path, same in by_path.items():
        counts = sorted({r["count"] for r in same})
        first = same[0]
        for r in same[1:] if len(counts) == 1 else same:
            also = ", ".join(o["where"] for o in same if o is not r)
            why = f"kept as {first['where']}" if len(counts) == 1 else \
                f"counts {', '.join(map(str, counts))} differ: none is kept"
            rejects.append(_row(r.get("given") or readable_id(r["rel"]), "duplicate",
                                f"{prefix}{r['where']}: {path} is also listed as {also}; {why}"))
        if len(counts) == 1:
            kept.append(first)
    return kept


def _assign_ids(rows: list[dict], rejects: list[dict], prefix: str = "") -> list[dict]:
    """-> the rows, each with its image_id: the given one, else its readable id, with the path's hash where that
    clashes (ignoring case) with another row's or is too long. A given id that names other photos too (ignoring
    case) is rejected with them."""
    shared = Counter(r["given"].lower() for r in rows if r.get("given"))
    for r in [r for r in rows if r.get("given") and shared[r["given"].lower()] > 1]:
        rejects.append(_row(r["given"], "duplicate", f"{prefix}{r['where']}: image_id {r['given']} names other "
                                                     f"photos too; none is taken"))
    rows = [r for r in rows if not (r.get("given") and shared[r["given"].lower()] > 1)]
    for r in rows:
        r["image_id"] = r.get("given") or readable_id(r["rel"])
    seen = Counter(r["image_id"].lower() for r in rows)
    for r in rows:
        if not r.get("given") and (seen[r["image_id"].lower()] > 1 or len(r["image_id"]) > MAX_ID):
            r["image_id"] = f"{r['image_id'][:MAX_ID]}-{path_hash(r['rel'])}"
    return rows


def _abid(root: Path, rejects: list[dict]) -> list[dict]:
    """An ABID-layout folder -> rows of its photos whose count labels.csv or a metadata file knows."""
    photos, bad = abid_photos(root)
    rejects += bad.to_dict("records")
    listed = abid.read_label_index(root / "labels.csv") if (root / "labels.csv").exists() else {}
    with_metadata = {p.stem for p in (root / abid.METADATA_PREFIX).glob("*.json")}
    rows = []
    for image_id, f in sorted(photos.items()):
        if image_id in listed or image_id in with_metadata:
            rows.append({"image_id": image_id, "path": str(f.resolve()), "count": listed.get(image_id),
                         "original": f"{abid.IMAGE_PREFIX}{f.name}"})
        else:  # LocalSource drops these without a word today
            rejects.append(_row(image_id, "unknown_count", f"{f}: no {abid.metadata_key(image_id)} and no "
                                                           f"labels.csv row"))
    return rows
