"""Ingest: fetch each listed image from a source, verify it, cache a resized copy, and tell good from bad.

The cache (`cache_dir`, `data/` by default) is content-addressed and shared by all sources:
  images/<sha[:2]>/<sha>-<size>.jpg           the image, short side `size`, RGB JPEG; sha = sha256 of the original
  records/<source tag>-<size>/<image_id>.json  the image's manifest row, its metadata count and the cached file's
                                               own sha256, written (atomically) after the cached file
A record whose cached file is present and intact means "done": a rerun fetches nothing for that image, and a
run killed at any moment resumes where it stopped; the temporary files such a run leaves (`.<name>.<random>.tmp`
beside the files being written) are removed by the next run. Bad items become rejects (a reason code and a
message); they never stop the run. Several sources (local folders, recounts) are ingested one after another into
one manifest (ingest_many), each with its own records, beside what the sources refused while finding their photos.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from bincounter import abid, layouts, recounts
from bincounter.manifest import REJECT_COLUMNS, REQUIRED, atomic_write_bytes, from_rows, metric_key
from bincounter.sources import LocalSource, MissingObject, Source, SourceError
from bincounter.transforms import REASONS as IMAGE_REASONS
from bincounter.transforms import ImageError, decode_image

_INGEST_REASONS = ["missing_image", *IMAGE_REASONS, "bad_metadata", "unknown_count", "count_mismatch",
                   "count_out_of_range", "fetch_error"]  # the decoder's reasons (transforms.REASONS) among them
# and those of finding photos (a folder per count, a CSV) and reading a recount sheet, before ingest reads any
REASONS = list(dict.fromkeys([*_INGEST_REASONS, *layouts.REASONS, *recounts.REASONS]))
JPEG_QUALITY = 90
# source and count_from are set by the run that reads a record (records made before count_from lack it)
RECORD_KEYS = {*REQUIRED, "cache_sha256", "metadata_count"}


class Reject(Exception):
    """A bad item: `reason` is one of REASONS, `detail` names the object and what is wrong with it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Cache:
    """Paths and records of the cache at `root` for images of short side `size` from the source `tag`."""

    def __init__(self, root: str | Path, size: int, tag: str):
        self.root = Path(root).resolve()
        self.size = size
        self.records = self.root / "records" / f"{tag}-{size}"

    def image_path(self, sha: str) -> Path:
        return self.root / "images" / sha[:2] / f"{sha}-{self.size}.jpg"

    def record_path(self, image_id: str) -> Path:
        return self.records / f"{image_id}.json"

    def remove_temporary(self, before: float) -> int:
        """Remove the temporary files (manifest.atomic_write_bytes') last written before `before` (a time.time()):
        what a killed run left; a run going on now writes younger ones. -> how many were removed."""
        removed = 0
        for tmp in [*self.root.glob("images/*/.*.tmp"), *self.root.glob("records/*/.*.tmp")]:
            try:
                if tmp.stat().st_mtime < before:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished (or another run removed it) meanwhile
                pass
        return removed

    def read_record(self, image_id: str) -> dict | None:
        """The image's record, or None when there is none or it is unreadable or incomplete."""
        try:
            rec = json.loads(self.record_path(image_id).read_bytes())
        except (OSError, ValueError):
            return None
        ok = isinstance(rec, dict) and rec.keys() >= RECORD_KEYS and rec["image_id"] == image_id
        return rec if ok else None

    def intact(self, rec: dict) -> bool:
        """Whether the record's cached file exists and still has the sha256 written down when it was made."""
        try:
            return sha256(self.image_path(rec["sha256"]).read_bytes()) == rec["cache_sha256"]
        except OSError:
            return False

    def row(self, rec: dict) -> dict:
        """A record's manifest row (without source and count_from), its path in this cache (which may have
        moved since)."""
        return {**{c: rec[c] for c in REQUIRED if c != "source"}, "path": str(self.image_path(rec["sha256"]))}

    def store(self, row: dict, image: bytes, metadata_count: int | None) -> dict:
        """Write the cached image, then its record (in that order, both atomic). Returns the manifest row.
        No fsync: a file torn by a power cut fails its sha256 check (or its record does not parse) and is redone."""
        path = self.image_path(row["sha256"])
        atomic_write_bytes(path, image, fsync=False)
        row = dict(row, path=str(path))
        rec = dict(row, cache_sha256=sha256(image), metadata_count=metadata_count)
        atomic_write_bytes(self.record_path(row["image_id"]), json.dumps(rec).encode(), fsync=False)
        return row


def resized_jpeg(img: Image.Image, data: bytes, cache_size: int) -> bytes:
    """The cache's copy: short side `cache_size`, RGB JPEG quality 90. An RGB JPEG already that size is kept
    as it is (no second compression; synthetic images are drawn at the cache size)."""
    w, h = img.size
    if img.format == "JPEG" and img.mode == "RGB" and min(w, h) == cache_size:
        return data
    scale = cache_size / min(w, h)
    size = (max(cache_size, round(w * scale)), max(cache_size, round(h * scale)))
    # bilinear (antialiased when shrinking) like torchvision's Resize; reducing_gap shrinks big images fast
    small = img.convert("RGB").resize(size, Image.BILINEAR, reducing_gap=3.0)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def resolve_count(image_id: str, listed: int | None, metadata_count: int | None, metadata_name: str,
                  metadata_wins: bool = False) -> tuple[int, str]:
    """-> (the image's count, where it comes from: `metadata` or `labels`): its metadata's EXPECTED_QUANTITY if
    it has metadata, else the listed count. Where both exist and disagree: the metadata's count when
    `metadata_wins` (labels.csv: the metadata is the dataset's own record), else a count_mismatch reject (a file
    list's count is what was selected)."""
    if metadata_count is None and listed is None:
        raise Reject("unknown_count", f"{image_id}: no metadata and no count in the file list")
    if metadata_count is not None and listed is not None and metadata_count != listed and not metadata_wins:
        raise Reject("count_mismatch", f"{metadata_name} says EXPECTED_QUANTITY {metadata_count}, "
                                       f"the file list puts {image_id} under count {listed}")
    return (listed, "labels") if metadata_count is None else (metadata_count, "metadata")


def label_conflicts(manifest: pd.DataFrame, items: dict[str, int | None]) -> pd.DataFrame:
    """The manifest's bins whose listed count (items) disagrees with the metadata count they were given ->
    image_id, source, listed, count (the metadata's)."""
    listed = manifest["image_id"].map(items)
    hit = (manifest["count_from"] == "metadata") & listed.notna() & (listed != manifest["count"])
    out = manifest.loc[hit, ["image_id", "source", "count"]].assign(listed=listed[hit].astype(int))
    return out[["image_id", "source", "listed", "count"]].reset_index(drop=True)


class _Worker:
    """Ingests one image at a time (called from many threads; keeps no per-image state)."""

    def __init__(self, source: Source, cache: Cache, count_range: tuple[int, int], metadata_wins: bool = False):
        self.source = source
        self.cache = cache
        self.count_range = count_range
        self.metadata_wins = metadata_wins

    def __call__(self, image_id: str, listed: int | None) -> tuple[dict | None, Reject | None, str, bool]:
        """-> (manifest row or None, Reject or None, where the image came from: `cache_hits`, `downloaded` or
        `not_downloaded` (rejected before its bytes came), whether its metadata was fetched)."""
        got_metadata = False
        try:
            rec = self.cache.read_record(image_id)
            if rec is not None:  # the record remembers the metadata: no need to fetch it again
                metadata_count = rec["metadata_count"]
            else:
                raw = self._metadata(image_id)
                got_metadata = raw is not None
                metadata_count = None if raw is None else self._parse(raw, image_id)
            count, count_from = self._count(image_id, listed, metadata_count)
            # the record is this source's own (records are kept per source tag): never another folder's photo
            origin = {"source": self.source.row_source(image_id), "count_from": count_from,
                      **self.source.columns(image_id)}
            if rec is not None and rec["count"] == count and self.cache.intact(rec):
                return {**self.cache.row(rec), **origin}, None, "cache_hits", got_metadata
            data = self._image(image_id)
        except Reject as r:
            return None, r, "not_downloaded", got_metadata
        try:
            return self._store(image_id, count, data, metadata_count, origin), None, "downloaded", got_metadata
        except Reject as r:
            return None, r, "downloaded", got_metadata

    def _count(self, image_id: str, listed: int | None, metadata_count: int | None) -> tuple[int, str]:
        count, count_from = resolve_count(image_id, listed, metadata_count,
                                          self.source.where(abid.metadata_key(image_id)), self.metadata_wins)
        lo, hi = self.count_range
        if not lo <= count <= hi:
            raise Reject("count_out_of_range", f"{image_id}: count {count} is outside count_min..count_max {lo}..{hi}")
        return count, count_from

    def _store(self, image_id: str, count: int, data: bytes, metadata_count: int | None, origin: dict) -> dict:
        """Verify the original, cache its resized copy and record it -> the manifest row (`origin`: its source
        and count_from)."""
        name = self.source.where(abid.image_key(image_id))
        try:
            img = decode_image(data, name, rgb=False)  # as stored: resized_jpeg keeps an RGB JPEG as it is
        except ImageError as e:
            raise Reject(e.reason, str(e)) from None
        row = {"image_id": image_id, "count": count, "sha256": sha256(data), "width": img.width,
               "height": img.height, **origin}
        return self.cache.store(row, resized_jpeg(img, data, self.cache.size), metadata_count)

    def _metadata(self, image_id: str) -> bytes | None:
        try:
            return self.source.get_metadata(image_id)
        except (SourceError, OSError) as e:
            name = self.source.where(abid.metadata_key(image_id))
            raise Reject("bad_metadata", f"{name}: unreadable ({e})") from None

    def _parse(self, raw: bytes, image_id: str) -> int:
        try:
            return abid.parse_metadata(raw, self.source.where(abid.metadata_key(image_id)))
        except abid.MetadataError as e:
            raise Reject("bad_metadata", str(e)) from None

    def _image(self, image_id: str) -> bytes:
        try:
            return self.source.get_image(image_id)
        except MissingObject as e:
            raise Reject("missing_image", str(e)) from None
        except SourceError as e:
            raise Reject("fetch_error", str(e)) from None


def ingest(items: dict[str, int | None], source: Source, cache_dir: str | Path, cache_size: int,
           count_range: tuple[int, int], downloads: int, progress: bool = True,
           metadata_wins: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """{image_id: count from the file list, or None} and a source -> (manifest, rejects, stats): the images
    cached at short side `cache_size`, `downloads` of them fetched at a time.

    Both tables are sorted by image_id. stats: ingested, rejected, rejected_<reason> for every reason,
    count_<c> for every count in the range; where each listed image came from, adding up to the number listed:
    cache_hits (answered by the cache), downloaded (its bytes read from the source this run; drawn, for the
    synthetic source), not_downloaded (rejected before that: metadata, count, a missing object); beside them
    metadata_downloaded (metadata objects read), temp_files_removed (left by a killed run) and label_conflicts
    (bins given their metadata's count over a different listed one: `metadata_wins`, see resolve_count)."""
    started = time.time()
    cache = Cache(cache_dir, cache_size, source.tag)
    work = _Worker(source, cache, count_range, metadata_wins)
    rows, rejects = [], []
    stats = {"cache_hits": 0, "downloaded": 0, "not_downloaded": 0, "metadata_downloaded": 0,
             "temp_files_removed": cache.remove_temporary(started)}
    with ThreadPoolExecutor(downloads) as ex, tqdm(total=len(items), desc=f"ingest {source.tag}", unit="img",
                                                 disable=not progress) as bar:
        futures = {ex.submit(work, image_id, listed): image_id for image_id, listed in items.items()}
        for f in as_completed(futures):
            row, reject, came_from, got_metadata = f.result()
            stats[came_from] += 1
            stats["metadata_downloaded"] += got_metadata
            if row is not None:
                rows.append(row)
            else:
                rejects.append({"image_id": futures[f], "reason": reject.reason, "detail": reject.detail})
            bar.update()
    manifest = from_rows(rows).sort_values("image_id", ignore_index=True)
    rejected = pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values("image_id", ignore_index=True)
    stats.update(ingested=len(manifest), rejected=len(rejected))
    stats.update({f"rejected_{r}": int((rejected["reason"] == r).sum()) for r in REASONS})
    stats.update({f"count_{c}": int((manifest["count"] == c).sum()) for c in range(count_range[0], count_range[1] + 1)})
    stats["label_conflicts"] = len(label_conflicts(manifest, items))
    return manifest, rejected, stats


def ingest_many(parts: list[tuple[Source, dict[str, int | None]]], cache_dir: str | Path, cache_size: int,
                count_range: tuple[int, int], downloads: int, duplicates: dict[str, list] | None = None,
                progress: bool = True, metadata_wins: bool = False,
                found: list[tuple[Source, pd.DataFrame]] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """[(source, its items), ...] -> one (manifest, rejects, stats): ingest() of each source in turn, the tables
    concatenated and sorted by image_id, the stats summed, and per named source (a LocalSource's `name`, as
    manifest.metric_key spells it) ingested_<name> and rejected_<name>.
    `duplicates` ({image_id: the sources that have it, the one ingested first}) become rejects with reason
    duplicate_id naming those sources, counted in duplicate_ids (not in rejected: ingested + rejected is still
    the number of bins listed). `found` ([(source, rejects)]: what the sources refused while finding their photos,
    Source.rejects) joins the rejects, counted in rejected, rejected_<reason> and rejected_<name>."""
    manifests, rejects = [from_rows([])], []
    # every key, also when no source has a bin left to ingest
    stats = dict.fromkeys(["ingested", "rejected", *(f"rejected_{r}" for r in REASONS), "cache_hits", "downloaded",
                           "not_downloaded", "metadata_downloaded", "temp_files_removed",
                           *(f"count_{c}" for c in range(count_range[0], count_range[1] + 1)), "label_conflicts"], 0)
    for source, items in parts:
        m, r, s = ingest(items, source, cache_dir, cache_size, count_range, downloads, progress, metadata_wins)
        manifests.append(m)
        rejects.append(r)
        for k, v in s.items():
            stats[k] = stats.get(k, 0) + v
        _count_source(stats, source, len(m), len(r))
    for source, r in found or []:
        rejects.append(r)
        stats["rejected"] += len(r)
        for reason, n in r["reason"].value_counts().items():
            stats[f"rejected_{reason}"] = stats.get(f"rejected_{reason}", 0) + int(n)
        _count_source(stats, source, 0, len(r))
    dups = [{"image_id": i, "reason": "duplicate_id", "detail": duplicate_detail(i, f)}
            for i, f in sorted((duplicates or {}).items())]
    rejects.append(pd.DataFrame(dups, columns=REJECT_COLUMNS))
    stats["duplicate_ids"] = len(dups)
    # empty tables left out: pandas warns about concatenating them
    manifest = pd.concat([m for m in manifests if not m.empty] or manifests[:1], ignore_index=True)
    rejected = pd.concat([r for r in rejects if not r.empty] or [rejects[-1]], ignore_index=True)
    return (manifest.sort_values("image_id", ignore_index=True),
            rejected.sort_values("image_id", kind="stable", ignore_index=True), stats)


def _count_source(stats: dict, source: Source, ingested: int, rejected: int) -> None:
    """Add to ingested_<name> and rejected_<name> of a named source (manifest.metric_key spells the name)."""
    if source.name:
        key = metric_key(source.name)
        stats[f"ingested_{key}"] = stats.get(f"ingested_{key}", 0) + ingested
        stats[f"rejected_{key}"] = stats.get(f"rejected_{key}", 0) + rejected


def duplicate_detail(image_id: str, found: list) -> str:
    """-> `00123: bin-images/00123.jpg is in abid-sample (/x/abid-sample) and abid-more (/y/abid-more); took
    abid-sample's` (`found`: the sources that have it, the one ingested first; `bin 00123` where not all are
    ABID-layout folders)."""
    names = [f"{f.name} ({f.dataset_source})" for f in found]
    what = abid.image_key(image_id) if all(isinstance(f, LocalSource) for f in found) else f"bin {image_id}"
    return f"{image_id}: {what} is in {', '.join(names[:-1])} and {names[-1]}; took {found[0].name}'s"
