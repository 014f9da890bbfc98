"""A label index read from the ABID bucket's own metadata (the select step's `labels=s3`): no index file needed,
only anonymous reads of `metadata/<id>.json`."""
from __future__ import annotations

import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from bincounter import abid
from bincounter.sources import S3Source, SourceError


def scan_bucket_counts(quotas: dict[int, int], seed: int, endpoint_url: str | None, bucket: str = abid.BUCKET,
                       workers: int = 16) -> dict[str, int]:
    """{count: how many wanted} -> {image_id: count} read from the bucket's metadata: list `metadata/`, shuffle
    the ids with `seed`, fetch metadata concurrently in that order until every quota is met or the ids run out.
    Metadata that is missing or unreadable is skipped and counted in a warning."""
    src = S3Source(bucket, endpoint_url, workers)
    ids = sorted(src.list_ids())
    random.Random(seed).shuffle(ids)
    need = {c: n for c, n in quotas.items() if n > 0}
    out: dict[str, int] = {}
    bad: list[str] = []
    lock = threading.Lock()

    def fetch(image_id: str) -> int | None:
        try:
            raw = src.get_metadata(image_id)
            if raw is None:
                raise abid.MetadataError(f"s3://{bucket}/{abid.metadata_key(image_id)} disappeared")
            return abid.parse_metadata(raw, f"s3://{bucket}/{abid.metadata_key(image_id)}")
        except (abid.MetadataError, SourceError) as e:
            with lock:
                bad.append(str(e))
            return None

    # Batches keep the result deterministic (taken in shuffled order) while letting the scan stop early.
    batch = workers * 8
    with ThreadPoolExecutor(workers) as ex:
        for start in range(0, len(ids), batch):
            if not need:
                break
            chunk = ids[start:start + batch]
            for image_id, count in zip(chunk, ex.map(fetch, chunk)):
                if count in need:
                    out[image_id] = count
                    need[count] -= 1
                    if need[count] == 0:
                        del need[count]
    if bad:
        print(f"scan: skipped {len(bad)} images with bad metadata, e.g. {bad[0]}", file=sys.stderr)
    if need:
        print(f"scan: the bucket ran out of images for counts {sorted(need)} (still wanted {need})", file=sys.stderr)
    return out
