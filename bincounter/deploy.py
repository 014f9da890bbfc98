"""SageMaker deployment through MLflow's deployment client, and calling a deployed endpoint.

`deploy` checks every setting first (no AWS call for a missing or malformed one), then asks SageMaker whether
the endpoint exists (describe_endpoint) and goes through `mlflow.deployments.get_deploy_client("sagemaker:/<region>")`:
`create_deployment` for a new endpoint, `update_deployment` (mode replace) for an existing one in replace mode.
MLflow reads only the bool True as synchronous (the text 'true' is False) and ignores unknown config keys, so
the config is built here from typed settings with MLflow's key names.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

import boto3
import pandas as pd
from botocore.exceptions import BotoCoreError, ClientError
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException

from bincounter.runs import model_info
from bincounter.serving import INPUT_COLUMN
from bincounter.transforms import ImageError, decode_image

MODES = ("create", "replace")
MAX_PAYLOAD = 5 * 1024 * 1024  # SageMaker refuses invocation bodies over 6 MB: batch below that
# AWS names, also checked by sagemaker_jobs
ROLE_ARN = re.compile(r"^arn:aws(-cn|-us-gov)?:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$")
_ENDPOINT = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ECR_IMAGE = re.compile(r"^\d{12}\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+"
                        r"(:[\w.-]{1,128}|@sha256:[0-9a-f]{64})?$")


class DeployError(RuntimeError):
    """A deployment that SageMaker (or MLflow on its behalf) refused; the message says what and where."""


@dataclass
class Settings:
    """A deployment: which model, where, on what. Empty image_url: MLflow's default (the account's ECR
    `mlflow-pyfunc:<mlflow version>` image or $MLFLOW_SAGEMAKER_DEPLOY_IMG_URL); empty bucket: MLflow creates
    `mlflow-sagemaker-<region>-<account>`."""
    model_uri: str = "models:/bin-counter@champion"
    endpoint: str = "bin-counter"
    region: str = "us-east-1"
    execution_role_arn: str = ""
    image_url: str = ""
    bucket: str = ""
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    synchronous: bool = True
    timeout_seconds: int = 1200
    mode: str = "create"

    def validate(self) -> "Settings":
        """Raise ValueError naming every missing or malformed setting (no AWS call)."""
        problems = []
        if not self.model_uri:
            problems.append("model_uri is empty")
        if not _ENDPOINT.match(self.endpoint):
            problems.append(f"endpoint {self.endpoint!r} is not a SageMaker endpoint name (letters, digits and "
                            "hyphens, at most 63, starting with a letter or digit)")
        if not REGION.match(self.region):
            problems.append(f"region {self.region!r} is not an AWS region name like us-east-1")
        if not self.execution_role_arn:
            problems.append("execution_role_arn is required: the IAM role SageMaker assumes to pull the image and "
                            "the model (arn:aws:iam::<account>:role/<name>)")
        elif not ROLE_ARN.match(self.execution_role_arn):
            problems.append(f"execution_role_arn {self.execution_role_arn!r} is not an IAM role ARN "
                            "(arn:aws:iam::<12-digit account>:role/<name>)")
        if self.image_url:
            m = _ECR_IMAGE.match(self.image_url)
            if not m:
                problems.append(f"image_url {self.image_url!r} is not an ECR image "
                                "(<account>.dkr.ecr.<region>.amazonaws.com/<repository>[:tag])")
            elif m["region"] != self.region:
                problems.append(f"image_url is in {m['region']} but the endpoint goes to {self.region}: SageMaker "
                                "needs the image in the endpoint's region")
        if self.bucket and not _BUCKET.match(self.bucket):
            problems.append(f"bucket {self.bucket!r} is not an S3 bucket name")
        if not INSTANCE_TYPE.match(self.instance_type):
            problems.append(f"instance_type {self.instance_type!r} is not a SageMaker instance type like ml.m5.large")
        if not isinstance(self.instance_count, int) or isinstance(self.instance_count, bool) or self.instance_count < 1:
            problems.append(f"instance_count must be a whole number >= 1, got {self.instance_count!r}")
        if not isinstance(self.synchronous, bool):
            problems.append(f"synchronous must be a bool, got {self.synchronous!r}")
        if not isinstance(self.timeout_seconds, int) or self.timeout_seconds < 1:
            problems.append(f"timeout_seconds must be a whole number >= 1, got {self.timeout_seconds!r}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if problems:
            raise ValueError("deploy settings: " + "; ".join(problems))
        return self

    def config(self) -> dict:
        """The config for MLflow's SageMaker client, with its key names and types."""
        out = {"execution_role_arn": self.execution_role_arn, "region_name": self.region,
               "instance_type": self.instance_type, "instance_count": self.instance_count,
               "synchronous": self.synchronous, "timeout_seconds": self.timeout_seconds, "mode": self.mode}
        if self.image_url:
            out["image_url"] = self.image_url
        if self.bucket:
            out["bucket"] = self.bucket  # MLflow's key is `bucket`; `bucket_name` would be ignored silently
        return out


def endpoint_exists(endpoint: str, region: str) -> bool:
    """Whether SageMaker has the endpoint (any status). Raises DeployError when SageMaker cannot be asked."""
    try:
        boto3.client("sagemaker", region_name=region).describe_endpoint(EndpointName=endpoint)
        return True
    except ClientError as e:
        if e.response["Error"]["Code"] == "ValidationException" and "Could not find" in str(e):
            return False
        raise DeployError(f"cannot ask SageMaker in {region} about endpoint {endpoint}: {e}") from None
    except BotoCoreError as e:  # no credentials, no network
        raise DeployError(f"cannot reach SageMaker in {region}: {e}") from None


def deploy(s: Settings) -> tuple[str, dict]:
    """Create or replace the endpoint per `s` -> (the client method used, SageMaker's description of it)."""
    s.validate()
    try:
        model_info(s.model_uri)
    except (MlflowException, OSError) as e:
        raise ValueError(f"model_uri {s.model_uri}: cannot read the model ({e})") from None
    exists = endpoint_exists(s.endpoint, s.region)
    if exists and s.mode == "create":
        raise ValueError(f"endpoint {s.endpoint} already exists in {s.region}: use mode=replace to put the model on "
                         "it, or choose another endpoint name")
    client = get_deploy_client(f"sagemaker:/{s.region}")
    action = "update_deployment" if exists else "create_deployment"
    print(f"deploy: {action} {s.endpoint} in {s.region} with {s.model_uri} "
          f"({s.instance_count} x {s.instance_type}, mode {s.mode})")
    try:
        getattr(client, action)(s.endpoint, s.model_uri, config=s.config())
    except (MlflowException, ClientError, BotoCoreError) as e:
        raise DeployError(f"{action} of endpoint {s.endpoint} in {s.region} failed: {e}") from None
    return action, client.get_deployment(s.endpoint)


def _batches(texts: list[str]):
    """Consecutive groups of texts, each below MAX_PAYLOAD in total (or one text alone)."""
    batch, size = [], 0
    for t in texts:
        if batch and size + len(t) > MAX_PAYLOAD:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += len(t)
    if batch:
        yield batch


def invoke(endpoint: str, region: str, images: list[bytes]) -> pd.DataFrame:
    """Images -> the endpoint's predictions (count, confidence, p_<count>), one `dataframe_split` request per
    batch below SageMaker's payload limit. Raises DeployError when the endpoint refuses."""
    runtime = boto3.client("sagemaker-runtime", region_name=region)
    tables = []
    for batch in _batches([base64.b64encode(b).decode() for b in images]):
        body = json.dumps({"dataframe_split": {"columns": [INPUT_COLUMN], "data": [[t] for t in batch]}})
        try:
            r = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json",
                                        Accept="application/json")
            preds = pd.DataFrame(json.loads(r["Body"].read())["predictions"])
        except (ClientError, BotoCoreError) as e:
            raise DeployError(f"endpoint {endpoint} in {region}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DeployError(f"endpoint {endpoint} answered something that is not predictions: {e!r}") from None
        if len(preds) != len(batch):
            raise DeployError(f"endpoint {endpoint} answered {len(preds)} predictions for {len(batch)} images")
        tables.append(preds)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def endpoint_predictor(endpoint: str, region: str):
    """A predictor (see bincounter.predict.predict_files) that calls the endpoint. Images are checked here
    first, with the served model's own decoder, so that one bad image is reported and does not fail the
    whole request."""
    def predict(images: list[bytes], names: list[str]) -> tuple[pd.DataFrame, list[str | None]]:
        errors: list[str | None] = [None] * len(images)
        for i, (data, name) in enumerate(zip(images, names)):
            try:
                decode_image(data, name)
            except ImageError as e:
                errors[i] = str(e)
        good = [i for i, e in enumerate(errors) if e is None]
        preds = invoke(endpoint, region, [images[i] for i in good])
        preds.index = good
        if "error" in preds:  # the served model's own per-row answer (`row k` of its request)
            for i, e in preds["error"].dropna().items():
                errors[i] = f"{names[i]}: endpoint: {e}"
        return preds.drop(columns="error", errors="ignore").reindex(range(len(images))), errors
    return predict
