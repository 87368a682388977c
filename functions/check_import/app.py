"""Lambda function: report a batch's import job status (GetDICOMImportJob) to the state machine's poll."""

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
from common.manifest import iso_millis
from common.records import record_job_status, utc_now

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_medical_imaging import HealthImagingClient

logger = Logger(service="import-workflow")

FINISHED = ("COMPLETED", "FAILED")


class ImportJobStuck(Exception):
    """The job has not finished within IMPORT_TIMEOUT_HOURS; the batch is marked failed for a human."""


@dataclass(frozen=True)
class Settings:
    table_name: str
    import_timeout_hours: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        reader = EnvironmentReader(environ)
        settings = cls(
            table_name=reader.text("TABLE_NAME"),
            import_timeout_hours=reader.integer("IMPORT_TIMEOUT_HOURS", 24, 1, 168),
        )
        reader.finish()
        return settings


def check_import(
    job: Mapping[str, Any],
    medical_imaging: HealthImagingClient,
    table: Table,
    settings: Settings,
    now: datetime,
) -> dict[str, Any]:
    batch_id = check_batch_id(str(job["batchId"]))
    with named_errors():
        properties = medical_imaging.get_dicom_import_job(
            datastoreId=str(job["datastoreId"]), jobId=str(job["jobId"])
        )["jobProperties"]
    status = properties["jobStatus"]
    record_job_status(table, batch_id, properties["jobId"], status, now)
    submitted = properties.get("submittedAt")
    if (
        status not in FINISHED
        and submitted
        and now - submitted > timedelta(hours=settings.import_timeout_hours)
    ):
        raise ImportJobStuck(
            f"import job {properties['jobId']} still {status} after {settings.import_timeout_hours} h"
        )
    ended = properties.get("endedAt")
    logger.info("import job status", batch_id=batch_id, job_id=properties["jobId"], job_status=status)
    return {
        "jobStatus": status,
        "submittedAt": iso_millis(submitted) if submitted else None,
        "endedAt": iso_millis(ended) if ended else None,
        "message": properties.get("message"),
    }


SETTINGS = Settings.from_env(os.environ)
MEDICAL_IMAGING = boto3.client("medical-imaging", config=CLIENT_CONFIG)
TABLE = boto3.resource("dynamodb").Table(SETTINGS.table_name)


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return check_import(event, MEDICAL_IMAGING, TABLE, SETTINGS, utc_now())
