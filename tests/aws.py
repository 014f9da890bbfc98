"""A moto server on 127.0.0.1 standing in for AWS (S3, IAM, STS, ECR, SageMaker, SageMaker runtime).

`moto_server` starts one per test module that imports it; `aws` points boto3 at it for one test through the
environment (so `mlflow run` subprocesses see it too), with dummy credentials and no access to the user's AWS
files. moto keeps one state per process, shared by all its servers (tests/s3.py's too): tests never reset it
and use names of their own instead.
"""
from __future__ import annotations

import json
import urllib.request
import uuid
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/bin-counter-sagemaker"
IMAGE_URL = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/mlflow-pyfunc:test"
SECRET = "moto-secret-key-must-never-be-logged"


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
def moto_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: any free port
    server.start()
    host, port = server.get_host_and_port()
    yield Moto(f"http://{host}:{port}")
    server.stop()


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


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # moto's state is shared by the whole test process


@pytest.fixture
def bucket(aws) -> str:
    """A new, empty S3 bucket on the moto server."""
    name = unique("bc-bucket")
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=name)
    return name
