"""A moto server on 127.0.0.1 standing in for AWS (S3, IAM, STS, ECR, SageMaker, SageMaker runtime): the one
place the tests start moto and make buckets.

    endpoint = moto_endpoint()                    # this process's server, started on first use on a free port
    bucket = public_bucket(endpoint, {"bin-images/1.jpg": b"..."})   # a fresh bucket, anonymous reads allowed

Fixtures: `moto_server` (the same server, as a Moto), `aws` (boto3 pointed at it for one test through the
environment, so `mlflow run` subprocesses see it too, with dummy credentials and no access to the user's AWS
files), `bucket` (a new empty bucket). moto keeps one state per process: tests never reset it and use names of
their own instead (`unique`).
"""
from __future__ import annotations

import atexit
import json
import logging
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/bin-counter-sagemaker"
IMAGE_URL = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/mlflow-pyfunc:test"
SECRET = "moto-secret-key-must-never-be-logged"
_endpoint: str | None = None


def moto_endpoint() -> str:
    """URL of this process's moto server (started on first call on a free loopback port, stopped at exit)."""
    global _endpoint
    if _endpoint is None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: any free port
        server.start()
        atexit.register(server.stop)
        host, port = server.get_host_and_port()
        _endpoint = f"http://{host}:{port}"
    return _endpoint


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # moto's state is shared by the whole test process


def client(endpoint: str):
    """A signed S3 client with dummy credentials (moto accepts any), to set up buckets."""
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def public_bucket(endpoint: str, objects: dict[str, bytes] | None = None, name: str | None = None) -> str:
    """Create a bucket that anyone may list and read (like aft-vbi-pds) and put `objects` ({key: bytes}) in it.
    Returns its name (random unless given)."""
    name = name or unique("test")
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


@dataclass
class Moto:
    url: str

    def _post(self, path: str, doc: dict | None = None) -> None:
        data = json.dumps(doc or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()

    def queue_endpoint_result(self, body: dict | str, content_type: str = "application/json") -> None:
        """The next invoke_endpoint with a new body answers `body` (moto has no model to run)."""
        text = body if isinstance(body, str) else json.dumps(body)
        self._post("/moto-api/static/sagemaker/endpoint-results",
                   {"account_id": ACCOUNT, "region": REGION, "results": [{"Body": text, "ContentType": content_type}]})


@pytest.fixture(scope="module")
def moto_server() -> Moto:
    return Moto(moto_endpoint())


@pytest.fixture
def aws(moto_server, monkeypatch) -> Moto:
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    return moto_server


@pytest.fixture
def bucket(aws) -> str:
    """A new, empty S3 bucket on the moto server."""
    name = unique("bc-bucket")
    client(aws.url).create_bucket(Bucket=name)
    return name
