"""A rehearsal of `make publish` against moto_server: in each HealthImaging Region, every artifact the template
reads (the Lambda packages and the state machine definition) exists at the bucket and key the template computes
with its defaults."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import boto3
import pytest

from tests.support.moto import CREDENTIALS, moto_server
from tests.templates import cfn
from tests.templates.cfn import ROOT

pytestmark = pytest.mark.integration


def _artifact_locations(template: dict[str, Any], region: str) -> set[tuple[str, str]]:
    """(bucket, key) of every artifact the stack reads in ``region`` with the default parameters."""
    resolver = cfn.Resolver(template, cfn.parameter_values(template), region)
    resources = resolver.resources()
    prefix = resolver.parameters["ArtifactKeyPrefix"]
    locations = set()
    for resource in resources.values():
        if resource["Type"] == "AWS::Lambda::Function":
            code = resource["Properties"]["Code"]
            text, names = code["S3Key"]["Fn::Sub"]
            locations.add((code["S3Bucket"], text.replace("${ArtifactKeyPrefix}", prefix).replace(
                "${Package}", names["Package"])))  # fmt: skip
        if resource["Type"] == "AWS::StepFunctions::StateMachine":
            location = resource["Properties"]["DefinitionS3Location"]
            locations.add((location["Bucket"], location["Key"]))
    for bucket, key in locations:
        assert isinstance(bucket, str) and isinstance(key, str) and "${" not in key, (bucket, key)
    return locations


def _client(region: str, endpoint: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    ).client("s3", region_name=region, endpoint_url=endpoint)


def test_make_publish_puts_every_artifact_where_the_template_reads_it(template: dict[str, Any]) -> None:
    base = template["Parameters"]["ArtifactBucketName"]["Default"]
    with moto_server() as server:
        environment = {**os.environ, **server.env()}
        for region in cfn.HEALTHIMAGING_REGIONS:
            s3 = _client(region, server.endpoint)
            arguments = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            s3.create_bucket(Bucket=f"{base}-{region}", **arguments)
        published = subprocess.run(
            ["make", "--no-print-directory", "publish"], cwd=ROOT, env=environment, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert published.returncode == 0, published.stdout[-2000:] + published.stderr[-2000:]
        for region in cfn.HEALTHIMAGING_REGIONS:
            s3 = _client(region, server.endpoint)
            locations = _artifact_locations(template, region)
            assert len(locations) == len(list((ROOT / "functions").glob("*/app.py"))) + 1
            for bucket, key in sorted(locations):
                assert bucket == f"{base}-{region}"
                head = s3.head_object(Bucket=bucket, Key=key)
                assert head["ContentLength"] > 0, (bucket, key)
            stored = {item["Key"] for item in s3.list_objects_v2(Bucket=f"{base}-{region}")["Contents"]}
            assert not {key for key in stored if "/lint/" in key}, "lint output is not an artifact"
