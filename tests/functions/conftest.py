"""Fixtures for the Lambda tests: S3 buckets and the workflow table on the shared moto_server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from tests.functions.workflow import DATASTORE_ID, ROLE_ARN, create_table, unique
from tests.support.moto import MotoServer


@dataclass
class Aws:
    s3: Any
    dynamodb: Any
    table: Any
    dicom_bucket: str
    results_bucket: str

    def env(self, **extra: str) -> dict[str, str]:
        """Every variable any of the workflow's functions reads, with this test's names."""
        return {
            "TABLE_NAME": self.table.name,
            "DICOM_BUCKET": self.dicom_bucket,
            "RESULTS_BUCKET": self.results_bucket,
            "DATASTORE_ID": DATASTORE_ID,
            "DATA_ACCESS_ROLE_ARN": ROLE_ARN,
            "POWERTOOLS_METRICS_NAMESPACE": "DICOMStoreSCP",
            **extra,
        }


@pytest.fixture
def aws(aws_env: MotoServer) -> Aws:
    s3 = boto3.client("s3")
    dynamodb = boto3.resource("dynamodb")
    dicom_bucket, results_bucket = unique("dicom"), unique("results")
    s3.create_bucket(Bucket=dicom_bucket)
    s3.create_bucket(Bucket=results_bucket)
    return Aws(s3, dynamodb, create_table(dynamodb, unique("imports")), dicom_bucket, results_bucket)
