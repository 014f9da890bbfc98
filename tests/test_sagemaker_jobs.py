"""train -P backend=sagemaker against a moto server on loopback: settings refused before any AWS call, the
CreateTrainingJob request (image, hyperparameters, environment, channels, checkpoint, spot), status polling, a
failed job's reason reaching the user and its MLflow run, and the job side (sm_entry.py -> steps/sagemaker_job.py) on
channels laid out the way SageMaker lays them out."""
from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import boto3
import mlflow
import pytest
from aws import ACCOUNT, REGION, ROLE_ARN, aws, bucket, moto_server, unique  # noqa: F401 (fixtures)
from helpers_data import make_split_run
from mlflow.tracking import MlflowClient

from bincounter import sagemaker_jobs as sj
from steps import sagemaker_job, train

IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/bincounter-train:test"
JOB_TRACKING = "http://mlflow.internal.example:5000"
TINY = dict(arch="resnet18", weights="none", image_size=32, epochs=1, max_steps=1, workers=0, batch_size=8)


@pytest.fixture
def requests(monkeypatch) -> list[dict]:
    """Every CreateTrainingJob request as sent (moto drops Environment from describe_training_job)."""
    seen: list[dict] = []
    real = boto3.Session

    def session(*a, **kw):
        s = real(*a, **kw)
        s.events.register("provide-client-params.sagemaker.CreateTrainingJob",
                          lambda params, **_: seen.append(copy.deepcopy(params)))
        return s

    monkeypatch.setattr(boto3, "Session", session)
    return seen


def fail_jobs(monkeypatch, reason: str) -> None:
    """moto completes every job at once: mark each new one Failed in moto's in-process backend instead."""
    from moto.sagemaker.models import sagemaker_backends

    real = boto3.Session

    names: list[str] = []

    def failed(**_):
        job = sagemaker_backends[ACCOUNT][REGION].training_jobs[names[-1]]
        job.training_job_status, job.secondary_status, job.failure_reason = "Failed", "Failed", reason

    def session(*a, **kw):
        s = real(*a, **kw)
        s.events.register("provide-client-params.sagemaker.CreateTrainingJob",
                          lambda params, **_: names.append(params["TrainingJobName"]))
        s.events.register("after-call.sagemaker.CreateTrainingJob", failed)
        return s

    monkeypatch.setattr(boto3, "Session", session)


def step_args(split: str, bucket: str, **kw):
    argv = [f"--split_run_id={split}", "--backend=sagemaker", f"--role_arn={ROLE_ARN}", f"--region={REGION}",
            f"--s3_output=s3://{bucket}/jobs", f"--image_uri={IMAGE}", "--instance_type=ml.m5.xlarge",
            *[f"--{k}={v}" for k, v in {**TINY, **kw}.items()]]
    return train.get_args_parser().parse_args(argv)


@pytest.fixture
def job_tracking(monkeypatch):
    monkeypatch.setenv("BINCOUNTER_JOB_TRACKING_URI", JOB_TRACKING)  # the tests' own store is a local sqlite file
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")


# ------------------------------------------------------------------------------------------- settings
def test_missing_settings_fail_before_any_aws_call(tmp_path, monkeypatch, job_tracking):
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(boto3, "Session", lambda *a, **k: pytest.fail("an AWS session was opened"))
    monkeypatch.setattr(boto3, "client", lambda *a, **k: pytest.fail("an AWS client was made"))
    split = make_split_run(tmp_path, n=20, size=32)
    args = train.get_args_parser().parse_args([f"--split_run_id={split}", "--backend=sagemaker"])
    with pytest.raises(ValueError) as e:
        train.main(args)
    for text in ("role_arn is required", "region is required", "s3_output is required"):
        assert text in str(e.value)
    assert not mlflow.search_runs(filter_string="tags.`bincounter.step` = 'train'", output_format="list")


@pytest.mark.parametrize("kw, message", [
    (dict(role_arn="my-role"), "not an IAM role ARN"),
    (dict(region="Mars-1"), "not an AWS region"),
    (dict(s3_output="bucket/prefix"), "not an s3://bucket/prefix"),
    (dict(instance_count=0), "instance_count must be at least 1"),
    (dict(instance_type="g5.xlarge"), "not a SageMaker instance type"),
    (dict(data_channel="ftp"), "data_channel must be one of"),
    (dict(tracking_uri="sqlite:///mlflow.db"), "cannot reach the tracking URI"),
])
def test_bad_settings_are_named(kw, message):
    good = dict(role_arn=ROLE_ARN, region=REGION, s3_output="s3://bkt/p", image_uri=IMAGE, tracking_uri=JOB_TRACKING)
    with pytest.raises(ValueError, match=message):
        sj.JobSettings(**{**good, **kw}).validate()


def test_tracking_uri_may_be_a_sagemaker_mlflow_arn():
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:mlflow-tracking-server/bin-counter"
    s = sj.JobSettings(role_arn=ROLE_ARN, region=REGION, s3_output="s3://bkt/p/", image_uri=IMAGE, tracking_uri=arn)
    assert s.validate().tracking_uri == arn and s.s3_output == "s3://bkt/p"


def test_image_is_aws_pytorch_training_image_or_a_clear_error():
    pytest.importorskip("sagemaker.core", reason="the SageMaker SDK (the `sagemaker` extra) is not installed")
    uri = sj.pytorch_image(REGION, "ml.g5.xlarge", version="2.5")
    assert uri.endswith(".amazonaws.com/pytorch-training:2.5-gpu-py311"), uri
    assert ":2.5-cpu-" in sj.pytorch_image(REGION, "ml.m5.xlarge", version="2.5")
    with pytest.raises(ValueError, match=r"no AWS PyTorch training image for torch 99.1.*image_uri.*newest it knows"):
        sj.pytorch_image(REGION, "ml.g5.xlarge", version="99.1")


# ------------------------------------------------------------------------------------------- polling
class FakeSageMaker:
    def __init__(self, states):
        self.states, self.stopped = list(states), []

    def describe_training_job(self, TrainingJobName):
        s = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"TrainingJobName": TrainingJobName, "TrainingJobStatus": s[0], "SecondaryStatus": s[1],
                **({"FailureReason": s[2]} if len(s) > 2 else {})}

    def stop_training_job(self, TrainingJobName):
        self.stopped.append(TrainingJobName)


def test_wait_streams_status_changes_and_raises_the_failure_reason():
    lines, sleeps = [], []
    sm = FakeSageMaker([("InProgress", "Starting"), ("InProgress", "Starting"), ("InProgress", "Downloading"),
                        ("InProgress", "Training"), ("Completed", "Completed")])
    d = sj.wait(sm, "j", timeout=60, poll=5, log=lines.append, sleep=sleeps.append)
    assert d["TrainingJobStatus"] == "Completed" and sleeps == [5] * 4
    assert lines == ["sagemaker: job j InProgress (Starting)", "sagemaker: job j InProgress (Downloading)",
                     "sagemaker: job j InProgress (Training)", "sagemaker: job j Completed (Completed)"]

    sm = FakeSageMaker([("InProgress", "Training"), ("Failed", "Failed", "AlgorithmError: CUDA out of memory")])
    with pytest.raises(sj.JobFailed, match="training job j Failed: AlgorithmError: CUDA out of memory"):
        sj.wait(sm, "j", timeout=60, poll=0, log=lines.append, sleep=lambda s: None)
    sm = FakeSageMaker([("Stopped", "MaxWaitTimeExceeded")])
    with pytest.raises(sj.JobFailed, match="Stopped: no reason given"):
        sj.wait(sm, "j", timeout=60, log=lines.append, sleep=lambda s: None)


def test_wait_stops_a_job_that_outlives_the_timeout():
    sm = FakeSageMaker([("InProgress", "Training")])
    with pytest.raises(sj.JobFailed, match="did not end within 0 s; it has been stopped"):
        sj.wait(sm, "slow", timeout=0, log=lambda s: None, sleep=lambda s: None)
    assert sm.stopped == ["slow"]


# ------------------------------------------------------------------------------------------- against moto
def test_train_step_creates_the_training_job_and_ends_its_run(tmp_path, bucket, requests, job_tracking, capsys):
    split = make_split_run(tmp_path, n=20, size=32)
    run_id = train.main(step_args(split, bucket, lr="0.01", max_wait_seconds=7200))
    out = capsys.readouterr().out
    assert len(requests) == 1
    req = requests[0]
    name = req["TrainingJobName"]
    assert f"sagemaker: created training job {name}" in out and f"sagemaker: job {name} Completed" in out

    assert req["AlgorithmSpecification"] == {"TrainingImage": IMAGE, "TrainingInputMode": "File"}
    assert req["RoleArn"] == ROLE_ARN
    assert req["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge" and req["ResourceConfig"]["InstanceCount"] == 1
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 7200}
    assert req["CheckpointConfig"] == {"S3Uri": f"s3://{bucket}/jobs/checkpoints/{run_id}",
                                       "LocalPath": "/opt/ml/checkpoints"}
    assert req["Environment"]["MLFLOW_TRACKING_URI"] == JOB_TRACKING
    assert req["Environment"]["MLFLOW_RUN_ID"] == run_id
    hp = req["HyperParameters"]
    hp = {k: json.loads(v) for k, v in hp.items()}  # JSON-encoded, as the training toolkit expects
    assert hp["mlflow_run_id"] == run_id and hp["split_run_id"] == split
    assert (hp["lr"], hp["batch_size"], hp["optimizer"], hp["freeze"]) == (0.01, 8, "adamw", False)
    assert (hp["arch"], hp["epochs"], hp["image_size"], hp["max_steps"]) == ("resnet18", 1, 32, 1)
    assert hp["sagemaker_program"] == "sm_entry.py" and "sagemaker_torch_distributed_enabled" not in hp
    assert "hpo_run_id" not in hp  # empty: the job's parser defaults it
    assert not {"role_arn", "s3_output", "backend", "image_uri"} & set(hp)  # where it runs is not what it trains

    # the code the toolkit downloads and runs
    s3 = boto3.client("s3", region_name=REGION)
    src_bucket, src_key = sj.split_s3(hp["sagemaker_submit_directory"])
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=src_bucket, Key=src_key)["Body"].read())) as tar:
        names = set(tar.getnames())
        reqs = tar.extractfile("requirements.txt").read().decode()
    assert {"sm_entry.py", "bincounter/sagemaker_jobs.py", "bincounter/training.py", "steps/train.py", "steps/sagemaker_job.py",
            "steps/options.py", "bincounter/train_log.py"} <= names
    assert "mlflow==3.17.2" in reqs and "torch" not in reqs

    # channels: the split tables, and manifests listing exactly the uploaded cache images
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in req["InputDataConfig"]}
    assert set(channels) == {"splits", "train", "val"}
    assert channels["splits"]["S3DataType"] == "S3Prefix"
    for split_name in ("train", "val"):
        assert channels[split_name]["S3DataType"] == "ManifestFile"
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=sj.split_s3(channels[split_name]["S3Uri"])[1])["Body"].read())
        assert manifest[0] == {"prefix": f"s3://{bucket}/jobs/cache/"}
        table = (tmp_path / "splits" / f"{split_name}.csv").read_text()
        assert len(manifest) - 1 == len(table.strip().splitlines()) - 1
        for key in manifest[1:]:
            s3.head_object(Bucket=bucket, Key=f"jobs/cache/{key}")

    # what moto kept agrees, and the MLflow run ended with the job
    d = boto3.client("sagemaker", region_name=REGION).describe_training_job(TrainingJobName=name)
    assert d["AlgorithmSpecification"]["TrainingImage"] == IMAGE and json.loads(d["HyperParameters"]["mlflow_run_id"]) == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["bincounter.sagemaker_job"] == name
    assert run.data.tags["bincounter.sagemaker_status"] == "Completed"
    assert run.data.tags["bincounter.backend"] == "sagemaker" and run.data.params["backend"] == "sagemaker"

    # a second job uploads only images the cache prefix does not have yet
    train.main(step_args(split, bucket, spot="false", instance_count=2))
    assert "0 uploaded" in capsys.readouterr().out
    req = requests[1]
    assert req["EnableManagedSpotTraining"] is False and "MaxWaitTimeInSeconds" not in req["StoppingCondition"]
    assert req["ResourceConfig"]["InstanceCount"] == 2
    assert req["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"  # JSON true


def test_a_failed_job_fails_the_step_with_its_reason(tmp_path, bucket, job_tracking, monkeypatch):
    fail_jobs(monkeypatch, "AlgorithmError: loss is nan at step 3")
    split = make_split_run(tmp_path, n=20, size=32)
    with pytest.raises(sj.JobFailed, match="Failed: AlgorithmError: loss is nan at step 3"):
        train.main(step_args(split, bucket))
    run = mlflow.search_runs(filter_string="tags.`bincounter.step` = 'train'", output_format="list")[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["bincounter.sagemaker_status"] == "Failed"
    assert "loss is nan at step 3" in run.data.tags["bincounter.failure_reason"]


def test_bucket_channel_lists_the_public_bucket_keys(tmp_path, bucket):
    from helpers_data import make_manifest

    df = make_manifest(tmp_path / "img", n=4, size=32)
    df["source"] = [f"s3://aft-vbi-pds/bin-images/{i}.jpg" for i in df["image_id"]]
    s = sj.JobSettings(role_arn=ROLE_ARN, region=REGION, s3_output=f"s3://{bucket}/x", image_uri=IMAGE,
                       tracking_uri=JOB_TRACKING, data_channel="bucket").validate()
    s3 = boto3.client("s3", region_name=REGION)
    channels = sj.stage_data(s3, s, "job1", [1, 2, 3, 4, 5], df.iloc[:2], df.iloc[2:], log=lambda m: None)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=sj.split_s3(channels["train"]["uri"])[1])["Body"].read())
    assert manifest == [{"prefix": "s3://aft-vbi-pds/"}, "bin-images/img00000.jpg", "bin-images/img00001.jpg"]
    df["source"] = "synthetic://seed=0/x"
    with pytest.raises(ValueError, match="data_channel=bucket needs images ingested from S3"):
        sj.stage_data(s3, s, "job2", [1, 2, 3, 4, 5], df.iloc[:2], df.iloc[2:])


# ------------------------------------------------------------------------------------------- the job side
def download_channels(s3, request: dict, root: Path) -> dict[str, str]:
    """Lay the channels out as SageMaker does: S3Prefix objects under the prefix, ManifestFile entries at their
    path relative to the manifest's prefix. -> SM_CHANNEL_* variables."""
    env = {}
    for c in request["InputDataConfig"]:
        src = c["DataSource"]["S3DataSource"]
        d = root / c["ChannelName"]
        b, key = sj.split_s3(src["S3Uri"])
        if src["S3DataType"] == "ManifestFile":
            manifest = json.loads(s3.get_object(Bucket=b, Key=key)["Body"].read())
            pb, pk = sj.split_s3(manifest[0]["prefix"])
            pairs = [(pb, pk + rel, rel) for rel in manifest[1:]]
        else:
            pairs = [(b, o["Key"], o["Key"][len(key):]) for o in s3.list_objects_v2(Bucket=b, Prefix=key)["Contents"]]
        for ob, ok, rel in pairs:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(ob, ok, str(d / rel))
        env[f"SM_CHANNEL_{c['ChannelName'].upper()}"] = str(d)
    return env


def toolkit_argv(hp: dict[str, str]) -> list[str]:
    """How the training toolkit passes hyperparameters to the script: JSON-decoded, sagemaker_* left out."""
    return [a for k, v in hp.items() if not k.startswith("sagemaker_") for a in (f"--{k}", str(json.loads(v)))]


def test_job_side_trains_into_the_local_steps_run_and_checkpoints_for_spot(tmp_path, bucket, requests,
                                                                          job_tracking, monkeypatch):
    split = make_split_run(tmp_path, n=20, size=32)
    run_id = train.main(step_args(split, bucket))
    req = requests[0]
    job = tmp_path / "job"
    env = download_channels(boto3.client("s3", region_name=REGION), req, job / "input")
    for k, v in {**env, "SM_CHECKPOINT_DIR": str(job / "checkpoints")}.items():
        monkeypatch.setenv(k, v)
    # the job's MLflow is the tests' store here; the run id comes from the job's hyperparameters
    assert sagemaker_job.main(toolkit_argv(req["HyperParameters"])) == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")] == [1]
    assert run.data.params["hp_batch_size"] == "8" and run.data.params["backend"] == "sagemaker"
    assert mlflow.models.get_model_info(f"runs:/{run_id}/model").run_id == run_id
    assert (job / "checkpoints" / run_id / "last.pt").is_file()

    # a spot restart: the restored checkpoint folder wins, nothing is trained or logged twice
    monkeypatch.setattr(mlflow.MlflowClient, "list_artifacts", lambda *a, **k: pytest.fail("checkpoint read from MLflow"))
    with mlflow.start_run(run_id=run_id):
        from bincounter.checkpoints import Checkpointer
        assert Checkpointer(run_id).load()["epoch"] == 1


def test_job_side_under_torchrun_trains_ddp_on_two_cpu_processes(tmp_path, bucket, requests, job_tracking):
    """What a job on several instances runs: sm_entry.py from the uploaded tarball under torchrun, here two CPU
    processes (gloo) on this machine; rank 0 alone logs into the run."""
    import os
    import subprocess
    import sys

    split = make_split_run(tmp_path, n=40, size=32)
    run_id = train.main(step_args(split, bucket, epochs=2, max_steps=2, batch_size=4, instance_count=2))
    req = requests[0]
    s3 = boto3.client("s3", region_name=REGION)
    env = download_channels(s3, req, tmp_path / "job" / "input")
    code = tmp_path / "job" / "code"  # what the toolkit unpacks to /opt/ml/code
    b, k = sj.split_s3(json.loads(req["HyperParameters"]["sagemaker_submit_directory"]))
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=b, Key=k)["Body"].read())) as tar:
        tar.extractall(code, filter="data")
    env.update(SM_CHECKPOINT_DIR=str(tmp_path / "job" / "checkpoints"), OMP_NUM_THREADS="1",
               MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_RUN_ID=run_id, PYTHONPATH="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sm_entry.py",
           *toolkit_argv(req["HyperParameters"])]
    p = subprocess.run(cmd, cwd=code, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]  # once each: rank 0 only
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params["world_size"] == "2"
    assert "distributed data parallel over 2 processes (gloo)" in p.stdout
    assert mlflow.models.get_model_info(f"runs:/{run_id}/model").run_id == run_id
    ckpt = tmp_path / "job" / "checkpoints" / run_id / "last.pt"
    import torch
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])


# ------------------------------------------------------------------------------------------- hpo
def test_hpo_runs_trials_as_parallel_training_jobs(tmp_path, bucket, job_tracking, monkeypatch):
    """hpo -P backend=sagemaker -P parallel_trials=2: hyperopt's trials as jobs, two at once, one nested run
    each. moto runs no job: the hook plays the job's part by logging best_val_loss into the trial's run."""
    import threading

    from steps import hpo as hpo_step

    requests_seen, lock = [], threading.Lock()
    both_running = threading.Barrier(2, timeout=20)  # trials 1 and 2 must be in flight together
    real = boto3.Session

    def fake_job(params, **_):
        with lock:
            requests_seen.append(copy.deepcopy(params))
            n = len(requests_seen)
        if n <= 2:
            both_running.wait()
        if n != 3:  # the third "job" completes without logging its metric: a failed trial, not a failed search
            lr = json.loads(params["HyperParameters"]["lr"])
            MlflowClient().log_metric(params["Environment"]["MLFLOW_RUN_ID"], "best_val_loss", lr * 10)

    def session(*a, **kw):
        s = real(*a, **kw)
        s.events.register("provide-client-params.sagemaker.CreateTrainingJob", fake_job)
        return s

    monkeypatch.setattr(boto3, "Session", session)
    split = make_split_run(tmp_path, n=20, size=32)
    argv = [f"--split_run_id={split}", "--max_evals=3", "--parallel_trials=2", "--backend=sagemaker",
            f"--role_arn={ROLE_ARN}", f"--region={REGION}", f"--s3_output=s3://{bucket}/hpo", f"--image_uri={IMAGE}",
            "--arch=resnet18", "--weights=none", "--image_size=32", "--max_steps=1", "--workers=0", "--metric=val_loss"]
    parent_id = hpo_step.main(hpo_step.get_args_parser().parse_args(argv))

    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = sorted(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"),
                      key=lambda r: int(r.data.tags["bincounter.trial"]))
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED", "FAILED"]
    assert "logged no best_val_loss" in children[2].data.tags["bincounter.failure_reason"]
    by_run = {json.loads(r["HyperParameters"]["mlflow_run_id"]): r for r in requests_seen}
    assert set(by_run) == {c.info.run_id for c in children}
    for c in children:
        hp = {k: json.loads(v) for k, v in by_run[c.info.run_id]["HyperParameters"].items()}
        assert hp["hpo_trial"] is True and hp["arch"] == "resnet18" and hp["split_run_id"] == split
        assert float(c.data.params["hp_lr"]) == pytest.approx(hp["lr"])
        assert c.data.tags["bincounter.step"] == "hpo_trial" and c.data.tags["bincounter.sagemaker_status"] == "Completed"
    # data and code uploaded once for the whole search
    assert len({json.dumps(r["InputDataConfig"]) + r["HyperParameters"]["sagemaker_submit_directory"]
                for r in requests_seen}) == 1
    best = min(children[:2], key=lambda c: c.data.metrics["best_val_loss"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert float(parent.data.params["best_lr"]) == pytest.approx(float(best.data.params["lr"]))
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{parent_id}/trials.json"))["search"]["parallel"] == 2

    # the job side of a trial: the trial's metrics into its child run, no model
    req = by_run[children[0].info.run_id]
    env = download_channels(boto3.client("s3", region_name=REGION), req, tmp_path / "job" / "input")
    for k, v in {**env, "SM_CHECKPOINT_DIR": str(tmp_path / "job" / "checkpoints")}.items():
        monkeypatch.setenv(k, v)
    assert sagemaker_job.main(toolkit_argv(req["HyperParameters"])) == children[0].info.run_id
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_loss")] == [1]
    assert "model" not in {f.path for f in client.list_artifacts(children[0].info.run_id)}
    assert client.get_run(children[0].info.run_id).data.tags["bincounter.step"] == "hpo_trial"


def test_hpo_parallel_trials_need_sagemaker(tmp_path):
    from steps import hpo as hpo_step

    args = hpo_step.get_args_parser().parse_args(["--split_run_id=x", "--parallel_trials=2"])
    with pytest.raises(ValueError, match="more than 1 needs backend=sagemaker"):
        hpo_step.main(args)
