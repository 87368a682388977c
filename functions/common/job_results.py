"""A finished import job's outcome: reading its output and recording the fate of every instance of its batch.

ProcessResults does this when the job finishes; the sweeper does it again for a batch whose output was not
readable then (``unconfirmed``), so both record through the same code. Server-side failures of a first attempt
are re-queued once as a new batch; customer errors are parked with their reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger
from botocore.exceptions import BotoCoreError, ClientError

from batch_contract.manifest import StoredByStoreDICOM
from common.held_in_healthimaging import HealthImagingLookup
from common.layout import (
    LayoutError,
    batch_id_time_part,
    check_batch_id,
    object_key,
    parse_object_key,
    split_s3_uri,
)
from common.manifest import (
    CLOSED_BY_REQUEUE,
    Manifest,
    ManifestObject,
    iso_millis,
    parse_iso,
    read_manifest,
    write_manifest_once,
)
from common.parallel import in_parallel
from common.records import (
    BATCH_FAILED,
    BATCH_IMPORTED,
    BATCH_PARTIAL,
    BATCH_UNCONFIRMED,
    FAILED,
    IMPORTED,
    REQUEUED,
    UNCONFIRMED,
    WARNING,
    InstanceOutcome,
    Retention,
    batch_key,
    count_by_status,
    finish_batch,
    finish_job,
    record_instance_outcome,
    record_stored_by_storedicom,
)
from common.stored_tags import stored_by_storedicom

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CopySourceTypeDef

# A child of the calling function's logger: its lines carry that function's Lambda context.
logger = Logger(service="import-workflow", child=True)

OUTPUT_MANIFEST = "job-output-manifest.json"
SUCCESS_FILE = "SUCCESS/success.ndjson"
FAILURE_FILE = "FAILURE/failure.ndjson"
WARNING_FILE = "WARNING/warning.ndjson"
# HealthImaging's job summary separates customer errors (the file) from server errors (the service); a failure
# line names its exception type, and these are the types that mean "the service failed", worth one more try.
SERVER_EXCEPTION_TYPES = frozenset(
    {"InternalServerException", "InternalFailure", "InternalServerError", "ServiceUnavailableException"}
)



@dataclass(frozen=True)
class JobOutput:
    summary: dict[str, Any]
    success: list[dict[str, Any]]
    failure: list[dict[str, Any]]
    warning: list[dict[str, Any]]


@dataclass(frozen=True)
class ImportedByJob:
    """The instances one import job imported (or imported with a warning), from its output."""

    job_id: str
    outcomes: list[InstanceOutcome]


@dataclass(frozen=True)
class Results:
    batch_status: str
    counts: dict[str, int]
    requeue_batch_id: str | None
    duration_seconds: float | None
    unmatched_lines: int

    def to_json(self) -> dict[str, Any]:
        return {"batchStatus": self.batch_status, **self.counts, "requeueBatchId": self.requeue_batch_id}


def _list_keys(s3: S3Client, bucket: str, prefix: str) -> Iterator[str]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            yield entry["Key"]


def _pick(keys: list[str], suffix: str, job_id: str) -> str | None:
    """The output file with this suffix; the one in the job's own folder if several jobs wrote here."""
    matches = [key for key in keys if key == suffix or key.endswith("/" + suffix)]
    own = [key for key in matches if job_id in key]
    chosen = own or matches
    return sorted(chosen)[-1] if chosen else None


def _ndjson(raw: bytes) -> list[dict[str, Any]]:
    lines = []
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            value = json.loads(line)
            if isinstance(value, dict):
                lines.append(value)
    return lines


class JobOutputNotReady(Exception):
    """A COMPLETED job whose output files are not all readable yet: read again later, never failed for it.

    The output appears a little after the job reports COMPLETED (AWS's own SDK example retries reading it), so
    the state machine retries this; if the output never appears, the instances are recorded ``unconfirmed``.
    """


def _summary_count(summary: Mapping[str, Any], name: str) -> int:
    value = summary.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def read_job_output(s3: S3Client, output_uri: str, job_id: str, completed: bool) -> JobOutput:
    """Find the job's output files by listing under OutputS3Uri (the service chooses the folder name).

    For a COMPLETED job the output manifest must be there, and the success and failure files whenever its
    summary counts imported or failed files; otherwise JobOutputNotReady.
    """
    bucket, prefix = split_s3_uri(output_uri)
    keys = list(_list_keys(s3, bucket, prefix))

    def read(suffix: str) -> bytes | None:
        key = _pick(keys, suffix, job_id)
        if key is None:
            return None
        try:
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    manifest_raw = read(OUTPUT_MANIFEST)
    summary = json.loads(manifest_raw).get("jobSummary", {}) if manifest_raw else {}
    summary = summary if isinstance(summary, dict) else {}
    success, failure = read(SUCCESS_FILE), read(FAILURE_FILE)
    if completed:
        failed_files = _summary_count(summary, "numberOfFilesWithCustomerError") + _summary_count(
            summary, "numberOfFilesWithServerError"
        )
        missing = [
            name
            for name, absent in (
                (OUTPUT_MANIFEST, manifest_raw is None),
                (SUCCESS_FILE, success is None and _summary_count(summary, "numberOfImportedFiles") > 0),
                (FAILURE_FILE, failure is None and failed_files > 0),
            )
            if absent
        ]
        if missing:
            raise JobOutputNotReady(f"import job {job_id} COMPLETED; not readable yet: {', '.join(missing)}")
    return JobOutput(
        summary=summary,
        success=_ndjson(success or b""),
        failure=_ndjson(failure or b""),
        warning=_ndjson(read(WARNING_FILE) or b""),
    )


def _input_key(line: Mapping[str, Any], bucket: str, prefix: str) -> str | None:
    """The object key an output line names, in any of the forms the service may write.

    ``inputFile`` may be the full key, an ``s3://`` URI, or a path relative to ``inputS3Uri`` (the batch
    prefix); the guide's examples differ, so all three are read. A URI into another bucket names nothing of ours.
    """
    value = line.get("inputFile")
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("s3://"):
        named_bucket, key = split_s3_uri(value)
        return key if named_bucket == bucket else None
    key = value.lstrip("/")
    return key if key.startswith(prefix) else prefix + key


def _failure_reason(line: Mapping[str, Any]) -> tuple[str, bool]:
    exception = line.get("exception")
    if isinstance(exception, dict):
        kind = str(exception.get("exceptionType", "UnknownException"))
        return f"{kind}: {exception.get('message', '')}".rstrip(": "), kind in SERVER_EXCEPTION_TYPES
    return json.dumps({k: v for k, v in line.items() if k != "inputFile"}, separators=(",", ":")), False


def _warning_reason(line: Mapping[str, Any]) -> str:
    # The warning line's fields beyond inputFile are kept verbatim: they carry the warning codes
    # (0xB000 coercion, 0xB006 elements discarded, 0xB007 SOP class mismatch, ...) an admin needs to see.
    details = {k: v for k, v in line.items() if k not in ("inputFile", "importResponse")}
    return json.dumps(details, separators=(",", ":"), sort_keys=True)


def _import_response(line: Mapping[str, Any]) -> tuple[str | None, bool | None]:
    response = line.get("importResponse")
    if not isinstance(response, dict):
        return None, None
    image_set = response.get("imageSetId")
    primary = response.get("isPrimary")
    return (str(image_set) if image_set else None), (primary if isinstance(primary, bool) else None)


def outcomes_from_output(
    manifest: Manifest, output: JobOutput, job_failed_reason: str | None
) -> tuple[list[InstanceOutcome], int]:
    """One outcome per instance; instances the output does not mention are failed with a reason."""
    by_key: dict[str, ManifestObject] = {entry.key: entry for entry in manifest.objects}
    outcomes: dict[str, InstanceOutcome] = {}
    unmatched = 0

    def base(key: str) -> InstanceOutcome | None:
        entry = by_key.get(key)
        if entry is not None:
            return InstanceOutcome(
                key, entry.study_instance_uid, entry.series_instance_uid, entry.sop_instance_uid, IMPORTED
            )
        try:
            parsed = parse_object_key(key)
        except LayoutError:
            return None
        if parsed.batch_id != manifest.batch_id:
            return None
        return InstanceOutcome(
            key, parsed.study_instance_uid, parsed.series_instance_uid, parsed.sop_instance_uid, IMPORTED
        )

    for line in output.success:
        key = _input_key(line, manifest.bucket, manifest.prefix)
        outcome = base(key) if key else None
        if outcome is None:
            unmatched += 1
            continue
        image_set, primary = _import_response(line)
        outcomes[outcome.key] = replace(outcome, image_set_id=image_set, is_primary=primary)
    for line in output.warning:
        key = _input_key(line, manifest.bucket, manifest.prefix)
        outcome = outcomes.get(key) if key else None
        outcome = outcome or (base(key) if key else None)
        if outcome is None:
            unmatched += 1
            continue
        image_set, primary = _import_response(line)
        outcomes[outcome.key] = replace(
            outcome,
            status=WARNING,
            reason=_warning_reason(line),
            image_set_id=outcome.image_set_id or image_set,
            is_primary=outcome.is_primary if outcome.is_primary is not None else primary,
        )
    for line in output.failure:
        key = _input_key(line, manifest.bucket, manifest.prefix)
        outcome = base(key) if key else None
        if outcome is None:
            unmatched += 1
            continue
        reason, server_error = _failure_reason(line)
        outcomes[outcome.key] = replace(outcome, status=FAILED, reason=reason, server_error=server_error)
    missing_reason = job_failed_reason or "the import job reported no outcome for this file"
    for entry in manifest.objects:
        if entry.key not in outcomes:
            outcomes[entry.key] = InstanceOutcome(
                entry.key,
                entry.study_instance_uid,
                entry.series_instance_uid,
                entry.sop_instance_uid,
                FAILED,
                reason=missing_reason,
            )
    return list(outcomes.values()), unmatched


def requeue_batch_id(original: str, now: datetime) -> str:
    """A fresh id in the daemon's format: re-queue time, random part derived from the original batch."""
    digest = hashlib.sha256(f"requeue:{original}".encode()).hexdigest()[:16]
    return check_batch_id(f"{batch_id_time_part(now)}-{digest}")


def claim_requeue_id(table: Table, batch_id: str, now: datetime) -> str:
    """The re-queue batch id, fixed on the batch item by the first attempt so a retried task reuses it."""
    response = table.update_item(
        Key=batch_key(batch_id),
        UpdateExpression="SET requeueBatchId = if_not_exists(requeueBatchId, :candidate)",
        ExpressionAttributeValues={":candidate": requeue_batch_id(batch_id, now)},
        ReturnValues="ALL_NEW",
    )
    return str(response["Attributes"]["requeueBatchId"])


# Up to 5 GB one CopyObject copies (S3's limit for a single copy); larger objects go through the managed copy.
SINGLE_COPY_LIMIT = 5 * 1024**3


def requeue(
    s3: S3Client, manifest: Manifest, outcomes: Iterable[InstanceOutcome], new_batch_id: str, now: datetime
) -> None:
    """Copy the objects into a new batch, side by side, and close it with its own manifest (once).

    Runs before any instance is marked requeued: if a copy fails, the error ends the task with nothing marked
    and no manifest, and the retried task copies again (same keys, same bytes) into the same batch id.
    """
    by_key = {entry.key: entry for entry in manifest.objects}

    def copy_one(outcome: InstanceOutcome) -> ManifestObject:
        new_key = object_key(
            new_batch_id, outcome.study_instance_uid, outcome.series_instance_uid, outcome.sop_instance_uid
        )
        original = by_key.get(outcome.key)
        size = original.size if original and original.size > 0 else 0
        if size == 0:
            size = s3.head_object(Bucket=manifest.bucket, Key=outcome.key)["ContentLength"]
        source: CopySourceTypeDef = {"Bucket": manifest.bucket, "Key": outcome.key}
        if size <= SINGLE_COPY_LIMIT:
            s3.copy_object(Bucket=manifest.bucket, Key=new_key, CopySource=source)
        else:
            s3.copy(source, manifest.bucket, new_key)
        return ManifestObject(
            key=new_key,
            sop_instance_uid=outcome.sop_instance_uid,
            study_instance_uid=outcome.study_instance_uid,
            series_instance_uid=outcome.series_instance_uid,
            sop_class_uid=original.sop_class_uid if original else None,
            size=size,
            calling_ae_title=original.calling_ae_title if original else None,
            received_at=original.received_at if original else None,
        )

    entries = in_parallel(copy_one, list(outcomes))
    titles = sorted({entry.calling_ae_title for entry in entries if entry.calling_ae_title})
    write_manifest_once(
        s3,
        Manifest(
            batch_id=new_batch_id,
            bucket=manifest.bucket,
            closed_by=CLOSED_BY_REQUEUE,
            closed_at=iso_millis(now),
            first_received_at=manifest.first_received_at,
            last_received_at=manifest.last_received_at,
            calling_ae_titles=tuple(titles),
            objects=tuple(sorted(entries, key=lambda entry: entry.key)),
            requeued_from=manifest.batch_id,
        ),
    )


def _summary_numbers(summary: Mapping[str, Any]) -> dict[str, int]:
    return {
        name: value
        for name, value in summary.items()
        if isinstance(value, int) and not isinstance(value, bool)
    }


def unconfirmed_outcomes(manifest: Manifest, job_id: str, error: Mapping[str, Any]) -> list[InstanceOutcome]:
    """Every instance of a COMPLETED job whose output never became readable: neither imported nor failed."""
    cause = str(error.get("Cause") or "no detail")
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        cause = str(json.loads(cause).get("errorMessage", cause))  # a Lambda's Cause is its error as JSON
    reason = (
        f"import job {job_id} COMPLETED but its output stayed unreadable ({cause});"
        " HealthImaging may have imported the instance: look the job up before sending it again"
    )
    return [
        InstanceOutcome(
            entry.key,
            entry.study_instance_uid,
            entry.series_instance_uid,
            entry.sop_instance_uid,
            UNCONFIRMED,
            reason=reason,
        )
        for entry in manifest.objects
    ]


def imported_by_completed_job(s3: S3Client, manifest: Manifest, state: Mapping[str, Any]) -> ImportedByJob | None:
    """What the batch's import job imported, where the workflow failed after the job COMPLETED (``state`` is the
    execution's, at RecordFailure: ProcessResults' retries ran out). None where no job completed or its output
    cannot be read now; this is the last step, so an error here is logged and the job's word is simply not had."""
    job, job_status = state.get("job") or {}, (state.get("jobStatus") or {}).get("jobStatus")
    if job_status != "COMPLETED" or "outputS3Uri" not in job or "jobId" not in job:
        return None
    job_id = str(job["jobId"])
    try:
        output = read_job_output(s3, str(job["outputS3Uri"]), job_id, completed=True)
    except (JobOutputNotReady, ClientError, BotoCoreError, ValueError) as error:
        logger.warning("job output unreadable; its imports not recorded", job_id=job_id, error=str(error))
        return None
    outcomes, _ = outcomes_from_output(manifest, output, None)
    return ImportedByJob(job_id, [o for o in outcomes if o.status in (IMPORTED, WARNING)])


def _stored_by_storedicom_first(
    s3: S3Client,
    manifest: Manifest,
    outcomes: list[InstanceOutcome],
    healthimaging: HealthImagingLookup | None,
    now: datetime,
) -> tuple[list[InstanceOutcome], dict[str, StoredByStoreDICOM]]:
    """Before an instance is recorded failed (or unconfirmed): if its object's tags say StoreDICOM stored it, or
    (forwarding on) HealthImaging says it holds it, it is in HealthImaging, and recorded so (by key). Tags or
    HealthImaging unreadable: the task is retried."""
    doubtful_keys = {o.key for o in outcomes if o.status in (FAILED, UNCONFIRMED)}
    doubtful = [entry for entry in manifest.objects if entry.key in doubtful_keys]
    if not doubtful:
        return outcomes, {}
    stored = stored_by_storedicom(s3, manifest.bucket, doubtful, healthimaging, retry_on_error=True, now=now)
    if stored:
        logger.info(
            "instances the import did not store were stored by StoreDICOM: recorded imported",
            batch_id=manifest.batch_id,
            instances=len(stored),
        )
    return [
        replace(
            o,
            status=WARNING if stored[o.key].warning else IMPORTED,
            image_set_id=stored[o.key].image_set_id,
            is_primary=stored[o.key].is_primary,
            reason=stored[o.key].warning,
            server_error=False,
        )
        if o.key in stored
        else o
        for o in outcomes
    ], stored


def record_results(
    event: Mapping[str, Any],
    s3: S3Client,
    table: Table,
    dicom_bucket: str,
    healthimaging: HealthImagingLookup | None,
    retention: Retention,
    now: datetime,
) -> Results:
    """Record the outcome of the finished job ``event`` names (ProcessResults' input) for its batch;
    ``healthimaging`` is asked about instances it would record failed where StoreDICOM forwarding is on."""
    batch_id = check_batch_id(str(event["batchId"]))
    job, state = event["job"], event["jobStatus"]
    job_id, job_status = str(job["jobId"]), str(state["jobStatus"])
    attempt = int(event.get("attempt", 1))
    manifest = read_manifest(s3, dicom_bucket, batch_id)
    job_failed_reason = None
    unmatched = 0
    summary: dict[str, Any] = {}
    if event.get("outputUnreadable"):
        # The state machine gave up waiting for the output of a COMPLETED job (JobOutputNotReady retried).
        outcomes = unconfirmed_outcomes(manifest, job_id, event.get("error") or {})
        job_failed_reason = outcomes[0].reason
    else:
        output = read_job_output(s3, str(job["outputS3Uri"]), job_id, completed=job_status == "COMPLETED")
        summary = output.summary
        if job_status == "FAILED":
            job_failed_reason = f"import job {job_id} FAILED: {state.get('message') or 'no message'}"
        outcomes, unmatched = outcomes_from_output(manifest, output, job_failed_reason)
    if unmatched:
        logger.warning("output lines that name no object of this batch", batch_id=batch_id, lines=unmatched)
    outcomes, stored = _stored_by_storedicom_first(s3, manifest, outcomes, healthimaging, now)

    server_failures = [o for o in outcomes if o.status == FAILED and o.server_error]
    requeue_id = None
    if server_failures and attempt == 1:
        requeue_id = claim_requeue_id(table, batch_id, now)
        # Copied and closed by a manifest before anything says "requeued": a requeued instance is always in
        # a batch that will be imported.
        requeue(s3, manifest, server_failures, requeue_id, now)
        logger.info("server failures re-queued", batch_id=batch_id, requeue_batch_id=requeue_id)
        requeued = {o.key for o in server_failures}
        outcomes = [
            replace(o, status=REQUEUED, requeued_to=requeue_id) if o.key in requeued else o for o in outcomes
        ]
    by_job = [o for o in outcomes if o.key not in stored]
    written = sum(in_parallel(lambda o: record_instance_outcome(table, batch_id, job_id, o, retention, now), by_job))
    written += record_stored_by_storedicom(table, manifest, stored, attempt, retention, now)
    if written < len(outcomes):
        logger.info(
            "instances taken over by a newer batch", batch_id=batch_id, skipped=len(outcomes) - written
        )

    counts = count_by_status(outcomes)
    if job_status == "FAILED":
        status = BATCH_FAILED
    elif counts[UNCONFIRMED]:
        status = BATCH_UNCONFIRMED
    elif counts[FAILED] or counts[REQUEUED]:
        status = BATCH_PARTIAL
    else:
        status = BATCH_IMPORTED
    extra: dict[str, Any] = {"jobId": job_id}
    if requeue_id:
        extra["requeueBatchId"] = requeue_id
    finish_batch(table, batch_id, status, counts, job_failed_reason, retention, now, extra)
    finish_job(
        table,
        batch_id,
        job_id,
        job_status,
        _summary_numbers(summary),
        state.get("message"),
        retention,
        now,
    )

    duration = None
    if state.get("endedAt") and job.get("submittedAt"):
        duration = max(
            0.0, (parse_iso(str(state["endedAt"])) - parse_iso(str(job["submittedAt"]))).total_seconds()
        )
    logger.info("batch finished", batch_id=batch_id, job_id=job_id, batch_status=status, counts=counts)
    return Results(status, counts, requeue_id, duration, unmatched)


