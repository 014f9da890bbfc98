"""moto S3 on 127.0.0.1 for the tests: one threaded server per test process, public buckets seeded with objects.

    endpoint = moto_endpoint()                    # starts the server on a free port on first use
    bucket = public_bucket(endpoint, {"bin-images/1.jpg": b"..."})   # a fresh bucket, anonymous reads allowed

moto keeps its state per process, shared by every server in it: give each test its own bucket (the default).
Call `aws_env(monkeypatch)` in a test that lets code under test sign requests: dummy credentials, us-east-1.
"""
from __future__ import annotations

import atexit
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
_endpoint: str | None = None


def moto_endpoint() -> str:
    """URL of this process's moto server (started on first call on a free loopback port, stopped at exit)."""
    global _endpoint
    if _endpoint is None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        atexit.register(server.stop)
        host, port = server.get_host_and_port()
        _endpoint = f"http://{host}:{port}"
    return _endpoint


def aws_env(monkeypatch) -> None:
    """Dummy AWS credentials and region for the test (never real ones)."""
    for k, v in DUMMY_ENV.items():
        monkeypatch.setenv(k, v)


def client(endpoint: str):
    """A signed client with dummy credentials (moto accepts any), to set up buckets."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def public_bucket(endpoint: str, objects: dict[str, bytes] | None = None, name: str | None = None) -> str:
    """Create a bucket that anyone may list and read (like aft-vbi-pds) and put `objects` ({key: bytes}) in it.
    Returns its name (random unless given)."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    s3 = client(endpoint)
    s3.create_bucket(Bucket=name)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
    put_objects(endpoint, name, objects or {})
    return name


def put_objects(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    s3 = client(endpoint)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def sample_objects(sample_dir: str | Path, ids: list[str]) -> dict[str, bytes]:
    """The bucket's objects for these ids from a folder in its layout: each image, and its metadata if any."""
    root = Path(sample_dir)
    out = {}
    for i in ids:
        out[f"bin-images/{i}.jpg"] = (root / "bin-images" / f"{i}.jpg").read_bytes()
        meta = root / "metadata" / f"{i}.json"
        if meta.exists():
            out[f"metadata/{i}.json"] = meta.read_bytes()
    return out
