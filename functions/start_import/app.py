"""Lambda function: start the HealthImaging import job of a registered batch (idempotent by client token)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from common.config import EnvironmentReader
from common.healthimaging import CLIENT_CONFIG, client_token, named_errors
from common.layout import check_batch_id, results_prefix
from common.manifest import iso_millis, parse_iso
from common.records import record_job_started, utc_now

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_medical_imaging import HealthImagingClient

logger = Logger(service="import-workflow")
metrics = Metrics(namespace="DICOMStoreSCP", service="import-workflow")


@dataclass(frozen=True)
class Settings:
    table_name: str
    datastore_id: str
    data_access_role_arn: str
    results_bucket: str
    poll_interval_seconds: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        reader = EnvironmentReader(environ)
        settings = cls(
            table_name=reader.text("TABLE_NAME"),
            datastore_id=reader.text("DATASTORE_ID", r"[0-9a-z]{32}"),
            data_access_role_arn=reader.text(
                "DATA_ACCESS_ROLE_ARN", r"arn:aws[a-z-]*:iam::[0-9]{12}:role/.+"
            ),
            results_bucket=reader.text("RESULTS_BUCKET"),
            poll_interval_seconds=reader.integer("POLL_INTERVAL_SECONDS", 60, 1, 3600),
        )
        reader.finish()
        return settings


@dataclass(frozen=True)
class StartedJob:
    output: dict[str, Any]
    batch_age_seconds: float


def start_import(
    batch: Mapping[str, Any],
    medical_imaging: HealthImagingClient,
    table: Table,
    settings: Settings,
    now: datetime,
) -> StartedJob:
    """Start (or, for a repeated call, find again through the client token) the batch's import job."""
    batch_id = check_batch_id(str(batch["batchId"]))
    output_uri = f"s3://{settings.results_bucket}/{results_prefix(batch_id)}"
    with named_errors():
        job = medical_imaging.start_dicom_import_job(
            jobName=batch_id,
            datastoreId=settings.datastore_id,
            dataAccessRoleArn=settings.data_access_role_arn,
            clientToken=client_token(batch_id, str(batch["executionArn"])),
            inputS3Uri=f"s3://{batch['bucket']}/{batch['prefix']}",
            outputS3Uri=output_uri,
        )
    age = max(0.0, (now - parse_iso(str(batch["firstReceivedAt"]))).total_seconds())
    record_job_started(table, batch_id, dict(job), output_uri, age, now)
    logger.info("import job started", batch_id=batch_id, job_id=job["jobId"], batch_age_seconds=age)
    return StartedJob(
        output={
            "jobId": job["jobId"],
            "datastoreId": job["datastoreId"],
            "jobStatus": job["jobStatus"],
            "submittedAt": iso_millis(job["submittedAt"]),
            "outputS3Uri": output_uri,
            "pollIntervalSeconds": settings.poll_interval_seconds,
        },
        batch_age_seconds=age,
    )


SETTINGS = Settings.from_env(os.environ)
MEDICAL_IMAGING = boto3.client("medical-imaging", config=CLIENT_CONFIG)
TABLE = boto3.resource("dynamodb").Table(SETTINGS.table_name)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    started = start_import(event, MEDICAL_IMAGING, TABLE, SETTINGS, utc_now())
    metrics.add_metric(name="ImportsStarted", unit=MetricUnit.Count, value=1)
    metrics.add_metric(
        name="BatchAgeAtImportSeconds", unit=MetricUnit.Seconds, value=started.batch_age_seconds
    )
    return started.output
