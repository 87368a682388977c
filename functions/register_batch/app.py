"""Lambda function: read a closed batch's manifest; register the batch and its instances, once per batch.

A batch StoreDICOM stored (every manifest entry carries its answer) is recorded imported here, and the state
machine ends without an import job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from common.config import RecordSettings
from common.layout import batch_id_from_manifest_key
from common.manifest import ManifestError, read_manifest
from common.parallel import POOLED_CLIENT_CONFIG
from common.records import (
    DuplicateBatch,
    Retention,
    finish_stored_batch,
    register_batch,
    register_instances,
    utc_now,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_s3 import S3Client

logger = Logger(service="import-workflow")


def register(
    event: Mapping[str, Any], s3: S3Client, table: Table, settings: RecordSettings, now: datetime
) -> dict[str, Any]:
    """Register the batch the manifest key names; another execution for the same batch gets duplicate=True."""
    bucket, key, execution = str(event["bucket"]), str(event["key"]), str(event["executionArn"])
    if bucket != settings.dicom_bucket:
        raise ManifestError(f"manifest in bucket {bucket!r}, expected {settings.dicom_bucket!r}")
    batch_id = batch_id_from_manifest_key(key)
    manifest = read_manifest(s3, bucket, batch_id)
    try:
        attempt = register_batch(table, manifest, execution, now)
    except DuplicateBatch as duplicate:
        logger.warning(
            "duplicate trigger, batch already registered", batch_id=batch_id, owner=duplicate.owner
        )
        return {"batchId": batch_id, "duplicate": True, "owner": duplicate.owner}
    retention = Retention(settings.retention_days)
    taken = register_instances(table, manifest, attempt, retention, now)
    if taken < len(manifest.objects):
        # The modality sent these instances again later; the newer receipt keeps their records.
        logger.info("instances held by a newer receipt", batch_id=batch_id, skipped=len(manifest.objects) - taken)
    if manifest.stored_by_storedicom:
        # After the instances: a task cut short here leaves the batch registered, and its retry finishes it.
        counts = finish_stored_batch(table, manifest, retention, now)
        logger.info("batch stored by StoreDICOM, no import job", batch_id=batch_id, counts=counts)
    else:
        logger.info("batch registered", batch_id=batch_id, objects=len(manifest.objects), attempt=attempt)
    return {
        "batchId": batch_id,
        "duplicate": False,
        "storedByStoreDICOM": manifest.stored_by_storedicom,
        "bucket": bucket,
        "prefix": manifest.prefix,
        "attempt": attempt,
        "objectCount": len(manifest.objects),
        "firstReceivedAt": manifest.first_received_at,
    }


SETTINGS = RecordSettings.from_env(os.environ)
S3 = boto3.client("s3")
TABLE = boto3.resource("dynamodb", config=POOLED_CLIENT_CONFIG).Table(SETTINGS.table_name)


@logger.inject_lambda_context
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return register(event, S3, TABLE, SETTINGS, utc_now())
