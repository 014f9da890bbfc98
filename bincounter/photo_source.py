"""Sources of labelled photos served by path, without metadata (their counts come with them): a folder per count
or a CSV of photos (`PhotoSource`, found by bincounter.layouts) and a filled recount sheet (`RecountSource`, read
by bincounter.recounts). `local_folders` makes ingest's source=local sources, one per data_dir path, each by its
layout (`local_source`: sources.LocalSource for the ABID layout); `with_recounts` lets the recounts win over every
other label of the same bin; `found_rejects` gathers what the sources refused while finding their photos.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pandas as pd

from bincounter import abid, layouts, recounts
from bincounter.manifest import metric_key
from bincounter.sources import LocalSource, MissingObject, NotInFolders, S3Source, Source, read_file, short_hash

LAYOUT_CHOICES = ("auto", *layouts.LAYOUTS)  # auto: detected per path (layouts.detect_layout)
RECOUNT = "recount"  # the recounts' manifest `source` and `count_from`, and their name in metric names


class _ByPath(Source):
    """Serves each image from its photo, a local path or an s3:// URI (`_photos()`: {image_id: photo}, `_s3`:
    {bucket: S3Source}); no metadata."""

    name: str
    _s3: dict[str, S3Source]

    def _photos(self) -> dict[str, str]:
        raise NotImplementedError

    def where(self, key: str) -> str:
        """The photo for an image key (`bin-images/<id>.jpg`), else the key under the source's name."""
        photo = self._photos().get(abid.id_from_key(key)) if key.startswith(abid.IMAGE_PREFIX) else None
        return photo or f"{self.name}: {key}"

    def row_source(self, image_id: str) -> str:
        return self.name

    def get_image(self, image_id: str) -> bytes:
        photo = self._photos().get(image_id)
        if not photo:
            raise MissingObject(f"{self.dataset_source}: no photo is given for {image_id}")
        if photo.startswith("s3://"):
            bucket, _, key = photo[len("s3://"):].partition("/")
            return self._s3[bucket].get(key)
        return read_file(photo)

    def get_metadata(self, image_id: str) -> bytes | None:
        return None  # the count comes with the photo


class PhotoSource(_ByPath):
    """Labelled photos in a folder per count or a CSV (`layout`: imagefolder or csv; layouts.discover finds them
    once, on first use, counts outside `count_range` rejected). `name`, the manifest's `source`, is the folder's or
    the CSV's own name as given (`photos/` -> `photos`, `shelf.csv` -> `shelf.csv`)."""

    def __init__(self, path: str | Path, layout: str, count_range: tuple[int, int]):
        self.given = str(path)
        self.root = Path(path).resolve()
        self.layout = layout
        self.count_range = count_range
        self.name = Path(os.path.abspath(path)).name or str(self.root)
        self.tag = f"{layout}-{short_hash(str(self.root))}"
        self.dataset_source = str(self.root)
        self._s3 = {}  # a CSV's absolute paths are local files
        self._found: pd.DataFrame | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """ValueError `data_dir: ...` when the path is not there or is not what its layout needs. Reads no photo."""
        if not self.root.exists():
            raise ValueError(f"data_dir: {self.given} does not exist")
        if (self.layout == "csv") != self.root.is_file():
            raise ValueError(f"data_dir: {self.given}: layout {self.layout} needs "
                             f"{'a CSV file' if self.layout == 'csv' else 'a folder'}")

    def _find(self) -> pd.DataFrame:
        """-> layouts.discover's photos, found once (ingest's threads ask too), their rejects kept beside them.
        ValueError `data_dir: ...` for an input that cannot be read at all (a CSV without its columns)."""
        with self._lock:
            if self._found is None:
                try:
                    photos, self._rejects = layouts.discover(self.given, *self.count_range, layout=self.layout)
                except ValueError as e:
                    raise ValueError(f"data_dir: {e}") from None
                self._paths = dict(zip(photos["image_id"], photos["path"]))
                self._original = dict(zip(photos["image_id"], photos["original"]))
                self._found = photos
            return self._found

    def _photos(self) -> dict[str, str]:
        self._find()
        return self._paths

    def labels(self) -> dict[str, int]:
        return layouts.items(self._find())

    def rejects(self) -> pd.DataFrame:
        self._find()
        return self._rejects

    def columns(self, image_id: str) -> dict[str, str]:
        self._find()
        return {"original": self._original[image_id]}


class RecountSource(_ByPath):
    """The recounted bins of a filled recount sheet (recounts.read_sheet, `classes` the counts a recount may
    take): source and count_from `recount`, the date in `recounted_on`, the photo as the sheet gives it (a path,
    relative ones to the working directory, or an s3:// URI read anonymously, at `endpoint_url` where given). No
    metadata: it is the record being corrected. `given`: the sheet as named (a runs:/ URI), else its path;
    `dataset_source` is the file read (MLflow resolves no runs:/ URI as a dataset's source). `sheet_stats`:
    read_sheet's rows, recounted, skipped_empty, rejected."""

    name = RECOUNT
    layout = RECOUNT

    def __init__(self, sheet: str | Path, classes: list[int], given: str | None = None,
                 endpoint_url: str | None = None, workers: int = 16):
        labels, self._rejects, self.sheet_stats = recounts.read_sheet(sheet, classes)
        self.given = given or str(sheet)
        self.dataset_source = str(Path(sheet).resolve())
        self._counts = {i: int(c) for i, c in zip(labels["image_id"], labels["count"])}
        self._photo = dict(zip(labels["image_id"], labels["photo"]))
        self._dates = dict(zip(labels["image_id"], labels["recounted_on"]))
        # the records are the photos': a sheet naming another photo for a bin is read anew, not taken from the cache
        self.tag = f"{RECOUNT}-{short_hash(repr(sorted(self._photo.items())))}"
        buckets = {p[len("s3://"):].partition("/")[0] for p in self._photo.values() if p.startswith("s3://")}
        self._s3 = {b: S3Source(b, endpoint_url, workers) for b in sorted(buckets)}

    def _photos(self) -> dict[str, str]:
        return self._photo

    def check(self) -> None:
        pass  # the sheet was read whole when it was given; each photo is checked as it is read

    def labels(self) -> dict[str, int]:
        return dict(self._counts)

    def rejects(self) -> pd.DataFrame:
        return self._rejects

    def columns(self, image_id: str) -> dict[str, str]:
        return {"count_from": RECOUNT, "recounted_on": self._dates[image_id], "original": self._photo[image_id]}


def local_source(path: str, layout: str, count_range: tuple[int, int]) -> Source:
    """A data_dir path -> its source: LocalSource for the ABID layout, PhotoSource for a folder per count or a
    CSV. `layout`: one of LAYOUT_CHOICES; `auto` detects it. Raises ValueError `data_dir: ...` naming the path
    when auto cannot tell its layout (a folder without one is named as the ABID layout names it)."""
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout: unknown layout {layout!r} (expected one of {', '.join(LAYOUT_CHOICES)})")
    p = Path(path)
    if layout == "auto":
        if p.is_dir() and not (p / abid.IMAGE_PREFIX).is_dir():
            try:
                layout = layouts.detect_layout(p)
            except ValueError:
                raise ValueError(f"data_dir: {path} has no {abid.IMAGE_PREFIX} folder (the ABID layout) and no "
                                 f"folder named by a count, such as 3/ (a folder per count)") from None
        elif p.is_file():
            if p.suffix.lower() != ".csv":
                raise ValueError(f"data_dir: {path} is a file but not a .csv: give a CSV of photos and counts "
                                 f"(or layout=csv), or a folder")
            layout = "csv"
        else:
            layout = "abid"  # a folder of that layout, or a path that is not there (LocalSource.check says so)
    return LocalSource(path) if layout == "abid" else PhotoSource(path, layout, count_range)


def local_folders(data_dir: str, layout: str, count_range: tuple[int, int]) -> list[Source]:
    """`data_dir`: a path, or several separated by commas -> their sources (local_source: by `layout`, counts
    outside `count_range` rejected), in the order given. Reads no image. Raises ValueError `data_dir: ...` naming
    the path when one fails its check(), is given twice (the same path however spelled), or has the same name as
    another (its name is the manifest's `source`: two paths named alike could not be told apart)."""
    dirs = [d.strip() for d in data_dir.split(",")]
    if not any(dirs):
        raise ValueError("data_dir: source=local needs data_dir: a folder per count, a CSV of photos and counts, "
                         "or a folder with bin-images/ and metadata/ (or several, separated by commas)")
    if "" in dirs:
        raise ValueError(f"data_dir: {data_dir!r} has an empty entry between its commas")
    folders: list = []
    for d in dirs:
        folder = local_source(d, layout, count_range)
        folder.check()
        for other in folders:
            if other.root == folder.root:
                raise ValueError(f"data_dir: {d} is given twice (as {other.given} and {d}, both {folder.root})")
            if metric_key(other.name) == metric_key(folder.name):  # metric names (ingested_<name>) too
                named = (f"are both named {folder.name!r}" if other.name == folder.name else
                         f"are named {other.name!r} and {folder.name!r}, alike in metric names")
                raise ValueError(f"data_dir: {other.given} and {d} {named}, and the manifest's source is the "
                                 f"folder's name: give one of them under another name (a symbolic link)")
        folders.append(folder)
    return folders


def with_recounts(items: dict[str, int | None], owner: dict, duplicates: dict[str, list],
                  recount: RecountSource) -> tuple[dict[str, int | None], dict, dict[str, list]]:
    """The bins to ingest ({image_id: count}, {image_id: its source}, {image_id: every source that has it}) ->
    the same with the recounts added, each winning over any other label of its bin: the other copies become
    duplicates, the recount first (a folder answering for a listed id it has no photo of has no copy)."""
    items, owner, duplicates = dict(items), dict(owner), dict(duplicates)
    for image_id, count in recount.labels().items():
        if image_id in owner:
            had = duplicates.get(image_id, [owner[image_id]])
            had = [s for s in had if not isinstance(s, NotInFolders)
                   and (not isinstance(s, LocalSource) or s.has_image(image_id))]
            if had:
                duplicates[image_id] = [recount, *had]
            else:
                duplicates.pop(image_id, None)
        items[image_id], owner[image_id] = count, recount
    return dict(sorted(items.items())), owner, duplicates


def found_rejects(sources: list[Source], listed: dict | None = None) -> tuple[list[tuple[Source, pd.DataFrame]],
                                                                              set[str]]:
    """What each source refused while finding its photos -> ([(source, its rejects)], the ids to leave out of
    `listed`). `listed`: a file list's ids, None when the sources' own labels are taken: then every reject counts;
    with a list, only those of listed ids that the source has no photo of (a listed id with `7.jpg` beside `7.PNG`
    is rejected as a duplicate, not reported missing), and never unknown_count (the list gives the count)."""
    out, drop = [], set()
    for source in sources:
        found = source.rejects()
        if listed is not None and len(found):  # only LocalSources refuse anything before a file list's ids
            found = found[found["image_id"].isin(listed) & (found["reason"] != "unknown_count")
                          & ~found["image_id"].map(source.has_image).astype(bool)]
            drop |= set(found["image_id"])
        if len(found):
            out.append((source, found.reset_index(drop=True)))
    return out, drop
