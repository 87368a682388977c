"""Lambda function: record why a batch's import failed, on the batch and on every instance still importing, or
left without a record by a registration cut short.

The state machine's Catch rules all lead here, so that no failure ends without a trace an admin can query. A batch
StoreDICOM stored is not failed: its manifest holds every instance's outcome, recorded here as registration records
it (an error in the workflow, such as a registration cut short, changes nothing HealthImaging holds). Nor is an
instance of any other batch whose S3 object's tags say StoreDICOM stored it (common/stored_tags.py): it is recorded
imported by StoreDICOM instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from common.config import RecordSettings
from common.held_in_healthimaging import HealthImagingLookup, healthimaging_lookup
from common.job_results import imported_by_completed_job
from common.layout import LayoutError, batch_id_from_manifest_key, check_batch_id
from common.manifest import Manifest, ManifestError, iso_millis, read_manifest
from common.parallel import POOLED_CLIENT_CONFIG, in_parallel
from common.records import (
    BATCH_FAILED,
    DuplicateBatch,
    Retention,
    batch_key,
    fail_unfinished_instances,
    fail_unrecorded_instances,
    finish_stored_batch,
    record_instance_outcome,
    record_stored_by_storedicom,
    register_batch,
    register_instances,
    shorten,
    status_partition,
    update_if_condition_holds,
    utc_now,
)
from common.stored_tags import stored_by_storedicom

from batch_contract.table import ENTITY_BATCH

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_s3 import S3Client

logger = Logger(service="import-workflow")
metrics = Metrics(namespace="DICOMStoreSCP", service="import-workflow")


def failure_reason(error: Mapping[str, Any]) -> str:
    """``Error: message`` from a Catch result; a Lambda's Cause is JSON with errorMessage."""
    name = str(error.get("Error", "UnknownError"))
    cause = str(error.get("Cause", ""))
    try:
        parsed = json.loads(cause)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and "errorMessage" in parsed:
        cause = str(parsed["errorMessage"])
    return shorten(f"{name}: {cause}" if cause else name)


def batch_id_of(state: Mapping[str, Any]) -> str | None:
    """The batch id from the state (after registration) or from the triggering event's manifest key."""
    try:
        if "batchId" in state:
            return check_batch_id(str(state["batchId"]))
        return batch_id_from_manifest_key(str(state["detail"]["object"]["key"]))
    except (KeyError, TypeError, LayoutError):
        return None


def mark_batch_failed(
    table: Table, batch_id: str, execution_arn: str, reason: str, retention: Retention, now: datetime
) -> bool:
    """Fail the batch item this execution owns (or create it failed); False if another execution owns it."""
    stamp = iso_millis(now)
    values: dict[str, Any] = {
        ":failed": BATCH_FAILED,
        ":reason": reason,
        ":now": stamp,
        ":execution": execution_arn,
        ":batch": batch_id,
        ":entity": ENTITY_BATCH,
        ":gsi3pk": status_partition(ENTITY_BATCH, BATCH_FAILED),
        ":gsi3sk": f"{stamp}#{batch_id}",
    }
    sets = (
        "#status = :failed, reason = :reason, updatedAt = :now, finishedAt = :now, gsi3pk = :gsi3pk,"
        " gsi3sk = :gsi3sk, executionArn = if_not_exists(executionArn, :execution), batchId = :batch,"
        " entity = :entity"
    )
    expires = retention.expires_at(now)
    if expires is not None:
        sets += ", expiresAt = :expires"
        values[":expires"] = expires
    return update_if_condition_holds(
        table,
        Key=batch_key(batch_id),
        UpdateExpression="SET " + sets,
        ConditionExpression="attribute_not_exists(pk) OR executionArn = :execution",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues=values,
    )


def record_stored_batch(
    table: Table, manifest: Manifest, execution_arn: str, retention: Retention, now: datetime
) -> bool:
    """Record a batch StoreDICOM stored as its registration does: every instance imported (or warning), with
    StoreDICOM's answer, then the batch; False if another execution owns the batch. Each write is repeatable, and an
    instance a newer receipt holds keeps its record."""
    try:
        attempt = register_batch(table, manifest, execution_arn, now)
    except DuplicateBatch:
        return False
    register_instances(table, manifest, attempt, retention, now)
    finish_stored_batch(table, manifest, retention, now)
    return True


def _manifest_if_readable(s3: S3Client, bucket: str, batch_id: str) -> Manifest | None:
    try:
        return read_manifest(s3, bucket, batch_id)
    except (ClientError, ManifestError) as error:
        # The failure may be the manifest itself; the batch item carries the reason, there are no instances.
        logger.warning("manifest unreadable, no instance records to fail", batch_id=batch_id, error=str(error))
        return None


def record_failure(
    event: Mapping[str, Any],
    s3: S3Client,
    table: Table,
    healthimaging: HealthImagingLookup | None,
    settings: RecordSettings,
    now: datetime,
) -> dict[str, Any]:
    state = event.get("state") or {}
    execution_arn = str(event["executionArn"])
    reason = failure_reason(state.get("error") or {})
    batch_id = batch_id_of(state)
    if batch_id is None:
        logger.error("import failed before a batch could be named", reason=reason, execution=execution_arn)
        return {"batchId": None, "reason": reason, "instancesFailed": 0, "batchFailed": True}
    retention = Retention(settings.retention_days)
    manifest = _manifest_if_readable(s3, settings.dicom_bucket, batch_id)
    if manifest is not None and manifest.stored_by_storedicom:
        if record_stored_batch(table, manifest, execution_arn, retention, now):
            logger.warning(
                "workflow failed on a batch StoreDICOM stored: recorded imported", batch_id=batch_id, reason=reason
            )
        else:
            logger.warning("batch owned by another execution; left as it is", batch_id=batch_id, reason=reason)
        return {"batchId": batch_id, "reason": reason, "instancesFailed": 0, "batchFailed": False}
    if not mark_batch_failed(table, batch_id, execution_arn, reason, retention, now):
        logger.warning("batch owned by another execution; left as it is", batch_id=batch_id, reason=reason)
        return {"batchId": batch_id, "reason": reason, "instancesFailed": 0, "batchFailed": True}
    failed = 0
    if manifest is not None:
        # First what HealthImaging holds, so that the failures below find those records final and leave them:
        # what the batch's completed job imported (its output), then of the rest what StoreDICOM stored (or,
        # forwarding on, HealthImaging says it holds). A read or a HealthImaging call that fails leaves those
        # instances failed: this is the last step of the workflow, nothing retries it.
        by_job = imported_by_completed_job(s3, manifest, state)
        imported_keys: set[str] = set()
        if by_job is not None:
            imported_keys = {o.key for o in by_job.outcomes}
            recorded = sum(
                in_parallel(
                    lambda o: record_instance_outcome(table, batch_id, by_job.job_id, o, retention, now),
                    by_job.outcomes,
                )
            )
            logger.warning(
                "workflow failed after the import job completed; what it imported recorded imported",
                batch_id=batch_id,
                job_id=by_job.job_id,
                instances=recorded,
            )
        doubtful = [entry for entry in manifest.objects if entry.key not in imported_keys]
        stored = stored_by_storedicom(s3, manifest.bucket, doubtful, healthimaging, retry_on_error=False, now=now)
        attempt = 2 if manifest.requeued_from else 1
        if record_stored_by_storedicom(table, manifest, stored, attempt, retention, now):
            logger.warning(
                "workflow failed; instances StoreDICOM stored recorded imported",
                batch_id=batch_id,
                instances=len(stored),
            )
        failed = fail_unfinished_instances(table, manifest, reason, retention, now)
        failed += fail_unrecorded_instances(table, manifest, reason, retention, now)
    logger.error("batch failed", batch_id=batch_id, reason=reason, instances_failed=failed)
    return {"batchId": batch_id, "reason": reason, "instancesFailed": failed, "batchFailed": True}


SETTINGS = RecordSettings.from_env(os.environ)
S3 = boto3.client("s3", config=POOLED_CLIENT_CONFIG)
TABLE = boto3.resource("dynamodb", config=POOLED_CLIENT_CONFIG).Table(SETTINGS.table_name)
HEALTHIMAGING = healthimaging_lookup(SETTINGS.forwarding_datastore_id)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    result = record_failure(event, S3, TABLE, HEALTHIMAGING, SETTINGS, utc_now())
    metrics.add_metric(name="InstancesFailed", unit=MetricUnit.Count, value=result["instancesFailed"])
    metrics.add_metric(name="BatchesFailed", unit=MetricUnit.Count, value=int(result["batchFailed"]))
    return result
