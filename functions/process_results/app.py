"""Lambda function: read a finished import job's output and record the fate of every instance of its batch
(common/job_results.py)."""

from __future__ import annotations

import os
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from common.config import RecordSettings
from common.held_in_healthimaging import healthimaging_lookup
from common.job_results import record_results
from common.parallel import POOLED_CLIENT_CONFIG
from common.records import (
    FAILED,
    IMPORTED,
    NON_PRIMARY,
    REQUEUED,
    UNCONFIRMED,
    WARNING,
    Retention,
    utc_now,
)

logger = Logger(service="import-workflow")
metrics = Metrics(namespace="DICOMStoreSCP", service="import-workflow")


SETTINGS = RecordSettings.from_env(os.environ)
RETENTION = Retention(SETTINGS.retention_days)
S3 = boto3.client("s3", config=POOLED_CLIENT_CONFIG)
TABLE = boto3.resource("dynamodb", config=POOLED_CLIENT_CONFIG).Table(SETTINGS.table_name)
HEALTHIMAGING = healthimaging_lookup(SETTINGS.forwarding_datastore_id)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    results = record_results(event, S3, TABLE, SETTINGS.dicom_bucket, HEALTHIMAGING, RETENTION, utc_now())
    counts = results.counts
    metrics.add_metric(
        name="InstancesImported", unit=MetricUnit.Count, value=counts[IMPORTED] + counts[WARNING]
    )
    metrics.add_metric(name="InstancesFailed", unit=MetricUnit.Count, value=counts[FAILED])
    metrics.add_metric(name="InstancesWarning", unit=MetricUnit.Count, value=counts[WARNING])
    metrics.add_metric(name="InstancesNonPrimary", unit=MetricUnit.Count, value=counts[NON_PRIMARY])
    metrics.add_metric(name="InstancesRequeued", unit=MetricUnit.Count, value=counts[REQUEUED])
    metrics.add_metric(name="InstancesUnconfirmed", unit=MetricUnit.Count, value=counts[UNCONFIRMED])
    if results.duration_seconds is not None:
        metrics.add_metric(
            name="ImportJobDurationSeconds", unit=MetricUnit.Seconds, value=results.duration_seconds
        )
    return results.to_json()
