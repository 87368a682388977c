"""Lambda function (scheduled): close batches a dead daemon left open, start the import of lost triggers, and
read again the output of import jobs that was not readable when they completed.

Abandoned: objects under the batch prefix, no manifest, newest object older than the minimum age (the larger
of SWEEP_MIN_AGE_SECONDS and the daemon's BATCH_WINDOW_SECONDS plus a drain margin). Late objects: objects a
live daemon stored into a batch this function sealed, which the daemon could not copy into the batch's late batch
(docs/s3-layout.rst). Lost trigger: a manifest older than the minimum age without a batch item in the workflow
table; its S3 event never started a workflow. Unconfirmed: a batch whose job COMPLETED but whose output stayed
unreadable through the workflow's retries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError
from common.config import EnvironmentReader, forwarding_datastore_id, record_retention_days
from common.held_in_healthimaging import HealthImagingLookup, healthimaging_lookup
from common.job_results import JobOutputNotReady, record_results
from common.layout import (
    BATCHES_PREFIX,
    MANIFESTS_PREFIX,
    SEALED_PREFIX,
    LayoutError,
    ObjectKey,
    batch_id_from_manifest_key,
    batch_id_from_sealed_marker_key,
    batch_id_time_part,
    batch_opened_at,
    batch_prefix,
    check_batch_id,
    late_batch_id,
    object_key,
    parse_object_key,
    sealed_marker_key,
)
from common.manifest import (
    CLOSED_BY_LATE,
    CLOSED_BY_SWEEPER,
    Manifest,
    ManifestObject,
    iso_millis,
    parse_iso,
    read_manifest,
    write_manifest_once,
)
from common.parallel import POOLED_CLIENT_CONFIG
from common.records import (
    BATCH_UNCONFIRMED,
    BY_STATUS_INDEX,
    ENTITY_BATCH,
    Retention,
    batch_key,
    claim_recheck,
    end_recheck,
    job_key,
    status_partition,
    utc_now,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectTypeDef
    from mypy_boto3_stepfunctions import SFNClient

logger = Logger(service="import-workflow")
metrics = Metrics(namespace="DICOMStoreSCP", service="import-workflow")


# What a live daemon may still add to a batch after its quiet window has passed: the drain at shutdown (ECS
# stopTimeout, at most 120 s on Fargate) and the S3 retries of the objects in flight. S3 stamps LastModified
# when an upload starts, so a slow upload looks older than it is; the margin covers that as well.
DRAIN_MARGIN_SECONDS = 600

# An unconfirmed batch is read again at most hourly for a week after its job completed; output that appears
# meanwhile is recorded as ProcessResults records it. After that week the batch stays unconfirmed, final: the
# output of a completed job that a week has not made readable will not be read, and "failed" could be untrue.
RECHECK_INTERVAL = timedelta(hours=1)
RECHECK_PERIOD = timedelta(days=7)
# The re-check query reads a day past the period, so that some run makes the final write however runs fall.
RECHECK_QUERY_MARGIN = timedelta(days=1)
# Each run re-checks a bounded number of batches, and starts one only while the run has time to record a
# large batch's outcomes (ProcessResults' own work, well under this).
RECHECKS_PER_RUN = 10
RECHECK_TIME_RESERVE_SECONDS = 120.0


@dataclass(frozen=True)
class Settings:
    dicom_bucket: str
    table_name: str
    state_machine_arn: str
    configured_min_age_seconds: int
    batch_window_seconds: int
    lookback_hours: int
    retention_days: int
    forwarding_datastore_id: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        reader = EnvironmentReader(environ)
        settings = cls(
            dicom_bucket=reader.text("DICOM_BUCKET"),
            table_name=reader.text("TABLE_NAME"),
            state_machine_arn=reader.text(
                "STATE_MACHINE_ARN", r"arn:aws[a-z-]*:states:[a-z0-9-]+:[0-9]{12}:stateMachine:.+"
            ),
            configured_min_age_seconds=reader.integer("SWEEP_MIN_AGE_SECONDS", 900, 60, 86400),
            batch_window_seconds=reader.required_integer("BATCH_WINDOW_SECONDS", 1, 86400),
            lookback_hours=reader.integer("SWEEP_LOOKBACK_HOURS", 72, 1, 8760),
            retention_days=record_retention_days(reader),
            forwarding_datastore_id=forwarding_datastore_id(reader),
        )
        reader.finish()
        return settings

    @property
    def min_age_seconds(self) -> int:
        """A batch younger than this may still be filled by a live daemon: never sealed."""
        return minimum_age_seconds(self.configured_min_age_seconds, self.batch_window_seconds)


def minimum_age_seconds(configured: int, batch_window_seconds: int) -> int:
    # The template passes both values as they are (CloudFormation cannot add), so the sum is made here.
    return max(configured, batch_window_seconds + DRAIN_MARGIN_SECONDS)


def _batch_ids_under(s3: S3Client, bucket: str, start: datetime) -> list[str]:
    """Batch ids opened since ``start``; ids begin with their open time, so StartAfter skips older ones."""
    ids = []
    paginator = s3.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=bucket,
        Prefix=BATCHES_PREFIX,
        Delimiter="/",
        StartAfter=f"{BATCHES_PREFIX}{batch_id_time_part(start)}",
    )
    for page in pages:
        for common in page.get("CommonPrefixes", []):
            candidate = common["Prefix"][len(BATCHES_PREFIX) :].rstrip("/")
            try:
                ids.append(check_batch_id(candidate))
            except LayoutError:
                logger.warning("prefix that is not a batch id under batches/", prefix=common["Prefix"])
    return ids


def _manifests(s3: S3Client, bucket: str, start: datetime) -> dict[str, ObjectTypeDef]:
    """The manifests of the batches opened since ``start``, by batch id, as the listing shows them."""
    manifests: dict[str, ObjectTypeDef] = {}
    paginator = s3.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=bucket, Prefix=MANIFESTS_PREFIX, StartAfter=f"{MANIFESTS_PREFIX}{batch_id_time_part(start)}"
    )
    for page in pages:
        for entry in page.get("Contents", []):
            try:
                manifests[batch_id_from_manifest_key(entry["Key"])] = entry
            except LayoutError:
                logger.warning("key that is not a manifest under manifests/", key=entry["Key"])
    return manifests


Listed = tuple["ObjectTypeDef", ObjectKey, datetime]  # an object's listing, its key's parts, when S3 stored it first


def listed_object(entry: ObjectTypeDef, parsed: ObjectKey, stored_at: datetime) -> ManifestObject:
    """An object's manifest entry from its listing (UIDs from its key); ``stored_at`` is when S3 stored it first."""
    return ManifestObject(
        key=entry["Key"],
        sop_instance_uid=parsed.sop_instance_uid,
        study_instance_uid=parsed.study_instance_uid,
        series_instance_uid=parsed.series_instance_uid,
        sop_class_uid=None,
        size=int(entry["Size"]),
        calling_ae_title=None,
        # When S3 stored it, moments after its receipt: what decides, should the modality have sent the
        # instance again into another batch, which receipt is newer.
        received_at=iso_millis(stored_at),
    )


def manifest_from_listed(
    bucket: str, batch_id: str, closed_by: str, now: datetime, listed: list[Listed], late_from: str | None = None
) -> Manifest:
    """The manifest this function writes for objects it found by listing (``listed``, at least one)."""
    times = [stored_at for _, _, stored_at in listed]
    objects = sorted((listed_object(*item) for item in listed), key=lambda item: item.key)
    return Manifest(
        batch_id=batch_id,
        bucket=bucket,
        closed_by=closed_by,
        closed_at=iso_millis(now),
        first_received_at=iso_millis(min(times)),
        last_received_at=iso_millis(max(times)),
        # The listing does not name the senders; the objects' files do, and the workflow does not need them.
        calling_ae_titles=(),
        objects=tuple(objects),
        late_from=late_from,
    )


def manifest_from_listing(
    s3: S3Client, bucket: str, batch_id: str, now: datetime
) -> tuple[Manifest, datetime] | None:
    """Rebuild the manifest of a batch from its objects (UIDs from the keys); None if the batch is empty."""
    listed: list[Listed] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=batch_prefix(batch_id)):
        for entry in page.get("Contents", []):
            try:
                parsed = parse_object_key(entry["Key"])
            except LayoutError:
                logger.error("object outside the key layout left out of the manifest", key=entry["Key"])
                continue
            listed.append((entry, parsed, entry["LastModified"]))
    if not listed:
        return None
    newest = max(stored_at for _, _, stored_at in listed)
    return manifest_from_listed(bucket, batch_id, CLOSED_BY_SWEEPER, now, listed), newest


def sweep(s3: S3Client, bucket: str, now: datetime, min_age_seconds: int, lookback_hours: int) -> list[str]:
    """Close every abandoned batch opened in the lookback window; returns the ids this run closed."""
    start = now - timedelta(hours=lookback_hours)
    min_age = timedelta(seconds=min_age_seconds)
    closed = _manifests(s3, bucket, start)
    swept = []
    for batch_id in _batch_ids_under(s3, bucket, start):
        # A batch opened less than min_age ago cannot have a newest object older than min_age.
        if batch_id in closed or now - batch_opened_at(batch_id) < min_age:
            continue
        rebuilt = manifest_from_listing(s3, bucket, batch_id, now)
        if rebuilt is None:
            continue
        manifest, newest = rebuilt
        if now - newest < min_age:
            continue
        # Before the manifest, so that no batch this run seals escapes the late-object pass (recover_late).
        s3.put_object(Bucket=bucket, Key=sealed_marker_key(batch_id), Body=b"")
        if write_manifest_once(s3, manifest):
            logger.warning("abandoned batch closed", batch_id=batch_id, objects=len(manifest.objects))
            swept.append(batch_id)
        else:
            logger.info("batch closed meanwhile by its daemon", batch_id=batch_id)
    return swept


Uids = tuple[str, str, str]  # study, series and SOP Instance UID: an instance's identity in every batch's keys


def _uids(parsed: ObjectKey) -> Uids:
    return parsed.study_instance_uid, parsed.series_instance_uid, parsed.sop_instance_uid


def _listed_uids(manifest: Manifest) -> set[Uids]:
    return {(item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid) for item in manifest.objects}


def _stored_objects(s3: S3Client, bucket: str, batch_id: str) -> dict[Uids, tuple[ObjectTypeDef, ObjectKey]]:
    """The objects under a batch's prefix that follow the key layout, by their UIDs."""
    stored = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=batch_prefix(batch_id)):
        for entry in page.get("Contents", []):
            try:
                parsed = parse_object_key(entry["Key"])
            except LayoutError:
                continue  # the sealing pass has logged it
            stored[_uids(parsed)] = entry, parsed
    return stored


def _manifest_if_written(s3: S3Client, bucket: str, batch_id: str) -> Manifest | None:
    try:
        return read_manifest(s3, bucket, batch_id)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


def _sealed_batch_ids(s3: S3Client, bucket: str, start: datetime) -> list[str]:
    """The batches opened since ``start`` that a sweeper run sealed (or set out to), from their markers."""
    ids = []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=SEALED_PREFIX, StartAfter=f"{SEALED_PREFIX}{batch_id_time_part(start)}"
    )
    for page in pages:
        for entry in page.get("Contents", []):
            try:
                ids.append(batch_id_from_sealed_marker_key(entry["Key"]))
            except LayoutError:
                logger.warning("key that is not a sealed marker under sealed/", key=entry["Key"])
    return ids


def recover_late_batch(s3: S3Client, bucket: str, batch_id: str, now: datetime, min_age: timedelta) -> str | None:
    """Put the objects of a batch this function sealed that no manifest lists into their late batch.

    The late batches of a batch form a chain (``late_batch_id`` of the batch, of that one, ...); an object left
    out of the sealed manifest belongs to the first link whose manifest lists it. Every writer, the daemon and
    this pass, copies an object into a link only after reading every earlier link's manifest without it, and
    writes a link's manifest once (If-None-Match): as manifests never change, no two links list one object. The
    first link without a manifest takes every object still unlisted, with the copies already under its prefix
    (each made under the same rule). Returns the id of the late batch whose manifest this call wrote.
    """
    sealed = _manifest_if_written(s3, bucket, batch_id)
    if sealed is None or sealed.closed_by != CLOSED_BY_SWEEPER:
        return None  # not sealed yet (the sealing pass will), or its daemon's manifest won and lists all it stored
    originals = _stored_objects(s3, bucket, batch_id)
    unlisted = set(originals) - _listed_uids(sealed)
    previous, link = batch_id, late_batch_id(batch_id)
    while unlisted:
        written = _manifest_if_written(s3, bucket, link)
        if written is None:
            break
        unlisted -= _listed_uids(written)
        previous, link = link, late_batch_id(link)
    if not unlisted:
        return None
    if any(now - originals[uids][0]["LastModified"] < min_age for uids in unlisted):
        # Its daemon may be copying them still; the chain waits for the next run.
        logger.info("late objects of a sealed batch not yet settled", batch_id=batch_id, late_batch_id=link)
        return None
    for uids in sorted(unlisted):
        s3.copy({"Bucket": bucket, "Key": originals[uids][0]["Key"]}, bucket, object_key(link, *uids))
    listed: list[Listed] = [
        # A copy's LastModified is when it was copied; its original's, when it was received.
        (entry, parsed, originals[uids][0]["LastModified"] if uids in originals else entry["LastModified"])
        for uids, (entry, parsed) in sorted(_stored_objects(s3, bucket, link).items())
    ]
    late = manifest_from_listed(bucket, link, CLOSED_BY_LATE, now, listed, late_from=previous)
    if not write_manifest_once(s3, late):
        logger.info("late batch closed meanwhile by the daemon", batch_id=batch_id, late_batch_id=link)
        return None  # the next run goes on along the chain
    logger.warning(
        "objects stored after their batch was sealed: copied into its late batch",
        batch_id=batch_id,
        late_batch_id=link,
        objects=len(late.objects),
    )
    return link


def recover_late(s3: S3Client, bucket: str, now: datetime, min_age_seconds: int, lookback_hours: int) -> list[str]:
    """The late-object pass over every batch sealed by this function and opened in the lookback window; returns
    the ids of the late batches it closed. The window is the sealing pass's: a batch it may seal, this pass
    keeps looking after for as long."""
    start = now - timedelta(hours=lookback_hours)
    min_age = timedelta(seconds=min_age_seconds)
    recovered = []
    for batch_id in _sealed_batch_ids(s3, bucket, start):
        late = recover_late_batch(s3, bucket, batch_id, now, min_age)
        if late is not None:
            recovered.append(late)
    return recovered


def manifest_created_event(bucket: str, manifest: ObjectTypeDef, now: datetime) -> dict[str, Any]:
    """The input EventBridge gives the workflow for a new manifest (S3 "Object Created"), the fields it reads."""
    return {
        "version": "0",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": manifest["Key"], "size": manifest["Size"], "etag": manifest["ETag"].strip('"')},
            "reason": "PutObject",
        },
    }


def reconcile(
    s3: S3Client,
    sfn: SFNClient,
    table: Table,
    bucket: str,
    state_machine_arn: str,
    now: datetime,
    min_age_seconds: int,
    lookback_hours: int,
) -> list[str]:
    """Start the workflow for every manifest in the lookback that no execution has registered; returns their ids.

    The manifest-created rule retries and keeps what it cannot deliver in a dead-letter queue, but a trigger
    can still be lost; this pass makes sure every closed batch is imported. A manifest younger than the
    minimum age is left to its own event. Starting twice is harmless: the second execution of a batch ends in
    DuplicateTrigger. An execution name that carries the run's time lets a later run start it again.
    """
    start = now - timedelta(hours=lookback_hours)
    settled = timedelta(seconds=min_age_seconds)
    started = []
    for batch_id, manifest in sorted(_manifests(s3, bucket, start).items()):
        if now - manifest["LastModified"] < settled:
            continue
        if "Item" in table.get_item(Key=batch_key(batch_id), ConsistentRead=True, ProjectionExpression="pk"):
            continue
        execution = sfn.start_execution(
            stateMachineArn=state_machine_arn,
            name=f"reconcile-{batch_id}-{batch_id_time_part(now)}",
            input=json.dumps(manifest_created_event(bucket, manifest, now)),
        )
        logger.warning(
            "manifest without a batch item: import started", batch_id=batch_id, execution=execution["executionArn"]
        )
        started.append(batch_id)
    return started


@dataclass
class Rechecked:
    """What one run's re-check of unconfirmed batches found, by batch id."""

    recorded: list[str] = field(default_factory=list)  # the output is readable now: outcomes recorded
    unreadable: list[str] = field(default_factory=list)  # still not: read again in an hour
    ended: list[str] = field(default_factory=list)  # still not, a week on: unconfirmed for good

    def to_json(self) -> dict[str, list[str]]:
        return {"recorded": self.recorded, "unreadable": self.unreadable, "ended": self.ended}


def _unconfirmed_batches(table: Table, since: datetime) -> Iterator[dict[str, Any]]:
    """Unconfirmed batches that became so since ``since`` and are still re-checked, the oldest first.

    Their ByStatus sort key begins with the time they were recorded unconfirmed.
    """
    request: dict[str, Any] = {
        "IndexName": BY_STATUS_INDEX,
        "KeyConditionExpression": Key("gsi3pk").eq(status_partition(ENTITY_BATCH, BATCH_UNCONFIRMED))
        & Key("gsi3sk").gte(iso_millis(since)),
        "FilterExpression": Attr("recheckEndedAt").not_exists(),
    }
    while True:
        page = table.query(**request)
        yield from page.get("Items", [])
        if "LastEvaluatedKey" not in page:
            return
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _results_event(batch: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    """ProcessResults' input for the batch's job, from the table: what the state machine gave it."""
    return {
        "batchId": batch["batchId"],
        "attempt": int(batch.get("attempt", 1)),
        "job": {
            "jobId": job["jobId"],
            "datastoreId": job["datastoreId"],
            "submittedAt": job["submittedAt"],
            "outputS3Uri": job["outputS3Uri"],
        },
        # Only a COMPLETED job leaves its batch unconfirmed.
        "jobStatus": {"jobStatus": "COMPLETED", "endedAt": None, "message": job.get("message")},
    }


def recheck_unconfirmed(
    s3: S3Client,
    table: Table,
    bucket: str,
    healthimaging: HealthImagingLookup | None,
    retention: Retention,
    now: datetime,
    seconds_left: Callable[[], float],
) -> Rechecked:
    """Read the output of unconfirmed batches' jobs again; record the outcomes of those readable now.

    Each batch at most once per RECHECK_INTERVAL (claimed on its item, so overlapping runs never both do it),
    for RECHECK_PERIOD after it became unconfirmed; then it stays unconfirmed with a reason saying so.
    """
    rechecked = Rechecked()
    claimed = 0
    for batch in _unconfirmed_batches(table, now - RECHECK_PERIOD - RECHECK_QUERY_MARGIN):
        if claimed >= RECHECKS_PER_RUN or seconds_left() < RECHECK_TIME_RESERVE_SECONDS:
            break
        batch_id = str(batch["batchId"])
        if not claim_recheck(table, batch_id, now - RECHECK_INTERVAL, now):
            continue
        claimed += 1
        job_id = str(batch["jobId"])
        job = table.get_item(Key=job_key(batch_id, job_id), ConsistentRead=True).get("Item")
        if job is None or "outputS3Uri" not in job:
            logger.error("unconfirmed batch without its job's record: not re-checked", batch_id=batch_id)
            continue
        try:
            results = record_results(_results_event(batch, job), s3, table, bucket, healthimaging, retention, now)
        except JobOutputNotReady as unreadable:
            unconfirmed_for = now - parse_iso(str(batch["finishedAt"]))
            if unconfirmed_for < RECHECK_PERIOD:
                rechecked.unreadable.append(batch_id)
                continue
            reason = (
                f"import job {job_id} COMPLETED; its output was still unreadable {unconfirmed_for.days} days"
                f" later ({unreadable}), and re-checks have ended: HealthImaging may have imported these"
                " instances; look the job up before sending them again"
            )
            end_recheck(table, batch_id, reason, now)
            logger.warning("unconfirmed batch: re-checks ended, it stays unconfirmed", batch_id=batch_id)
            rechecked.ended.append(batch_id)
            continue
        logger.warning(
            "unconfirmed batch: its job's output is readable now, outcomes recorded",
            batch_id=batch_id,
            batch_status=results.batch_status,
            counts=results.counts,
        )
        rechecked.recorded.append(batch_id)
    return rechecked


SETTINGS = Settings.from_env(os.environ)
RETENTION = Retention(SETTINGS.retention_days)
# Pooled: recording a batch's outcomes writes its instances side by side (common/parallel.py).
S3 = boto3.client("s3", config=POOLED_CLIENT_CONFIG)
SFN = boto3.client("stepfunctions")
TABLE = boto3.resource("dynamodb", config=POOLED_CLIENT_CONFIG).Table(SETTINGS.table_name)
HEALTHIMAGING = healthimaging_lookup(SETTINGS.forwarding_datastore_id)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    lookback = (
        int(event.get("lookbackHours", SETTINGS.lookback_hours))
        if isinstance(event, dict)
        else SETTINGS.lookback_hours
    )
    now = utc_now()
    swept = sweep(S3, SETTINGS.dicom_bucket, now, SETTINGS.min_age_seconds, lookback)
    metrics.add_metric(name="BatchesSwept", unit=MetricUnit.Count, value=len(swept))
    late = recover_late(S3, SETTINGS.dicom_bucket, now, SETTINGS.min_age_seconds, lookback)
    metrics.add_metric(name="LateBatchesClosed", unit=MetricUnit.Count, value=len(late))
    reconciled = reconcile(
        S3, SFN, TABLE, SETTINGS.dicom_bucket, SETTINGS.state_machine_arn, now, SETTINGS.min_age_seconds, lookback
    )
    metrics.add_metric(name="BatchesReconciled", unit=MetricUnit.Count, value=len(reconciled))
    rechecked = recheck_unconfirmed(
        S3,
        TABLE,
        SETTINGS.dicom_bucket,
        HEALTHIMAGING,
        RETENTION,
        now,
        lambda: context.get_remaining_time_in_millis() / 1000,
    )
    metrics.add_metric(name="UnconfirmedBatchesRecorded", unit=MetricUnit.Count, value=len(rechecked.recorded))
    metrics.add_metric(name="UnconfirmedBatchesEnded", unit=MetricUnit.Count, value=len(rechecked.ended))
    return {"closed": swept, "late": late, "reconciled": reconciled, "rechecked": rechecked.to_json()}
