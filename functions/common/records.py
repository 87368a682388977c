"""The workflow's DynamoDB table: an item per instance, per batch, per import job (docs/import-workflow.rst).

Keys, index names and status words are the batch contract's (batch_contract/table.py), so that the status
command reads the layout these writers write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.table import (
    BATCH_FAILED,
    BATCH_IMPORTED,
    BATCH_IMPORTING,
    BATCH_PARTIAL,
    BATCH_REGISTERED,
    BATCH_STUCK,
    BATCH_UNCONFIRMED,
    BY_BATCH_INDEX,
    BY_CALLING_AE_INDEX,
    BY_STATUS_INDEX,
    ENTITY_BATCH,
    ENTITY_INSTANCE,
    ENTITY_JOB,
    FAILED,
    IMPORTED,
    IMPORTING,
    NON_PRIMARY,
    REQUEUED,
    STORED_BY_STOREDICOM,
    STUCK,
    UNCONFIRMED,
    WARNING,
    batch_key,
    by_batch_keys,
    calling_ae_partition,
    instance_key,
    instance_sort,
    job_key,
    job_sort,
    received_sort,
    status_partition,
)
from batch_contract.timestamps import iso_millis, parse_iso
from common.manifest import Manifest, ManifestObject
from common.parallel import in_parallel

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

__all__ = [
    "BATCH_FAILED",
    "BATCH_IMPORTED",
    "BATCH_IMPORTING",
    "BATCH_PARTIAL",
    "BATCH_REGISTERED",
    "BATCH_STUCK",
    "BATCH_UNCONFIRMED",
    "BY_BATCH_INDEX",
    "BY_CALLING_AE_INDEX",
    "BY_STATUS_INDEX",
    "ENTITY_BATCH",
    "FAILED",
    "IMPORTED",
    "IMPORTING",
    "NON_PRIMARY",
    "REQUEUED",
    "STORED_BY_STOREDICOM",
    "STUCK",
    "UNCONFIRMED",
    "WARNING",
    "DuplicateBatch",
    "InstanceOutcome",
    "Retention",
    "batch_key",
    "claim_recheck",
    "count_by_status",
    "end_recheck",
    "fail_unfinished_instances",
    "fail_unrecorded_instances",
    "finish_batch",
    "finish_job",
    "finish_stored_batch",
    "instance_key",
    "job_key",
    "mark_stuck",
    "put_if_condition_holds",
    "receipt_time",
    "record_instance_outcome",
    "record_job_started",
    "record_job_status",
    "record_stored_by_storedicom",
    "register_batch",
    "register_instances",
    "shorten",
    "status_partition",
    "update_if_condition_holds",
    "utc_now",
]

_REASON_LIMIT = 1000


def utc_now() -> datetime:
    return datetime.now(UTC)


def shorten(reason: str) -> str:
    return reason if len(reason) <= _REASON_LIMIT else reason[: _REASON_LIMIT - 1] + "…"


@dataclass(frozen=True)
class Retention:
    """How long final records stay; 0 days keeps them for ever (no TTL attribute)."""

    days: int

    def expires_at(self, now: datetime) -> int | None:
        return int((now + timedelta(days=self.days)).timestamp()) if self.days > 0 else None


class DuplicateBatch(Exception):
    """Another execution has already registered this batch."""

    def __init__(self, batch_id: str, owner: str) -> None:
        super().__init__(f"batch {batch_id} is already registered by {owner}")
        self.owner = owner


def register_batch(table: Table, manifest: Manifest, execution_arn: str, now: datetime) -> int:
    """Create the batch item unless another execution owns it; returns the attempt (1, or 2 if re-queued).

    The same execution may register again (a retried task after a lost response), so the condition lets the
    owner through.
    """
    attempt = 2 if manifest.requeued_from else 1
    stamp = iso_millis(now)
    item: dict[str, Any] = {
        **batch_key(manifest.batch_id),
        "entity": ENTITY_BATCH,
        "batchId": manifest.batch_id,
        "bucket": manifest.bucket,
        "prefix": manifest.prefix,
        "closedBy": manifest.closed_by,
        "closedAt": manifest.closed_at,
        "firstReceivedAt": manifest.first_received_at,
        "lastReceivedAt": manifest.last_received_at,
        "objectCount": len(manifest.objects),
        "byteCount": manifest.byte_count,
        "studyInstanceUids": sorted({item.study_instance_uid for item in manifest.objects}),
        "callingAETitles": list(manifest.calling_ae_titles),
        "status": BATCH_REGISTERED,
        "attempt": attempt,
        "executionArn": execution_arn,
        "registeredAt": stamp,
        "updatedAt": stamp,
        "gsi3pk": status_partition(ENTITY_BATCH, BATCH_REGISTERED),
        "gsi3sk": f"{stamp}#{manifest.batch_id}",
    }
    if manifest.requeued_from:
        item["requeuedFrom"] = manifest.requeued_from
    if manifest.stored_by_storedicom:
        item["storedBy"] = STORED_BY_STOREDICOM
    # A batch split by StoreDICOM forwarding: the stored part names its fallback batch, the fallback names it back.
    if manifest.fallback_batch_id:
        item["fallbackBatchId"] = manifest.fallback_batch_id
    if manifest.fallback_from:
        item["fallbackFrom"] = manifest.fallback_from
    try:
        table.put_item(
            Item=item,
            ConditionExpression="attribute_not_exists(pk) OR executionArn = :execution",
            ExpressionAttributeValues={":execution": execution_arn},
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        existing = table.get_item(Key=batch_key(manifest.batch_id), ConsistentRead=True).get("Item", {})
        raise DuplicateBatch(manifest.batch_id, str(existing.get("executionArn", "another execution"))) from error
    return attempt


def _instance_item(
    manifest: Manifest, entry: ManifestObject, attempt: int, stamp: str, expires: int | None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        **instance_key(entry.study_instance_uid, entry.series_instance_uid, entry.sop_instance_uid),
        "entity": ENTITY_INSTANCE,
        "sopInstanceUid": entry.sop_instance_uid,
        "studyInstanceUid": entry.study_instance_uid,
        "seriesInstanceUid": entry.series_instance_uid,
        "bucket": manifest.bucket,
        "key": entry.key,
        "bytes": entry.size,
        "batchId": manifest.batch_id,
        "attempt": attempt,
        "status": IMPORTING,
        "updatedAt": stamp,
        **by_batch_keys(manifest.batch_id, instance_sort(entry.sop_instance_uid)),
        "gsi3pk": status_partition(ENTITY_INSTANCE, IMPORTING),
        "gsi3sk": f"{entry.received_at or manifest.last_received_at}#{entry.sop_instance_uid}",
    }
    if entry.sop_class_uid:
        item["sopClassUid"] = entry.sop_class_uid
    if entry.received_at:
        item["receivedAt"] = entry.received_at
    if entry.calling_ae_title:
        item["callingAETitle"] = entry.calling_ae_title
        item["gsi2pk"] = calling_ae_partition(entry.calling_ae_title)
        item["gsi2sk"] = received_sort(entry.received_at or manifest.last_received_at, entry.sop_instance_uid)
    stored = entry.stored_by_storedicom
    if stored is not None:
        # In HealthImaging already: the final record now, as process_results would write it for an import job.
        item["status"] = WARNING if stored.warning else IMPORTED
        item["storedBy"] = stored.stored_by
        item["storedAt"] = _stored_time(manifest, stored.stored_at)
        if stored.image_set_id:
            item["imageSetId"] = stored.image_set_id
        if stored.is_primary is not None:
            item["isPrimary"] = stored.is_primary
        if stored.warning:
            item["reason"] = shorten(stored.warning)
        if stored.warning or stored.is_primary is False:
            # Left in the ByStatus index for attention, as record_instance_outcome leaves them after a job.
            attention = NON_PRIMARY if stored.is_primary is False else WARNING
            item["gsi3pk"] = status_partition(ENTITY_INSTANCE, attention)
            item["gsi3sk"] = f"{stamp}#{entry.sop_instance_uid}"
        else:
            del item["gsi3pk"], item["gsi3sk"]  # imported instances leave the ByStatus index, as after a job
        if expires is not None:
            item["expiresAt"] = expires
    return item


def _stored_time(manifest: Manifest, text: str) -> str:
    """StoreDICOM's time in the table's format, so that it compares with receipt times as a string.

    One that is not a timestamp becomes the batch's closing time, which came after it: the instance is still
    recorded as StoreDICOM stored it, rather than failing the registration and leaving it with no record.
    """
    try:
        return iso_millis(parse_iso(text))
    except ValueError:
        return iso_millis(parse_iso(manifest.closed_at))


def receipt_time(manifest: Manifest, entry: ManifestObject) -> str:
    """When this copy of the instance was received; the batch's newest receipt if the manifest does not say."""
    return entry.received_at or manifest.last_received_at


def register_instances(table: Table, manifest: Manifest, attempt: int, retention: Retention, now: datetime) -> int:
    """One item per instance, status importing, unless a newer receipt of the instance holds it; returns how
    many this batch took. The instances of a batch StoreDICOM stored get their final record at once (imported,
    or warning), with the image set id StoreDICOM gave and the ``retention`` of final records.

    Only a newer copy wins (ISO 8601 strings compare in time order): a copy counts from its receipt
    (``receiptAt``), or, once StoreDICOM stored it, from that moment (``storedAt``). So a batch sealed late by the
    sweeper never takes over an instance recorded by a batch the modality sent later, and another batch holding
    the same received copy (one the sweeper sealed from the listing after a daemon died while closing its batch,
    whose receipt is S3's LastModified), imported a second time, never turns the record of an instance StoreDICOM
    stored into an import job's outcome.
    The same batch may register again (a retried task), and a re-queue batch takes over the instances of the
    batch it came from.
    """
    return _register_entries(table, manifest, manifest.objects, attempt, retention, now)


def record_stored_by_storedicom(
    table: Table,
    manifest: Manifest,
    stored: Mapping[str, StoredByStoreDICOM],
    attempt: int,
    retention: Retention,
    now: datetime,
) -> int:
    """Record the instances of ``manifest`` that StoreDICOM stored (``stored``, its answer by key, read from their
    objects' tags, or found by asking HealthImaging) as registration records a batch StoreDICOM stored: imported
    or warning, ``storedBy`` (StoreDICOM, or the HealthImaging search), its image set id, under the same rule
    (only a newer receipt wins). For the instances an import job or a failed workflow would otherwise record
    failed; returns how many were written."""
    entries = [
        replace(entry, stored_by_storedicom=stored[entry.key]) for entry in manifest.objects if entry.key in stored
    ]
    return _register_entries(table, manifest, entries, attempt, retention, now)


def _register_entries(
    table: Table,
    manifest: Manifest,
    entries: Sequence[ManifestObject],
    attempt: int,
    retention: Retention,
    now: datetime,
) -> int:
    stamp = iso_millis(now)
    expires = retention.expires_at(now)

    def register_one(entry: ManifestObject) -> bool:
        item = _instance_item(manifest, entry, attempt, stamp, expires)
        item["receiptAt"] = receipt_time(manifest, entry)
        condition = (
            "attribute_not_exists(pk) OR batchId = :batch OR ((attribute_not_exists(receiptAt)"
            " OR receiptAt < :since) AND (attribute_not_exists(storedAt) OR storedAt < :since))"
        )
        values: dict[str, Any] = {":batch": manifest.batch_id, ":since": item.get("storedAt", item["receiptAt"])}
        if manifest.requeued_from:
            condition += " OR batchId = :from"
            values[":from"] = manifest.requeued_from
        return put_if_condition_holds(
            table, Item=item, ConditionExpression=condition, ExpressionAttributeValues=values
        )

    return sum(in_parallel(register_one, entries))


def record_job_started(
    table: Table, batch_id: str, job: dict[str, Any], output_uri: str, batch_age_seconds: float, now: datetime
) -> None:
    stamp = iso_millis(now)
    table.put_item(
        Item={
            **job_key(batch_id, job["jobId"]),
            "entity": ENTITY_JOB,
            "batchId": batch_id,
            "jobId": job["jobId"],
            "datastoreId": job["datastoreId"],
            "jobStatus": job["jobStatus"],
            "submittedAt": iso_millis(job["submittedAt"]),
            "outputS3Uri": output_uri,
            "updatedAt": stamp,
            **by_batch_keys(batch_id, job_sort(job["jobId"])),
        }
    )
    table.update_item(
        Key=batch_key(batch_id),
        UpdateExpression=(
            "SET #status = :status, jobId = :job, importStartedAt = :now, updatedAt = :now,"
            " batchAgeAtImportSeconds = :age, gsi3pk = :gsi3pk"
        ),
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues={
            ":status": BATCH_IMPORTING,
            ":job": job["jobId"],
            ":now": stamp,
            ":age": int(batch_age_seconds),
            ":gsi3pk": status_partition(ENTITY_BATCH, BATCH_IMPORTING),
        },
    )


def record_job_status(table: Table, batch_id: str, job_id: str, job_status: str, now: datetime) -> None:
    table.update_item(
        Key=job_key(batch_id, job_id),
        UpdateExpression="SET jobStatus = :status, updatedAt = :now",
        ExpressionAttributeValues={":status": job_status, ":now": iso_millis(now)},
    )


@dataclass(frozen=True)
class InstanceOutcome:
    """What one import job reported for one instance (or what we concluded when it reported nothing)."""

    key: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    status: str
    image_set_id: str | None = None
    is_primary: bool | None = None
    reason: str | None = None
    server_error: bool = False
    requeued_to: str | None = None

    @classmethod
    def concluded(cls, entry: ManifestObject, status: str, reason: str) -> InstanceOutcome:
        """An outcome we concluded for a manifest entry that the job's output did not give."""
        return cls(
            key=entry.key,
            study_instance_uid=entry.study_instance_uid,
            series_instance_uid=entry.series_instance_uid,
            sop_instance_uid=entry.sop_instance_uid,
            status=status,
            reason=reason,
        )


def record_instance_outcome(
    table: Table, batch_id: str, job_id: str, outcome: InstanceOutcome, retention: Retention, now: datetime
) -> bool:
    """Write one instance's outcome unless a newer batch has taken the instance over, another import job of this
    batch has imported it, or it is recorded stored by StoreDICOM (or found by asking HealthImaging); True if
    written.

    Two jobs of one batch (two executions that both passed the registration, or a re-import) each report the
    instance; HealthImaging holds it once either imported it, so the other job's failure must not replace that.
    A batch the sweeper sealed whole holds objects StoreDICOM had stored, and its job imports them again: the
    record of StoreDICOM's answer stays, whole, rather than taking the job's image set under ``storedBy``.
    """
    attention = NON_PRIMARY if outcome.is_primary is False else outcome.status
    names = {"#status": "status", "#key": "key"}
    values: dict[str, Any] = {
        ":batch": batch_id,
        ":job": job_id,
        ":status": outcome.status,
        ":now": iso_millis(now),
        ":key": outcome.key,
        ":sop": outcome.sop_instance_uid,
        ":study": outcome.study_instance_uid,
        ":series": outcome.series_instance_uid,
        ":imported": IMPORTED,
        ":warning": WARNING,
    }
    sets = [
        "#status = :status",
        "jobId = :job",
        "updatedAt = :now",
        "#key = :key",
        "batchId = if_not_exists(batchId, :batch)",
        "sopInstanceUid = :sop",
        "studyInstanceUid = :study",
        "seriesInstanceUid = :series",
        "entity = :entity",
    ]
    values[":entity"] = ENTITY_INSTANCE
    removes: list[str] = []
    optional = {
        "imageSetId": outcome.image_set_id,
        "isPrimary": outcome.is_primary,
        "reason": shorten(outcome.reason) if outcome.reason else None,
        "requeuedTo": outcome.requeued_to,
    }
    for name, value in optional.items():
        if value is None:
            removes.append(name)
        else:
            sets.append(f"{name} = :{name}")
            values[f":{name}"] = value
    if attention == IMPORTED:
        removes += ["gsi3pk", "gsi3sk"]
    else:
        sets += ["gsi3pk = :gsi3pk", "gsi3sk = :gsi3sk"]
        values[":gsi3pk"] = status_partition(ENTITY_INSTANCE, attention)
        values[":gsi3sk"] = f"{iso_millis(now)}#{outcome.sop_instance_uid}"
    expires = retention.expires_at(now)
    if expires is not None:
        sets.append("expiresAt = :expires")
        values[":expires"] = expires
    expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
    return update_if_condition_holds(
        table,
        Key=instance_key(outcome.study_instance_uid, outcome.series_instance_uid, outcome.sop_instance_uid),
        UpdateExpression=expression,
        ConditionExpression=(
            "attribute_not_exists(pk) OR (batchId = :batch AND NOT (#status IN (:imported, :warning) AND"
            " (attribute_exists(storedBy) OR (attribute_exists(jobId) AND jobId <> :job))))"
        ),
        ExpressionAttributeNames=names,
        ExpressionAttributeValues=values,
    )


def update_if_condition_holds(table: Table, **request: Any) -> bool:
    """Run a conditional UpdateItem; False, not an error, when its condition does not hold.

    Called from several threads at once: it goes through the table's client, which is thread-safe (boto3's
    resource objects are not) and converts Python values as the table resource does.
    """
    return _if_condition_holds(table, "update_item", request)


def put_if_condition_holds(table: Table, **request: Any) -> bool:
    """Run a conditional PutItem; False, not an error, when its condition does not hold (thread-safe)."""
    return _if_condition_holds(table, "put_item", request)


def _if_condition_holds(table: Table, operation: str, request: dict[str, Any]) -> bool:
    try:
        getattr(table.meta.client, operation)(TableName=table.name, **request)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


def finish_batch(
    table: Table,
    batch_id: str,
    status: str,
    counts: dict[str, int],
    reason: str | None,
    retention: Retention,
    now: datetime,
    extra: dict[str, Any] | None = None,
) -> None:
    stamp = iso_millis(now)
    values: dict[str, Any] = {
        ":status": status,
        ":now": stamp,
        ":counts": counts,
        ":gsi3pk": status_partition(ENTITY_BATCH, status),
        ":gsi3sk": f"{stamp}#{batch_id}",
    }
    sets = ["#status = :status", "updatedAt = :now", "finishedAt = :now", "outcomeCounts = :counts"]
    sets += ["gsi3pk = :gsi3pk", "gsi3sk = :gsi3sk"]
    removes = []
    if reason:
        sets.append("reason = :reason")
        values[":reason"] = shorten(reason)
    else:
        removes.append("reason")  # an unconfirmed batch whose output was read at last: its old reason is gone
    for name, value in (extra or {}).items():
        sets.append(f"{name} = :{name}")
        values[f":{name}"] = value
    expires = retention.expires_at(now)
    if expires is not None:
        sets.append("expiresAt = :expires")
        values[":expires"] = expires
    table.update_item(
        Key=batch_key(batch_id),
        UpdateExpression="SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else ""),
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues=values,
    )


def finish_stored_batch(table: Table, manifest: Manifest, retention: Retention, now: datetime) -> dict[str, int]:
    """A batch StoreDICOM stored ends imported at registration, without an import job; returns its counts."""
    counts = count_by_status(
        InstanceOutcome(
            entry.key,
            entry.study_instance_uid,
            entry.series_instance_uid,
            entry.sop_instance_uid,
            WARNING if entry.stored_by_storedicom and entry.stored_by_storedicom.warning else IMPORTED,
        )
        for entry in manifest.objects
    )
    finish_batch(table, manifest.batch_id, BATCH_IMPORTED, counts, None, retention, now)
    return counts


def finish_job(
    table: Table,
    batch_id: str,
    job_id: str,
    job_status: str,
    summary: dict[str, Any],
    message: str | None,
    retention: Retention,
    now: datetime,
) -> None:
    values: dict[str, Any] = {":status": job_status, ":now": iso_millis(now), ":summary": summary}
    sets = ["jobStatus = :status", "updatedAt = :now", "summary = :summary"]
    if message:
        sets.append("message = :message")
        values[":message"] = shorten(message)
    expires = retention.expires_at(now)
    if expires is not None:
        sets.append("expiresAt = :expires")
        values[":expires"] = expires
    table.update_item(
        Key=job_key(batch_id, job_id),
        UpdateExpression="SET " + ", ".join(sets),
        ExpressionAttributeValues=values,
    )


def fail_unfinished_instances(
    table: Table, manifest: Manifest, reason: str, retention: Retention, now: datetime
) -> int:
    """Fail every instance this batch still owns and has no outcome for; returns how many."""

    def fail_one(entry: ManifestObject) -> bool:
        outcome = InstanceOutcome.concluded(entry, FAILED, reason)
        return _set_if_unfinished(table, manifest.batch_id, outcome, retention, now)

    return sum(in_parallel(fail_one, manifest.objects))


def fail_unrecorded_instances(
    table: Table, manifest: Manifest, reason: str, retention: Retention, now: datetime
) -> int:
    """Give each instance of the batch that has no record at all (its registration was cut short) a failed one, so
    that none is left without a trace; returns how many. An instance any batch has recorded keeps that record."""
    stamp = iso_millis(now)
    expires = retention.expires_at(now)
    attempt = 2 if manifest.requeued_from else 1

    def fail_one(entry: ManifestObject) -> bool:
        item = _instance_item(manifest, entry, attempt, stamp, expires)
        item["receiptAt"] = receipt_time(manifest, entry)
        item["status"], item["reason"] = FAILED, shorten(reason)
        item["gsi3pk"], item["gsi3sk"] = status_partition(ENTITY_INSTANCE, FAILED), f"{stamp}#{entry.sop_instance_uid}"
        if expires is not None:
            item["expiresAt"] = expires
        return put_if_condition_holds(table, Item=item, ConditionExpression="attribute_not_exists(pk)")

    return sum(in_parallel(fail_one, manifest.objects))


def mark_stuck(table: Table, manifest: Manifest, job_id: str, reason: str, now: datetime) -> int:
    """Record the batch and its unfinished instances ``stuck``; returns how many instances.

    The instances first, then the batch: a call cut short leaves the batch ``importing``, so the next status
    check marks again (each write is conditional and repeatable); once the batch says ``stuck``, the later
    checks write nothing. Stuck items get no expiry: they are not final.
    """
    batch = table.get_item(Key=batch_key(manifest.batch_id), ConsistentRead=True).get("Item", {})
    if batch.get("status") == BATCH_STUCK:
        return 0

    def mark_one(entry: ManifestObject) -> bool:
        outcome = InstanceOutcome.concluded(entry, STUCK, reason)
        return _set_if_unfinished(table, manifest.batch_id, outcome, None, now)

    marked = sum(in_parallel(mark_one, manifest.objects))
    stamp = iso_millis(now)
    update_if_condition_holds(
        table,
        Key=batch_key(manifest.batch_id),
        UpdateExpression=(
            "SET #status = :stuck, reason = :reason, updatedAt = :now, stuckAt = :now,"
            " gsi3pk = :gsi3pk, gsi3sk = :gsi3sk"
        ),
        ConditionExpression="#status = :importing AND jobId = :job",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues={
            ":stuck": BATCH_STUCK,
            ":importing": BATCH_IMPORTING,
            ":job": job_id,
            ":reason": shorten(reason),
            ":now": stamp,
            ":gsi3pk": status_partition(ENTITY_BATCH, BATCH_STUCK),
            ":gsi3sk": f"{stamp}#{manifest.batch_id}",
        },
    )
    return marked


def _set_if_unfinished(
    table: Table, batch_id: str, outcome: InstanceOutcome, retention: Retention | None, now: datetime
) -> bool:
    """Give an instance this batch owns, still importing or stuck, the outcome's status and reason."""
    stamp = iso_millis(now)
    values: dict[str, Any] = {
        ":batch": batch_id,
        ":importing": IMPORTING,
        ":stuck": STUCK,
        ":status": outcome.status,
        ":reason": shorten(outcome.reason or "batch failed"),
        ":now": stamp,
        ":gsi3pk": status_partition(ENTITY_INSTANCE, outcome.status),
        ":gsi3sk": f"{stamp}#{outcome.sop_instance_uid}",
    }
    sets = "#status = :status, reason = :reason, updatedAt = :now, gsi3pk = :gsi3pk, gsi3sk = :gsi3sk"
    expires = retention.expires_at(now) if retention else None
    if expires is not None:
        sets += ", expiresAt = :expires"
        values[":expires"] = expires
    return update_if_condition_holds(
        table,
        Key=instance_key(outcome.study_instance_uid, outcome.series_instance_uid, outcome.sop_instance_uid),
        UpdateExpression="SET " + sets,
        ConditionExpression="batchId = :batch AND (#status = :importing OR #status = :stuck)",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues=values,
    )


def count_by_status(outcomes: Iterable[InstanceOutcome]) -> dict[str, int]:
    counts = {IMPORTED: 0, WARNING: 0, FAILED: 0, REQUEUED: 0, UNCONFIRMED: 0, NON_PRIMARY: 0}
    for outcome in outcomes:
        counts[outcome.status] += 1
        if outcome.is_primary is False:
            counts[NON_PRIMARY] += 1
    return counts


def claim_recheck(table: Table, batch_id: str, due: datetime, now: datetime) -> bool:
    """Take an ``unconfirmed`` batch's next re-check unless one ran after ``due``; True if this caller has it.

    Conditional, so two sweeper runs at once never re-check the same batch, and the cadence holds across runs.
    """
    return update_if_condition_holds(
        table,
        Key=batch_key(batch_id),
        UpdateExpression="SET recheckedAt = :now, recheckCount = if_not_exists(recheckCount, :zero) + :one",
        ConditionExpression=(
            "#status = :unconfirmed AND attribute_not_exists(recheckEndedAt)"
            " AND (attribute_not_exists(recheckedAt) OR recheckedAt <= :due)"
        ),
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues={
            ":now": iso_millis(now),
            ":due": iso_millis(due),
            ":unconfirmed": BATCH_UNCONFIRMED,
            ":zero": 0,
            ":one": 1,
        },
    )


def end_recheck(table: Table, batch_id: str, reason: str, now: datetime) -> bool:
    """Stop re-checking an ``unconfirmed`` batch: it stays unconfirmed, final, with ``reason`` saying why."""
    return update_if_condition_holds(
        table,
        Key=batch_key(batch_id),
        UpdateExpression="SET recheckEndedAt = :now, updatedAt = :now, reason = :reason",
        ConditionExpression="#status = :unconfirmed",
        ExpressionAttributeNames={"#status": "status"},
        ExpressionAttributeValues={
            ":now": iso_millis(now),
            ":reason": shorten(reason),
            ":unconfirmed": BATCH_UNCONFIRMED,
        },
    )
