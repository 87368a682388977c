"""Fixtures for the operations tests: a workflow table and a DICOM bucket on the shared moto_server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
import pytest

# Importing the workflow helpers puts functions/ on sys.path, as the Lambda zips do, so `common` imports.
from tests.functions.workflow import create_table, unique
from tests.support.moto import MotoServer


@dataclass
class Aws:
    s3: Any
    table: Any
    bucket: str


@pytest.fixture
def aws(aws_env: MotoServer) -> Aws:
    s3 = boto3.client("s3")
    bucket = unique("dicom")
    s3.create_bucket(Bucket=bucket)
    return Aws(s3, create_table(boto3.resource("dynamodb"), unique("imports")), bucket)
