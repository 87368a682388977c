"""Lambda function: report a batch's import job status (GetDICOMImportJob) to the state machine's poll.

It also paces the poll (the wait before the next check) and, past IMPORT_TIMEOUT_HOURS, records the job stuck.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from common.config import EnvironmentReader
from common.healthimaging import CLIENT_CONFIG, named_errors
from common.layout import check_batch_id
from common.manifest import iso_millis, parse_iso, read_manifest
from common.parallel import POOLED_CLIENT_CONFIG
from common.records import mark_stuck, record_job_status, utc_now

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_medical_imaging import HealthImagingClient
    from mypy_boto3_s3 import S3Client

logger = Logger(service="import-workflow")

FINISHED = ("COMPLETED", "FAILED")
# Before the timeout the wait grows with the job's age (a tenth of it, so a result is seen at most ~10 % late)
# up to 15 minutes; a stuck job is looked at hourly; after STUCK_POLL_LIMIT more the execution gives up. Each
# poll costs 9 of the 25,000 history events a Standard execution may have: even IMPORT_TIMEOUT_HOURS=168 with
# POLL_INTERVAL_SECONDS=1 stays under 1,000 polls (tests/statemachine/test_import_execution.py counts them).
GROWTH_DIVISOR = 10
MAX_WAIT_SECONDS = 900
STUCK_WAIT_SECONDS = 3600
STUCK_POLL_LIMIT = timedelta(days=7)


class ImportJobStuck(Exception):
    """The job is still unfinished a week after it was declared stuck: the batch is failed with the job id."""


@dataclass(frozen=True)
class Settings:
    table_name: str
    dicom_bucket: str
    import_timeout_hours: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        reader = EnvironmentReader(environ)
        settings = cls(
            table_name=reader.text("TABLE_NAME"),
            dicom_bucket=reader.text("DICOM_BUCKET"),
            import_timeout_hours=reader.integer("IMPORT_TIMEOUT_HOURS", 24, 1, 168),
        )
        reader.finish()
        return settings


def next_wait_seconds(age: timedelta, poll_interval_seconds: int, stuck: bool) -> int:
    """How long to wait before the next check of a job this old; bounded so the loop fits the event budget."""
    if stuck:
        return max(poll_interval_seconds, STUCK_WAIT_SECONDS)
    grown = min(age.total_seconds() / GROWTH_DIVISOR, MAX_WAIT_SECONDS)
    return max(poll_interval_seconds, int(grown))


def job_started_at(job: Mapping[str, Any]) -> datetime:
    """The start response's submittedAt; the execution's start time if that is absent.

    GetDICOMImportJob's submittedAt is optional in the API model, so it is never relied on.
    """
    submitted = job.get("submittedAt")
    return parse_iso(str(submitted if submitted else job["executionStartedAt"]))


def check_import(
    job: Mapping[str, Any],
    medical_imaging: HealthImagingClient,
    s3: S3Client,
    table: Table,
    settings: Settings,
    now: datetime,
) -> dict[str, Any]:
    batch_id = check_batch_id(str(job["batchId"]))
    with named_errors():
        properties = medical_imaging.get_dicom_import_job(datastoreId=str(job["datastoreId"]), jobId=str(job["jobId"]))[
            "jobProperties"
        ]
    status = properties["jobStatus"]
    record_job_status(table, batch_id, properties["jobId"], status, now)
    age = now - job_started_at(job)
    deadline = timedelta(hours=settings.import_timeout_hours)
    stuck = status not in FINISHED and age > deadline
    if stuck and age > deadline + STUCK_POLL_LIMIT:
        raise ImportJobStuck(
            f"import job {properties['jobId']} still {status} {age.days} days after it was submitted"
            f" (stuck since {settings.import_timeout_hours} h); look the job up in HealthImaging"
        )
    if stuck:
        reason = (
            f"import job {properties['jobId']} still {status} after {settings.import_timeout_hours} h;"
            " HealthImaging may still finish it, the workflow keeps checking hourly"
        )
        marked = mark_stuck(table, read_manifest(s3, settings.dicom_bucket, batch_id), properties["jobId"], reason, now)
        logger.warning("import job stuck", batch_id=batch_id, job_id=properties["jobId"], instances=marked)
    ended = properties.get("endedAt")
    wait = next_wait_seconds(age, int(job.get("pollIntervalSeconds") or 1), stuck)
    logger.info(
        "import job status", batch_id=batch_id, job_id=properties["jobId"], job_status=status, wait_seconds=wait
    )
    return {
        "jobStatus": status,
        "endedAt": iso_millis(ended) if ended else None,
        "message": properties.get("message"),
        "stuck": stuck,
        "waitSeconds": wait,
    }


SETTINGS = Settings.from_env(os.environ)
MEDICAL_IMAGING = boto3.client("medical-imaging", config=CLIENT_CONFIG)
S3 = boto3.client("s3")
TABLE = boto3.resource("dynamodb", config=POOLED_CLIENT_CONFIG).Table(SETTINGS.table_name)


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return check_import(event, MEDICAL_IMAGING, S3, TABLE, SETTINGS, utc_now())
