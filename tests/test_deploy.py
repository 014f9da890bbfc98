"""deploy: MLflow's SageMaker deployment client against a moto server on loopback; bad settings refused
before any AWS call."""
from __future__ import annotations


import boto3
import mlflow
import pytest
from aws import IMAGE_URL, REGION, ROLE_ARN, SECRET, aws, bucket, moto_server, unique  # noqa: F401 (fixtures)
from conftest import last_run, run_entry
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException
from mlflow.sagemaker import SageMakerDeploymentClient

from bincounter import deploy, entry
from steps import deploy as deploy_step


@pytest.fixture
def champion(tiny_model) -> str:  # noqa: F811
    name = unique("bc-deploy")
    mv = mlflow.register_model(tiny_model.model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", mv.version)
    return f"models:/{name}@champion"


def settings(model_uri: str, bucket: str, **kw) -> deploy.Settings:
    return deploy.Settings(model_uri=model_uri, endpoint=unique("bc"), region=REGION, execution_role_arn=ROLE_ARN,
                           image_url=IMAGE_URL, bucket=bucket, timeout_seconds=60, **kw)


def test_entry_point_creates_an_endpoint_to_get_list_invoke_and_delete(aws, champion, bucket, tiny_model):  # noqa: F811
    endpoint = unique("bc")
    p = run_entry("deploy", {"model_uri": champion, "endpoint": endpoint, "execution_role_arn": ROLE_ARN,
                             "image_url": IMAGE_URL, "bucket": bucket, "instance_count": 2, "timeout_seconds": 60})
    run = last_run("deploy")
    assert run.data.tags["bincounter.deploy_action"] == "create_deployment"
    assert run.data.tags["bincounter.endpoint_status"] == "InService"
    assert f"endpoint {endpoint} is InService" in p.stdout

    client = get_deploy_client(f"sagemaker:/{REGION}")
    assert client.get_deployment(endpoint)["EndpointStatus"] == "InService"
    assert endpoint in [e["EndpointName"] for e in client.list_deployments()]
    sm = boto3.client("sagemaker", region_name=REGION)
    config = sm.describe_endpoint_config(EndpointConfigName=client.get_deployment(endpoint)["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.m5.large", 2)
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["Image"] == IMAGE_URL and model["ExecutionRoleArn"] == ROLE_ARN
    assert model["PrimaryContainer"]["ModelDataUrl"].startswith(f"s3://{bucket}/")

    answer = [{"count": 3, "confidence": 0.9, **{f"p_{c}": 0.025 for c in CLASSES}, "p_3": 0.9}]
    aws.queue_endpoint_result({"predictions": answer})
    got = deploy.invoke(endpoint, REGION, [next(tiny_model.images.glob("*.jpg")).read_bytes()])
    assert got.to_dict("records") == answer

    # nothing logs credentials: not the step's output, not its run
    assert SECRET not in p.stdout + p.stderr
    assert not [v for v in {**run.data.params, **run.data.tags}.values() if SECRET in v]

    client.delete_deployment(endpoint, config={"region_name": REGION})
    assert endpoint not in [e["EndpointName"] for e in client.list_deployments()]
    with pytest.raises(MlflowException, match="Could not find endpoint"):
        client.get_deployment(endpoint)


def test_replace_creates_a_missing_endpoint_and_updates_an_existing_one(aws, champion, bucket):  # noqa: F811
    s = settings(champion, bucket, mode="replace")
    action, info = deploy.deploy(s)  # no such endpoint yet: replace creates it
    assert (action, info["EndpointStatus"]) == ("create_deployment", "InService")

    s.mode = "create"
    with pytest.raises(ValueError, match=f"endpoint {s.endpoint} already exists in {REGION}: use mode=replace"):
        deploy.deploy(s)

    # the update path: MLflow creates a new model and endpoint config, then calls UpdateEndpoint, which moto
    # 5.2 does not implement (HTTP 500 after botocore's retries); on AWS this swaps the endpoint's config
    s.mode = "replace"
    with pytest.raises(deploy.DeployError, match=f"update_deployment of endpoint {s.endpoint} in {REGION} failed") as e:
        deploy.deploy(s)
    assert "UpdateEndpoint" in str(e.value)
    assert boto3.client("sagemaker", region_name=REGION).describe_endpoint(
        EndpointName=s.endpoint)["EndpointConfigName"] == info["EndpointConfigName"]


BAD = {
    "no role": ([], "execution_role_arn is required"),
    "malformed role ARN": (["--execution_role_arn", "arn:aws:iam::12:role/x"], "is not an IAM role ARN"),
    "a user, not a role": (["--execution_role_arn", "arn:aws:iam::123456789012:user/bob"], "is not an IAM role ARN"),
    "bad region": (["--region", "us-east"], "is not an AWS region name"),
    "no instances": (["--instance_count", "0"], "instance_count must be a whole number >= 1"),
    "bad mode": (["--mode", "upsert"], "mode must be one of ('create', 'replace')"),
    "bad instance type": (["--instance_type", "m5.large"], "is not a SageMaker instance type"),
    "bad endpoint name": (["--endpoint", "bin_counter"], "is not a SageMaker endpoint name"),
    "image elsewhere": (["--image_url", IMAGE_URL.replace(REGION, "eu-west-1")], "needs the image in the endpoint's region"),
    "image not in ECR": (["--image_url", "docker.io/library/python:3.11"], "is not an ECR image"),
    "bad bucket": (["--bucket", "Bad_Bucket"], "is not an S3 bucket name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_fail_before_any_aws_call(case, monkeypatch):
    def no_aws(*a, **k):
        raise AssertionError("AWS was called")
    monkeypatch.setattr(boto3, "client", no_aws)
    monkeypatch.setattr(deploy, "get_deploy_client", no_aws)
    extra, message = BAD[case]
    role = [] if "role" in case else ["--execution_role_arn", ROLE_ARN]
    args = deploy_step.get_args_parser().parse_args([*role, *extra])
    with pytest.raises(ValueError, match="deploy settings: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        deploy_step.main(args)
    assert not mlflow.search_runs(output_format="list")  # refused before a run was opened


def test_unparseable_numbers_and_flags_are_argument_errors():
    parser = deploy_step.get_args_parser()
    for bad in (["--instance_count", "1.5"], ["--timeout_seconds", "soon"], ["--synchronous", "maybe"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_entry_point_says_what_is_missing(aws, capsys):  # noqa: F811
    """As the entry point fails (entry.run in-process; the exit status through `mlflow run` is test_bad_input's)."""
    with pytest.raises(SystemExit) as e:
        entry.run(deploy_step.main, deploy_step.get_args_parser(), ["--image_url", IMAGE_URL])
    assert e.value.code == 1 and "execution_role_arn is required" in capsys.readouterr().err


def test_an_unreachable_sagemaker_is_a_clear_error(monkeypatch, aws, champion):  # noqa: F811
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(deploy.DeployError, match=f"cannot reach SageMaker in {REGION}"):
        deploy.deploy(settings(champion, ""))


def test_config_uses_mlflow_keys_and_a_real_bool(champion):
    cfg = settings(champion, "bc-models").config()
    mlflow_keys = SageMakerDeploymentClient(f"sagemaker:/{REGION}")._default_deployment_config()
    assert set(cfg) <= set(mlflow_keys)  # MLflow silently ignores unknown keys such as bucket_name
    assert cfg["synchronous"] is True and cfg["bucket"] == "bc-models"
    # why: MLflow reads only the bool True (or the text 'True') as synchronous
    client = SageMakerDeploymentClient(f"sagemaker:/{REGION}")
    parsed = client._default_deployment_config()
    client._apply_custom_config(parsed, {"synchronous": "true"})
    assert parsed["synchronous"] is False
    args = deploy_step.get_args_parser().parse_args(["--synchronous", "true"])
    assert args.synchronous is True
