"""deploy: put a registered model on a SageMaker endpoint through MLflow's SageMaker deployment client.

Reads: `model_uri` (default `models:/bin-counter@champion`); AWS credentials from the usual boto3 chain (never
logged); `AWS_ENDPOINT_URL` is honoured (tests use a moto server).
Logs: the parameters, tags `bincounter.endpoint_arn`, `bincounter.endpoint_status`,
`bincounter.endpoint_config` and `bincounter.deploy_action` (create_deployment | update_deployment).
Settings are checked before any AWS call; see bincounter/deploy.py and docs/deploy.md.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a script (spark-submit steps/score.py): import from the checkout's root,
    import os, sys  # not from steps/, whose modules would shadow others' (select.py: the standard library's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
from dataclasses import fields

import mlflow

from bincounter import entry
from bincounter.deploy import Settings, deploy
from bincounter.runs import start_step
from steps.options import str2bool, whole


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_uri", default="models:/bin-counter@champion", help="any MLflow model URI")
    p.add_argument("--endpoint", default="bin-counter", help="SageMaker endpoint name")
    p.add_argument("--region", default="us-east-1", help="AWS region of the endpoint and the image")
    p.add_argument("--execution_role_arn", default="", help="IAM role SageMaker runs the model as (required)")
    p.add_argument("--image_url", default="", help="ECR image from `mlflow sagemaker build-and-push-container`; "
                                                   "empty: MLflow's default mlflow-pyfunc image")
    p.add_argument("--bucket", default="", help="S3 bucket for the model archive; empty: MLflow's default bucket")
    p.add_argument("--instance_type", default="ml.m5.large", help="endpoint instance type")
    p.add_argument("--instance_count", type=whole, default=1, help="endpoint instances")
    p.add_argument("--synchronous", type=str2bool, default=True, help="wait until the endpoint is InService")
    p.add_argument("--timeout_seconds", type=whole, default=1200, help="how long to wait")
    p.add_argument("--mode", default="create", help="create (fails if the endpoint exists) or replace")
    return p


def main(args: argparse.Namespace) -> str:
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)}).validate()
    with start_step("deploy", vars(args)) as run:
        action, info = deploy(settings)
        mlflow.set_tags({"bincounter.deploy_action": action,"bincounter.endpoint_arn": info["EndpointArn"],
                         "bincounter.endpoint_status": info["EndpointStatus"],
                         "bincounter.endpoint_config": info.get("EndpointConfigName", "")})
        print(f"deploy: endpoint {info['EndpointName']} is {info['EndpointStatus']} ({info['EndpointArn']})")
        return run.info.run_id


if __name__ == "__main__":
    entry.run(main, get_args_parser())
