"""ingest: fetch the listed images, verify them and cache resized copies; record which are good and which are bad.

Reads: `file_list.json` (any source but synthetic; `--file_list all` takes every image of the local folders whose
count its metadata or its labels.csv knows) and the images from `--source` s3 | local | synthetic. `--data_dir`
may name several folders, separated by commas: a bin id in several is taken from the first listed (a file list's
ids are looked up in the folders in that order), and each copy left is recorded as a duplicate.
Logs: `manifest.csv` (image_id, count, path, sha256, width, height, source: a local folder's name or the object's
URI, count_from: metadata | labels), `rejects.csv` (image_id, reason, detail; reason duplicate_id for the copies
left), `samples.png` (a contact sheet of ingested images with their counts), the manifest as the run's dataset
input (context `ingest`), metrics ingested, rejected, rejected_<reason>, count_<c>, cache_hits + downloaded +
not_downloaded (images: they add up to the number listed), metadata_downloaded, temp_files_removed,
duplicate_ids, label_conflicts (labels.csv and metadata disagree: the metadata's count is used), and per source
ingested_<source> and rejected_<source>. Images live in the cache (`--cache_dir`), see bincounter.ingest.

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
from bincounter.runs import download_uri, start_step
from bincounter.sources import S3Source, SyntheticSource, all_labels, local_folders, locate
from bincounter.transforms import read_image
from steps.options import renamed_option, resolve_renamed, whole

SOURCES = ("s3", "local", "synthetic")
SAMPLES = 24  # images on the contact sheet


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="s3", help="s3 (the ABID bucket), local (a folder in its layout) or synthetic")
    p.add_argument("--file_list", default="file_list.json",
                   help="the list to ingest (a path or `runs:/` URI); `all`: every image of the local folders")
    p.add_argument("--data_dir", default="",
                   help="source=local: folder with `bin-images/`, `metadata/` (and `labels.csv`), or several "
                        "separated by commas (a bin id in several is taken from the first)")
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


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first bad parameter (before anything is fetched); settles the old names."""
    resolve_renamed(args)
    if args.source not in SOURCES:
        raise ValueError(f"source: unknown source {args.source!r} (expected one of {', '.join(SOURCES)})")
    if args.source == "local":
        local_folders(args.data_dir)  # each folder: there, with photos, given once, named apart from the others
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


def make_sources(args: argparse.Namespace) -> list:
    """The sources to read, in order: one for s3 and synthetic, one per data_dir folder for local."""
    if args.source == "s3":
        return [S3Source(args.bucket, args.endpoint_url or None, args.downloads)]
    if args.source == "local":
        return local_folders(args.data_dir)
    return [SyntheticSource(args.num_images, args.count_min, args.count_max, args.seed, args.cache_size)]


def list_items(args: argparse.Namespace, sources: list) -> tuple[dict[str, int | None], dict, dict]:
    """-> ({image_id: count from the list, or None where only the metadata knows it}, {image_id: the source to
    read it from}, {image_id: every folder that has it} for the ids taken from one of several). The list: the
    sources' own labels() for synthetic bins and `file_list=all`, else the file list. The items are cut to
    `limit` by a seeded shuffle (so a limit keeps the counts' proportions), sorted by id; duplicates are those
    of the items kept."""
    duplicates: dict = {}
    if args.source == "synthetic" or args.file_list == "all":
        items, owner, duplicates = all_labels(sources)
        if not items:
            raise ValueError(f"data_dir: no image in {args.data_dir} has a count (no metadata, no labels.csv row)")
    else:
        try:
            # a path, or a select run's file_list.json as a runs:/ URI
            path = download_uri(args.file_list) if args.file_list.startswith("runs:/") else args.file_list
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
    check_args(args)
    sources = make_sources(args)
    items, owner, duplicates = list_items(args, sources)
    for source in sources:  # after the local checks: an S3 source asks the bucket
        source.check()
    with start_step("ingest", vars(args)):
        # labels.csv (file_list=all) counts give way to the metadata's; a file list's mismatch is a reject
        manifest, rejects, stats = ingest_many(by_source(items, owner), args.cache_dir, args.cache_size,
                                               (args.count_min, args.count_max), args.downloads, duplicates,
                                               metadata_wins=args.file_list == "all")
        mlflow.log_metrics(stats)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(write_csv(manifest, Path(tmp) / "manifest.csv")))
            mlflow.log_artifact(str(write_csv(rejects, Path(tmp) / "rejects.csv")))
        for reason, group in rejects.groupby("reason"):
            if reason != "duplicate_id":
                print(f"ingest: {len(group)} rejected as {reason}, e.g. {group['detail'].iloc[0]}")
        if duplicates:
            print(f"ingest: {len(duplicates)} bin ids are in several folders, each taken from the first listed "
                  f"(duplicate_id in rejects.csv), e.g. {', '.join(list(duplicates)[:5])}")
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
            dataset_source = sources[0].dataset_source if len(sources) == 1 else \
                ",".join(s.dataset_source for s in sources)  # several folders: their paths
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
