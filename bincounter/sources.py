"""Where image and metadata bytes come from: the ABID bucket on S3, a local folder in the bucket's layout, or
the synthetic bin generator (photos in other layouts and recounts: bincounter.photo_source). Every source offers
the same interface, `Source`: what ingest reads.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import boto3
import pandas as pd
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from mlflow.data.code_dataset_source import CodeDatasetSource

from bincounter import abid, synthetic
from bincounter.layouts import abid_photos
from bincounter.manifest import REJECT_COLUMNS

# Error codes S3 answers for a key that is not there; never retried.
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# Error codes worth another try: throttling and server-side trouble (botocore retries these too; ours is the
# outer layer that also covers a body that breaks off while it is being read).
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}


class MissingObject(LookupError):
    """The source has no such object (S3 404 / NoSuchKey, or no such file)."""


class SourceError(RuntimeError):
    """An object could not be fetched (after retries, or an error that retrying cannot fix)."""


def read_file(path: str | Path) -> bytes:
    """A local photo's bytes. MissingObject when the file is not there, SourceError when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingObject(f"{path} does not exist") from None
    except OSError as e:
        raise SourceError(f"{path}: {e}") from None


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@runtime_checkable
class Source(Protocol):
    """What ingest reads from a source: S3Source, LocalSource, SyntheticSource (and NotInFolders, where the ids
    that none of several folders has go; photo_source's PhotoSource and RecountSource). A source that subclasses
    it inherits `rejects` and `columns`: nothing refused, no column of its own.

    `name`: the source in tables and metric names (`s3://<bucket>`, `synthetic://seed=<seed>`, a folder's name;
    None: no metrics of its own); `tag`: names its records in the cache (the same image id from two sources never
    mixes); `dataset_source`: where the manifest's data came from, for mlflow.data."""

    name: str | None
    tag: str
    dataset_source: object

    def check(self) -> None:
        """ValueError naming the parameter when the source cannot be read at all (before any image is)."""
        ...

    def labels(self) -> dict[str, int | None] | None:
        """{image_id: its count, or None where only its metadata knows it} for every image the source knows a
        count of; None when the source does not list its own (the bucket: a file list names the images)."""
        ...

    def where(self, key: str) -> str:
        """Names an object (`bin-images/<id>.jpg`, `metadata/<id>.json`) in messages."""
        ...

    def row_source(self, image_id: str) -> str:
        """The manifest's `source` column: the object's URI for S3 and synthetic bins, a local folder's name."""
        ...

    def get_image(self, image_id: str) -> bytes:
        """The image's bytes. MissingObject when there is no such image, SourceError when it cannot be read."""
        ...

    def get_metadata(self, image_id: str) -> bytes | None:
        """The image's metadata JSON, None when it has none. SourceError or OSError when it cannot be read."""
        ...

    def rejects(self) -> pd.DataFrame:
        """What the source refused while finding its photos (REJECT_COLUMNS), before ingest reads any."""
        return pd.DataFrame(columns=REJECT_COLUMNS)

    def columns(self, image_id: str) -> dict[str, str]:
        """The image's optional manifest columns (`original`, `recounted_on`; `count_from` where the source
        decides it)."""
        return {}


class S3Source(Source):
    """Reads from an ABID-layout bucket: anonymous (unsigned), or `signed` with the AWS credentials boto3 finds
    (a private bucket); `endpoint_url` points at another S3 (e.g. moto). `get(key)` reads any object of it.

    One boto3 client is shared by all threads (clients are thread-safe); its pool holds `workers` connections.
    """

    def __init__(self, bucket: str = abid.BUCKET, endpoint_url: str | None = None, workers: int = 16,
                 attempts: int = 4, backoff: float = 0.5, signed: bool = False):
        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        self.attempts = attempts
        self.backoff = backoff
        self.client = (signed_client if signed else anonymous_client)(self.endpoint_url, workers)
        self.name = f"s3://{bucket}"  # the bins' source_group (bincounter.manifest)
        self.tag = f"s3-{bucket}-{short_hash(self.endpoint_url or 'aws')}"
        self.dataset_source = f"{self.endpoint_url.rstrip('/')}/{bucket}" if self.endpoint_url else f"s3://{bucket}"

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def row_source(self, image_id: str) -> str:
        return self.where(abid.image_key(image_id))

    def labels(self) -> None:
        """None: the bucket's counts are in its metadata, one object per image (a file list names the images)."""
        return None

    def check(self) -> None:
        """Fail at once, naming the parameter, when the bucket or endpoint is wrong (rather than rejecting
        every image after its retries). A bucket that refuses listing but serves objects passes."""
        where = f"at {self.endpoint_url}" if self.endpoint_url else "on AWS"
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=abid.IMAGE_PREFIX, MaxKeys=1)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                raise ValueError(f"bucket: there is no bucket {self.bucket!r} {where}") from None
            if code not in ("AccessDenied", "403"):
                raise ValueError(f"bucket: cannot read bucket {self.bucket!r} {where}: {e}") from None
        except BotoCoreError as e:
            raise ValueError(f"endpoint_url: cannot reach S3 {where}: {e}") from None

    def get_image(self, image_id: str) -> bytes:
        return self.get(abid.image_key(image_id))

    def get_metadata(self, image_id: str) -> bytes | None:
        try:
            return self.get(abid.metadata_key(image_id))
        except MissingObject:
            return None

    def get(self, key: str) -> bytes:
        """The whole object `key`; retries transient errors with exponential back-off and jitter. MissingObject
        when there is no such key, SourceError when it cannot be read (both name the object's s3:// URI)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in _MISSING_CODES:
                    raise MissingObject(f"s3://{self.bucket}/{key} does not exist") from None
                if code not in _TRANSIENT_CODES or attempt == self.attempts:
                    raise SourceError(f"s3://{self.bucket}/{key}: {e}") from None
            except BotoCoreError as e:  # connection dropped, read timeout, body cut short
                if attempt == self.attempts:
                    raise SourceError(f"s3://{self.bucket}/{key}: {e} (after {attempt} tries)") from None
            time.sleep(self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))

    def list_ids(self, prefix: str = abid.METADATA_PREFIX, suffix: str = ".json") -> list[str]:
        """Image ids of every `prefix...suffix` key in the bucket (one LIST request per 1,000 keys)."""
        ids = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            ids += [abid.id_from_key(o["Key"]) for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
        return ids


def anonymous_client(endpoint_url: str | None, workers: int = 16):
    """An unsigned S3 client (public buckets need no credentials) with botocore's standard retries."""
    config = Config(signature_version=UNSIGNED, max_pool_connections=max(workers, 10),
                    retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, region_name="us-east-1",
                                          config=config)


def signed_client(endpoint_url: str | None, workers: int = 16):
    """An S3 client signed with the credentials boto3 finds (a private bucket), with botocore's standard retries."""
    config = Config(max_pool_connections=max(workers, 10), retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


class LocalSource(Source):
    """A folder laid out like the bucket: `bin-images/<id>.<jpg|jpeg|png, any case>`, `metadata/<id>.json`,
    optionally `labels.csv`. `name`, the manifest's `source` for its bins, is the folder's own name as given
    (`../shared/abid-more` -> `abid-more`; a symbolic link's name, not its target's). bin-images/ is listed by
    check() or on first use (layouts.abid_photos), and that listing answers until the next check()."""

    layout = "abid"

    def __init__(self, data_dir: str | Path):
        self.given = str(data_dir)
        self.root = Path(data_dir).resolve()
        self.name = Path(os.path.abspath(data_dir)).name or str(self.root)  # abspath: `.` and `..` named as meant
        self.tag = f"local-{short_hash(str(self.root))}"
        self.dataset_source = str(self.root)
        self._listing: tuple[dict[str, Path], pd.DataFrame] | None = None

    def _photos(self) -> dict[str, Path]:
        if self._listing is None:
            self._listing = abid_photos(self.root)
        return self._listing[0]

    def where(self, key: str) -> str:
        """The photo's own file for an image key (`bin-images/7.jpg` may be `7.PNG`), else the key's path."""
        found = self._photos().get(abid.id_from_key(key)) if key.startswith(abid.IMAGE_PREFIX) else None
        return str(found or self.root / key)

    def row_source(self, image_id: str) -> str:
        return self.name

    def check(self) -> None:
        """ValueError `data_dir: ...` naming the folder as given when it does not exist, has no bin-images/
        folder or no photo in it. Reads no image."""
        if not self.root.is_dir():
            raise ValueError(f"data_dir: {self.given} does not exist or is not a folder")
        if not (self.root / abid.IMAGE_PREFIX).is_dir():
            raise ValueError(f"data_dir: {self.given} has no {abid.IMAGE_PREFIX} folder")
        self._listing = abid_photos(self.root)  # what is there now
        if not self._photos() and "duplicate" not in set(self._listing[1]["reason"]):
            raise ValueError(f"data_dir: {self.given} has no photo in {abid.IMAGE_PREFIX} (no .jpg, .jpeg or .png "
                             f"file)")

    def has_image(self, image_id: str) -> bool:
        return image_id in self._photos()

    def get_image(self, image_id: str) -> bytes:
        name = self.where(abid.image_key(image_id))
        if not self.has_image(image_id):  # no photo of its own (or two: `7.jpg` beside `7.PNG`)
            raise MissingObject(f"{name} does not exist")
        return read_file(name)  # MissingObject too where it was removed since bin-images/ was listed

    def get_metadata(self, image_id: str) -> bytes | None:
        path = self.root / abid.metadata_key(image_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def labels(self) -> dict[str, int | None]:
        """Every image in bin-images/ whose count is known -> its count from labels.csv, or None where only
        its metadata knows it (ingest reads that)."""
        listed = {}
        if (self.root / "labels.csv").exists():
            listed = abid.read_label_index(self.root / "labels.csv")
        with_metadata = {p.stem for p in (self.root / abid.METADATA_PREFIX).glob("*.json")}
        return {i: listed.get(i) for i in sorted(self._photos()) if i in listed or i in with_metadata}

    def rejects(self) -> pd.DataFrame:
        """What listing bin-images/ refused (not_a_photo; duplicate: `7.jpg` beside `7.PNG`), then the photos whose
        count nothing knows (unknown_count: those labels() leaves out)."""
        known = self.labels()
        unknown = [(i, "unknown_count", f"{p}: no {abid.metadata_key(i)} and no labels.csv row")
                   for i, p in sorted(self._photos().items()) if i not in known]
        return pd.DataFrame([*self._listing[1].itertuples(index=False), *unknown], columns=REJECT_COLUMNS)

    def columns(self, image_id: str) -> dict[str, str]:
        found = self._photos().get(image_id)
        return {"original": f"{abid.IMAGE_PREFIX}{found.name}"} if found else {}


def all_labels(sources: list[Source]) -> tuple[dict[str, int | None], dict[str, Source], dict[str, list]]:
    """Every image whose count the sources know (Source.labels: local folders, the synthetic bins) ->
    ({image_id: count or None}, {image_id: the source it is taken from}, {image_id: every source that has it}
    for ids in several). An id in several is taken from the first one listed, with that one's count."""
    items: dict[str, int | None] = {}
    owner: dict[str, Source] = {}
    found: dict[str, list[Source]] = {}
    for source in sources:
        for image_id, count in source.labels().items():
            found.setdefault(image_id, []).append(source)
            if image_id not in owner:
                items[image_id], owner[image_id] = count, source
    return items, owner, {i: f for i, f in found.items() if len(f) > 1}


def locate(folders: list[LocalSource], ids) -> tuple[dict[str, object], dict[str, list]]:
    """Listed ids (a file_list.json's) -> ({image_id: the first folder with its photo}, {image_id: every folder
    that has it} for ids in several). One folder: it answers for every id (its own rejects name what is
    missing); with several, ids no folder has go to NotInFolders."""
    if len(folders) == 1:
        return dict.fromkeys(ids, folders[0]), {}
    owner: dict[str, object] = {}
    dups: dict[str, list] = {}
    missing = NotInFolders(folders)
    for image_id in ids:
        found = [f for f in folders if f.has_image(image_id)]
        owner[image_id] = found[0] if found else missing
        if len(found) > 1:
            dups[image_id] = found
    return owner, dups


class NotInFolders(Source):
    """Where the listed ids that no folder has a photo of go: each is rejected as missing_image naming the photo's
    path in every folder. Their metadata is read from the first folder that has it (a count mismatch is still
    found first, as in a single folder)."""

    name = None  # no per-source metrics: these ids are counted in rejected_missing_image
    tag = "not-in-folders"  # never written: nothing from here is cached

    def __init__(self, folders: list[LocalSource]):
        self.folders = folders
        self.dataset_source = ",".join(str(f.root) for f in folders)

    def _folder(self, key: str) -> LocalSource:
        return next((f for f in self.folders if (f.root / key).exists()), self.folders[0])

    def where(self, key: str) -> str:
        return self._folder(key).where(key)

    def row_source(self, image_id: str) -> str:
        return self._folder(abid.image_key(image_id)).name

    def check(self) -> None:
        for folder in self.folders:
            folder.check()

    def labels(self) -> dict[str, int | None]:
        return {}  # no photo is here

    def get_image(self, image_id: str) -> bytes:
        paths = [f.where(abid.image_key(image_id)) for f in self.folders]
        raise MissingObject(f"{' and '.join(paths)} {'does' if len(paths) == 1 else 'do'} not exist")

    def get_metadata(self, image_id: str) -> bytes | None:
        return self._folder(abid.metadata_key(image_id)).get_metadata(image_id)


class SyntheticSource(Source):
    """Generated bins (bincounter.synthetic): image `syn<seed>-<i>` is draw_bin(count, item_seed(seed, i), size)
    encoded as JPEG. The counts come with the item list (`labels()`), not from metadata."""

    def __init__(self, num_images: int, count_min: int, count_max: int, seed: int, size: int):
        self._counts = dict(synthetic.synthetic_items(num_images, count_min, count_max, seed))
        self.seed = seed
        self.size = size
        self.name = f"synthetic://seed={seed}"  # the bins' source_group (bincounter.manifest)
        self.tag = f"synthetic-{seed}"
        self.dataset_source = CodeDatasetSource(tags={"generator": "bincounter.synthetic", "seed": str(seed)})

    def where(self, key: str) -> str:
        return f"synthetic://seed={self.seed}/{key}"

    def row_source(self, image_id: str) -> str:
        return self.where(abid.image_key(image_id))

    def check(self) -> None:
        pass  # nothing to reach: the bins are drawn here

    def labels(self) -> dict[str, int]:
        """{image_id: count} of every bin of the set, in the generator's order."""
        return dict(self._counts)

    def get_image(self, image_id: str) -> bytes:
        if image_id not in self._counts:
            raise MissingObject(f"{self.where(abid.image_key(image_id))} is not in this synthetic set")
        index = int(image_id.rsplit("-", 1)[1])
        img = synthetic.draw_bin(self._counts[image_id], synthetic.item_seed(self.seed, index), self.size)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    def get_metadata(self, image_id: str) -> bytes | None:
        return None
