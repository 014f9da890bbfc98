"""The recount sheet: the bins an inventory check flagged, for a person to recount, and their recounts back as labels.

`recount_sheet` (reconcile.check's table -> the sheet, riskiest first) and `write_sheet` (a CSV a spreadsheet
opens) go out; the person fills `recount` (and may write a `note`); `read_sheet` brings the filled sheet back as
labels (image_id, count, photo, recounted_on, source `recount`) and rejects. A row left without a recount is
skipped and counted, a bad row is rejected with its row number (row 1 is the header, as a spreadsheet shows),
and only a file that is not a recount sheet is refused as a whole.
"""
from __future__ import annotations

import io
from datetime import date
from pathlib import Path, PurePosixPath

import pandas as pd

from bincounter import abid, layouts
from bincounter.manifest import REJECT_COLUMNS, atomic_write_bytes

# what a person reads left to right: which bin, what the record and the model say, the cell to fill, then the
# long photo path last so that it does not push the rest off the screen
SHEET_COLUMNS = ["rank", "image_id", "expected_quantity", "predicted", "p_expected", "recount", "note", "photo"]
NEEDED = ["image_id", "photo", "recount"]  # what read_sheet needs of a sheet; the rest is for the person
LABEL_COLUMNS = ["image_id", "count", "photo", "recounted_on", "source"]
# the names bincounter.layouts gives the same faults, so that ingest's rejects read alike
REASONS = ["bad_count", "count_out_of_range", "duplicate", "bad_id", "bad_date"]
_CHECK_COLUMNS = ["image_id", "path", "expected_quantity", "predicted", "p_expected", "flagged"]


def recount_sheet(checked: pd.DataFrame) -> pd.DataFrame:
    """reconcile.check's table -> the recount sheet (SHEET_COLUMNS): its flagged bins, the lowest p_expected
    first (ties by image_id), rank 1.., `photo` the path or URI, `recount` and `note` empty."""
    missing = [c for c in _CHECK_COLUMNS if c not in checked.columns]
    if missing:
        raise ValueError(f"recount sheet: the check table lacks columns {', '.join(missing)}")
    # eq(True): a table read back from CSV may hold NaN, which astype(bool) would make True
    flagged = checked[checked["flagged"].eq(True)]
    flagged = flagged.sort_values(["p_expected", "image_id"], kind="stable", ignore_index=True)
    sheet = pd.DataFrame({"rank": range(1, len(flagged) + 1), "image_id": flagged["image_id"].astype(str),
                          "expected_quantity": flagged["expected_quantity"], "predicted": flagged["predicted"],
                          "p_expected": flagged["p_expected"], "recount": "", "note": "",
                          "photo": flagged["path"]})
    return sheet[SHEET_COLUMNS]


def sheet_text(sheet: pd.DataFrame) -> str:
    """The sheet as the CSV text a person opens in a spreadsheet."""
    # a BOM first: without it Excel reads a non-ASCII photo path as mojibake; 3 significant digits of
    # p_expected are what a person compares (the rank keeps the exact order)
    return "\ufeff" + sheet.to_csv(index=False, float_format="%.3g")


def write_sheet(sheet: pd.DataFrame, path: str | Path) -> Path:
    """The sheet -> a CSV at `path` (sheet_text), written whole or not at all. -> path."""
    atomic_write_bytes(path, sheet_text(sheet).encode("utf-8"))
    return Path(path)


def read_sheet(path: str | Path, classes: list[int] | None = None,
               recounted_on: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A filled recount sheet -> (labels: LABEL_COLUMNS sorted by image_id, rejects: REJECT_COLUMNS in row order,
    stats: rows, recounted, skipped_empty, rejected, rejected_<reason>).

    `classes`: the model's counts; a recount outside them is rejected (None: any whole number >= 0).
    `recounted_on`: the date of rows whose own `recounted_on` cell is empty (ISO, default today). A bin listed
    twice is kept once where its recounts agree, else not at all. Raises ValueError naming the sheet when it is
    not a readable recount sheet."""
    name = Path(path).name
    default_on = date.today().isoformat() if recounted_on is None else _iso_date(recounted_on)
    if default_on is None:
        raise ValueError(f"recounted_on {recounted_on!r} is not a date like 2024-05-31")
    table = _read_table(path)
    allowed = None if classes is None else {int(c) for c in classes}
    stats = {"rows": 0, "skipped_empty": 0}
    rejects, candidates = [], []  # candidates: (row number, image_id, count, photo, date)
    for n, rec in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        if not any(rec.values()):
            continue  # a spreadsheet's trailing blank rows: nothing the person wrote
        stats["rows"] += 1
        image_id, raw = _image_id(rec["image_id"], rec["photo"]), rec["recount"]
        where = f"{name} row {n}"
        if not raw:
            stats["skipped_empty"] += 1
            continue
        on = rec.get("recounted_on") or default_on
        try:
            if not image_id:
                raise _Bad("bad_id", f"{where}: image_id is blank")
            if not layouts.safe_id(image_id):  # the cache names a file by it
                raise _Bad("bad_id", f"{where}: image_id {image_id!r} is not safe as a file name (letters, digits, "
                                     f". _ -)")
            count = abid.quantity(raw, f"{where}: recount")  # the project's rule: `3.0` is 3, `3.5` is not
            if allowed is not None and count not in allowed:
                raise _Bad("count_out_of_range", f"{where}: recount {count} is not one of the model's counts "
                                                 f"{', '.join(map(str, sorted(allowed)))}")
            if _iso_date(on) is None:  # a spreadsheet may have rewritten it as 31/05/2024: ambiguous, refused
                raise _Bad("bad_date", f"{where}: recounted_on {on!r} is not a date like 2024-05-31")
        except (abid.MetadataError, _Bad) as e:  # abid.quantity's faults: not a whole number, negative
            rejects.append({"image_id": image_id, "reason": getattr(e, "reason", "bad_count"), "detail": str(e),
                            "n": n})
            continue
        candidates.append((n, image_id, count, rec["photo"], _iso_date(on)))
    labels = _agreed(candidates, rejects, name)
    rejected = pd.DataFrame(sorted(rejects, key=lambda r: r["n"]), columns=[*REJECT_COLUMNS, "n"])[REJECT_COLUMNS]
    out = pd.DataFrame(labels, columns=LABEL_COLUMNS).sort_values("image_id", ignore_index=True)
    out["count"] = out["count"].astype("int64")
    stats.update(recounted=len(out), rejected=len(rejected))
    stats.update({f"rejected_{r}": int((rejected["reason"] == r).sum()) for r in REASONS})
    return out, rejected, stats


class _Bad(Exception):
    """One row rejected: `reason` (one of REASONS) and `detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _read_table(path: str | Path) -> pd.DataFrame:
    """The sheet's cells as stripped text ("" where empty), headers stripped and lower-cased, every row kept
    (blank ones too: row numbers stay the spreadsheet's). Raises ValueError naming the sheet."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"recount sheet {path}: not UTF-8 text ({e}); save it as CSV UTF-8") from None
    except FileNotFoundError:
        raise ValueError(f"recount sheet {path} does not exist") from None
    header = text.split("\n", 1)[0]
    # Excel in many locales saves CSV with `;` between cells
    sep = ";" if ";" in header and "," not in header else "\t" if "\t" in header and "," not in header else ","
    try:  # text cells: an id keeps its zeros (`00523`); blank lines kept so that row numbers match
        table = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except ValueError as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ValueError(f"recount sheet {path}: not a readable CSV ({e})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in NEEDED if c not in table.columns]
    if missing:
        raise ValueError(f"recount sheet {path}: missing columns {', '.join(missing)} (it has "
                         f"{', '.join(table.columns)}); not a recount sheet")
    return table.fillna("").map(str.strip)


def _image_id(cell: str, photo: str) -> str:
    """The id as written, or the photo's name where a spreadsheet took the id for a number and dropped its
    zeros (`00523` shown and saved as `523`, beside the photo `.../00523.jpg`)."""
    stem = PurePosixPath(photo.replace("\\", "/")).stem
    if cell.isdigit() and stem.isdigit() and stem != cell and int(stem) == int(cell):
        return stem
    return cell


def _iso_date(text: str) -> str | None:
    """`2024-05-31` -> itself; anything else (`31/05/2024`, `May 31`) -> None."""
    try:
        return date.fromisoformat(text.strip()).isoformat() if len(text.strip()) == 10 else None
    except ValueError:
        return None


def _agreed(candidates: list[tuple], rejects: list[dict], name: str) -> list[dict]:
    """The valid rows -> one label per bin. A bin whose rows disagree (two recounts, or a recount beside a
    rejected row) gets none: each of its valid rows is rejected as a duplicate, since a wrong label teaches the
    model the wrong thing and a missing one only waits for the next recount."""
    bad_ids = {r["image_id"] for r in rejects if r["image_id"]}
    by_id: dict[str, list[tuple]] = {}
    for c in candidates:
        by_id.setdefault(c[1], []).append(c)
    labels = []
    for image_id, rows in by_id.items():
        counts = sorted({c[2] for c in rows})
        if len(counts) == 1 and image_id not in bad_ids:
            _, _, count, photo, on = rows[0]
            labels.append({"image_id": image_id, "count": count, "photo": photo, "recounted_on": on,
                           "source": "recount"})
            continue
        why = f"recounts {', '.join(map(str, counts))} differ" if len(counts) > 1 else "another row of it is rejected"
        for n, *_ in rows:
            rejects.append({"image_id": image_id, "reason": "duplicate", "n": n,
                            "detail": f"{name} row {n}: bin {image_id} is listed more than once and {why}; "
                                      f"none is taken"})
    return labels
