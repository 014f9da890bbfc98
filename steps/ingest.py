"""ingest: fetch the listed images, verify them and cache resized copies; record which are good and which are bad.

Reads: the images from `--source` s3 | local | synthetic, and which to take: for s3 and for local folders in the
ABID layout, `file_list.json` (`--file_list all`: every image of the local folders whose count its metadata or
its labels.csv knows); for source=local in the other layouts (`--layout`, detected per path by default), every
photo of `--data_dir`: a folder per count (`<folder>/<count>/<any name>.jpg|jpeg|png`, any case) or a CSV of
`path,count` (paths relative to the CSV's folder, or absolute) or `image_id,count` (photos `<image_id>.<ext>`
beside the CSV). `--data_dir` may name several paths, separated by commas: a bin id in several is taken from the
first listed (a file list's ids are looked up in the folders in that order), and each copy left is recorded as a
duplicate. `--recounts`: a filled recount sheet (`bincounter reconcile` writes it; a path or `runs:/` URI); each
bin with a whole number in its `recount` column is ingested from the sheet's photo (a path or s3:// URI) with
source and count_from `recount` and the date in recounted_on, over any other label of that bin (whose copy is
recorded as a duplicate); rows left empty are skipped. With source=local, data_dir may then be empty: the manifest
holds the recounts alone.
Logs: `manifest.csv` (image_id, count, path, sha256, width, height, source: a local folder's or CSV's name, the
object's URI or `recount`; count_from: metadata | labels | recount; original: the photo's path as found;
recounted_on), `rejects.csv` (image_id, reason, detail; each photo or CSV row a layout refuses, such as a count
folder that is not a count in count_min..count_max, and each recount sheet row refused, by its row number; reason
duplicate_id for the copies left), `samples.png` (a contact sheet of ingested images with their counts), the
manifest as the run's dataset input (context `ingest`), metrics ingested, rejected, rejected_<reason>, count_<c>,
cache_hits + downloaded + not_downloaded (images: they add up to the number listed), metadata_downloaded,
temp_files_removed, duplicate_ids, label_conflicts (labels.csv and metadata disagree: the metadata's count is
used), per source ingested_<source> and rejected_<source>, and with recounts recount_rows, recount_skipped_empty
and recount_rejected (the sheet's rows: filled in or not, and refused). Images live in the cache (`--cache_dir`),
see bincounter.ingest.

`cache_size` was called `image_size` and `downloads` `workers`: the old names are accepted until the next release.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import random
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from bincounter import abid, entry, synthetic
from bincounter.ingest import ingest_many, label_conflicts
from bincounter.manifest import write_csv
from bincounter.photo_source import (LAYOUT_CHOICES, RECOUNT, RecountSource, found_rejects, local_folders,
                                     with_recounts)
from bincounter.runs import local_file, start_step
from bincounter.sources import S3Source, SyntheticSource, all_labels, locate
from bincounter.transforms import read_image
from steps.options import renamed_option, resolve_renamed, whole

SOURCES = ("s3", "local", "synthetic")
FILE_LIST = "file_list.json"  # the default: not read where no data_dir path is in the ABID layout
SAMPLES = 24  # images on the contact sheet


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="s3",
                   help="s3 (the ABID bucket), local (your photos: data_dir) or synthetic")
    p.add_argument("--file_list", default=FILE_LIST,
                   help="the list to ingest (a path or `runs:/` URI) from the bucket or ABID-layout folders; `all`: "
                        "every image of the local folders (a folder per count or a CSV: always all)")
    p.add_argument("--data_dir", default="",
                   help="source=local: a folder per count (`<count>/<photo>`), a CSV of `path,count` or "
                        "`image_id,count`, or a folder in the ABID layout (`bin-images/`, `metadata/`, `labels.csv`); "
                        "or several separated by commas (a bin id in several is taken from the first)")
    p.add_argument("--layout", default="auto",
                   help="source=local: the layout of every data_dir path: auto (told apart per path), abid, "
                        "imagefolder (a folder per count) or csv")
    p.add_argument("--recounts", default="",
                   help="a filled recount sheet (a path or `runs:/` URI): its recounted bins are ingested as "
                        "source `recount`, over any other label of the bin; with source=local data_dir may be empty")
    p.add_argument("--cache_dir", default="data", help="the local image cache")
    p.add_argument("--bucket", default=abid.BUCKET, help="source=s3: the bucket (read anonymously)")
    p.add_argument("--endpoint_url", default="", help="S3 endpoint override (e.g. a local emulator)")
    p.add_argument("--limit", type=whole, default=0, help="ingest only this many (a seeded random pick); 0 = all")
    p.add_argument("--num_images", type=whole, default=1000, help="source=synthetic: how many bins to draw")
    renamed_option(p, "cache_size", "image_size", type=whole, default=256,
                   help="short side of the cached images, pixels")
    p.add_argument("--count_min", type=whole, default=1, help="smaller counts are rejected")
    p.add_argument("--count_max", type=whole, default=5, help="larger counts are rejected")
    renamed_option(p, "downloads", "workers", type=whole, default=16, help="concurrent downloads")
    p.add_argument("--seed", type=whole, default=42, help="seeds `limit` and the synthetic bins")
    return p


def check_args(args: argparse.Namespace) -> list:
    """Raise ValueError naming the first bad parameter (before anything is fetched); settles the old names. ->
    the sources to read (make_sources; local paths are checked first, among the parameters)."""
    resolve_renamed(args)
    if args.source not in SOURCES:
        raise ValueError(f"source: unknown source {args.source!r} (expected one of {', '.join(SOURCES)})")
    if args.layout not in LAYOUT_CHOICES:
        raise ValueError(f"layout: unknown layout {args.layout!r} (expected one of {', '.join(LAYOUT_CHOICES)})")
    # local: each path there, in its layout, given once, named apart from the others
    sources = make_sources(args) if args.source == "local" else None
    if args.file_list == "all" and args.source != "local":
        raise ValueError(f"file_list: 'all' works only with source=local, not source={args.source}")
    if args.count_min < 0:
        raise ValueError(f"count_min: must be 0 or more, got {args.count_min}")
    if args.count_min > args.count_max:
        raise ValueError(f"count_min {args.count_min} is above count_max {args.count_max}")
    if args.cache_size < 32:
        raise ValueError(f"cache_size: must be at least 32 pixels, got {args.cache_size}")
    if args.downloads < 1:
        raise ValueError(f"downloads: must be at least 1, got {args.downloads}")
    if args.limit < 0:
        raise ValueError(f"limit: must be 0 (all) or more, got {args.limit}")
    if args.source == "synthetic" and args.num_images < 1:
        raise ValueError(f"num_images: must be at least 1, got {args.num_images}")
    if args.seed < 0:
        raise ValueError(f"seed: must be 0 or more, got {args.seed}")
    return sources if sources is not None else make_sources(args)


def make_sources(args: argparse.Namespace) -> list:
    """The sources to read, in order: one for s3 and synthetic, one per data_dir path for local (none where only
    recounts are given). Reads no image."""
    if args.source == "s3":
        return [S3Source(args.bucket, args.endpoint_url or None, args.downloads)]
    if args.source == "local":
        if not args.data_dir.strip() and args.recounts:
            return []
        folders = local_folders(args.data_dir, args.layout, (args.count_min, args.count_max))
        if args.recounts and any(f.name == RECOUNT for f in folders):
            raise ValueError(f"data_dir: a path is named {RECOUNT!r}, the source of recounts: give it under "
                             f"another name (a symbolic link)")
        return folders
    return [SyntheticSource(args.num_images, args.count_min, args.count_max, args.seed, args.cache_size)]


def read_recounts(args: argparse.Namespace) -> RecountSource | None:
    """The `recounts` sheet as a source (its counts checked against count_min..count_max), None when not given.
    ValueError `recounts: ...` when it cannot be read or is not a recount sheet (naming its missing columns)."""
    if not args.recounts:
        return None
    try:
        with local_file(args.recounts) as path:  # a path, or a sheet a run logged (runs:/...)
            return RecountSource(path, list(range(args.count_min, args.count_max + 1)), given=args.recounts,
                                 endpoint_url=args.endpoint_url or None, workers=args.downloads)
    except (ValueError, OSError, mlflow.exceptions.MlflowException) as e:
        raise ValueError(f"recounts: {e}") from None


def reads_file_list(args: argparse.Namespace, sources: list) -> bool:
    """Whether a file list names the bins: for s3, and for local folders all in the ABID layout, unless
    file_list=all. A folder per count or a CSV brings its own labels: a file list named beside one is refused."""
    if args.source == "synthetic" or args.file_list == "all":
        return False
    if args.source != "local":
        return True
    other = [s.given for s in sources if s.layout != "abid"]
    if not other:
        return bool(sources)
    if len(other) < len(sources) or args.file_list != FILE_LIST:
        labels = "labels its" if len(other) == 1 else "label their"
        raise ValueError(f"file_list: {', '.join(other)} {labels} own photos (layout "
                         f"{', '.join(sorted({s.layout for s in sources if s.layout != 'abid'}))}); a file list picks "
                         f"bins of ABID-layout folders: give file_list=all to take every photo of each path, or "
                         f"ingest them apart")
    return False


def list_items(args: argparse.Namespace, sources: list) -> tuple[dict[str, int | None], dict, dict]:
    """-> ({image_id: count from the list, or None where only the metadata knows it}, {image_id: the source to
    read it from}, {image_id: every folder that has it} for the ids taken from one of several). The list: the
    sources' own labels() for synthetic bins, `file_list=all` and the layouts that label their photos, else the
    file list (reads_file_list). The items are cut to `limit` by a seeded shuffle (so a limit keeps the counts'
    proportions), sorted by id; duplicates are those of the items kept."""
    duplicates: dict = {}
    if not reads_file_list(args, sources):
        items, owner, duplicates = all_labels(sources)
    else:
        try:
            with local_file(args.file_list) as path:  # a path, or a select run's file_list.json (runs:/...)
                items = abid.read_file_list(path)
        except (ValueError, OSError, mlflow.exceptions.MlflowException) as e:
            raise ValueError(f"file_list: {e}") from None
        if not items:
            raise ValueError(f"file_list: {args.file_list} lists no images")
        if args.source == "local":
            owner, duplicates = locate(sources, items)
        else:
            owner = dict.fromkeys(items, sources[0])
    ids = sorted(items)
    random.Random(args.seed).shuffle(ids)
    if args.limit:
        ids = ids[:args.limit]
    kept = sorted(ids)
    return ({i: items[i] for i in kept}, {i: owner[i] for i in kept},
            {i: duplicates[i] for i in kept if i in duplicates})


def bins_and_rejects(args: argparse.Namespace, sources: list, recount: RecountSource | None) -> tuple:
    """-> (items, owner, duplicates) as list_items gives them, with the recounts over every other label of
    their bins, and found: [(source, what it refused while finding its photos)] (photo_source.found_rejects; the
    recount sheet's rows refused). ValueError naming data_dir or recounts when there is nothing at all to ingest."""
    items, owner, duplicates = list_items(args, sources)
    found, drop = found_rejects(sources, list(items) if reads_file_list(args, sources) else None)
    for image_id in drop:  # listed, but what the folder has of it is refused (7.jpg beside 7.PNG)
        del items[image_id], owner[image_id]
        duplicates.pop(image_id, None)
    if recount is not None:
        items, owner, duplicates = with_recounts(items, owner, duplicates, recount)
        if len(recount.rejects()):
            found.append((recount, recount.rejects()))
    if not items and not found:
        if sources:
            raise ValueError(f"data_dir: no image in {args.data_dir} has a count (no metadata, no labels.csv row, "
                             f"no count folder or CSV row)")
        raise ValueError(f"recounts: {args.recounts} has no recount filled in "
                         f"({recount.sheet_stats['skipped_empty']} rows left empty)")
    return items, owner, duplicates, found


def by_source(items: dict[str, int | None], owner: dict) -> list[tuple[object, dict[str, int | None]]]:
    """-> [(source, its items), ...], the sources in the order they are first met."""
    parts: dict[object, dict[str, int | None]] = {}
    for image_id, count in items.items():
        parts.setdefault(owner[image_id], {})[image_id] = count
    return list(parts.items())


def contact_sheet(manifest, n: int = SAMPLES) -> Image.Image:
    """Up to `n` ingested images, spread over the counts (lowest to highest), captioned with their count."""
    rows = manifest.sort_values(["count", "image_id"], ignore_index=True)
    picks = rows.iloc[np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))]
    images = [read_image(path) for path in picks["path"]]  # the one decoder, its limits included
    return synthetic.contact_sheet(images, [f"n={c} {i}" for i, c in zip(picks["image_id"], picks["count"])])


def main(args: argparse.Namespace):
    """Run the step -> (manifest, rejects, stats). A bad parameter raises ValueError naming it (before a run
    opens), and so does a run that ingests no image (the run ends FAILED)."""
    sources = check_args(args)
    recount = read_recounts(args)
    items, owner, duplicates, found = bins_and_rejects(args, sources, recount)
    for source in sources:  # after the local checks: an S3 source asks the bucket
        source.check()
    with start_step("ingest", vars(args)):
        # labels.csv (file_list=all) counts give way to the metadata's; a file list's mismatch is a reject
        manifest, rejects, stats = ingest_many(by_source(items, owner), args.cache_dir, args.cache_size,
                                               (args.count_min, args.count_max), args.downloads, duplicates,
                                               metadata_wins=args.file_list == "all", found=found)
        if recount is not None:
            sheet = recount.sheet_stats
            stats.update(recount_rows=sheet["rows"], recount_skipped_empty=sheet["skipped_empty"],
                         recount_rejected=sheet["rejected"])
            print(f"ingest: recounts: {sheet['rows']} rows in {args.recounts}, {sheet['recounted']} recounted, "
                  f"{sheet['skipped_empty']} left empty (skipped), {sheet['rejected']} rejected")
        mlflow.log_metrics(stats)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(write_csv(manifest, Path(tmp) / "manifest.csv")))
            mlflow.log_artifact(str(write_csv(rejects, Path(tmp) / "rejects.csv")))
        for reason, group in rejects.groupby("reason"):
            if reason != "duplicate_id":
                print(f"ingest: {len(group)} rejected as {reason}, e.g. {group['detail'].iloc[0]}")
        recounted = [i for i in duplicates if owner[i] is recount]
        if recounted:
            print(f"ingest: {len(recounted)} recounted bins have another label too; the recount is taken "
                  f"(duplicate_id in rejects.csv), e.g. {', '.join(recounted[:5])}")
        if len(duplicates) > len(recounted):
            others = [i for i in duplicates if owner[i] is not recount]
            print(f"ingest: {len(others)} bin ids are in several folders, each taken from the first listed "
                  f"(duplicate_id in rejects.csv), e.g. {', '.join(others[:5])}")
        conflicts = label_conflicts(manifest, items)
        if len(conflicts):
            print(f"ingest: {len(conflicts)} bins have a labels.csv count that their metadata contradicts; the "
                  f"metadata's count is used (count_from=metadata), e.g. " + ", ".join(
                      f"{r.image_id} ({r.source}): labels {r.listed}, metadata {r['count']}"
                      for _, r in conflicts.head(3).iterrows()))
        if manifest.empty:
            raise ValueError(f"no image was ingested ({stats['rejected']} rejected, see rejects.csv)")
        with warnings.catch_warnings():
            # MLflow hints that int columns cannot hold missing values (none here) and that a local path
            # could be read two ways (it picks the local artifact source, which is right)
            warnings.simplefilter("ignore", UserWarning)
            uris = [s.dataset_source for s in [*sources, *([recount] if recount is not None else [])]]
            # several paths: joined; the generator's code source stands for itself (a recount sheet: in params)
            dataset_source = ",".join(uris) if all(isinstance(u, str) for u in uris) else uris[0]
            ds = mlflow.data.from_pandas(manifest, source=dataset_source, name=f"ingest-{args.source}")
            mlflow.log_input(ds, context="ingest")
        mlflow.log_image(contact_sheet(manifest), "samples.png")
    print(f"ingest: {stats['ingested']} images ingested, {stats['rejected']} rejected; "
          f"images: {stats['cache_hits']} from the cache, {stats['downloaded']} downloaded, "
          f"{stats['not_downloaded']} rejected before download; {stats['metadata_downloaded']} metadata files; "
          f"cache {Path(args.cache_dir).resolve()}")
    return manifest, rejects, stats


if __name__ == "__main__":
    entry.run(main, get_args_parser())
