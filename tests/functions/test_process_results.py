"""process_results and record_failure on moto_server with realistic HealthImaging job outputs (fixtures/)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from common import job_results
from common.manifest import read_manifest
from common.records import Retention, register_batch, register_instances, utc_now

from tests.functions.conftest import Aws
from tests.functions.workflow import (
    DATASTORE_ID,
    FIXTURE_BATCH,
    JOB_ID,
    Batch,
    FakeContext,
    batch_item,
    daemon_batch,
    instances,
    load_app,
    sop_uid,
    stored_by_storedicom,
    stored_seconds_after_receipt,
    upload_job_output,
)

PRIMARY = "8f2a3c4d5e6f70819a0b1c2d3e4f5061"
NON_PRIMARY = "1c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f"
EXECUTION = "arn:aws:states:us-east-1:123456789012:execution:import:one"


def register(aws: Aws, monkeypatch: pytest.MonkeyPatch, batch_id: str = FIXTURE_BATCH) -> dict[str, Any]:
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id)
    event = {"bucket": aws.dicom_bucket, "key": batch.manifest_key, "executionArn": EXECUTION}
    return dict(app.handler(event, FakeContext()))


def results_event(registered: dict[str, Any], output_uri: str, status: str = "COMPLETED") -> dict[str, Any]:
    return {
        "batchId": registered["batchId"],
        "attempt": registered["attempt"],
        "job": {
            "jobId": JOB_ID,
            "datastoreId": "bd9e62ed2ef14b7d8a1a6b4f0f3c2d11",
            "submittedAt": "2026-11-23T18:59:00.000Z",
            "outputS3Uri": output_uri,
            "pollIntervalSeconds": 1,
        },
        "jobStatus": {
            "jobStatus": status,
            "endedAt": "2026-11-23T19:03:30.000Z",
            "message": "Could not access the input prefix" if status == "FAILED" else None,
        },
    }


@pytest.fixture
def app(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_app("process_results", monkeypatch, aws.env(RECORD_RETENTION_DAYS="30"))


def emitted_metrics(capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    """The CloudWatch EMF document Powertools printed, as name -> value."""
    for line in capsys.readouterr().out.splitlines():
        document = json.loads(line) if line.startswith("{") else {}
        if "_aws" in document:
            names = [m["Name"] for m in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]]
            assert document["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "DICOMStoreSCP"
            values = {name: document[name] for name in names}
            return {name: value[0] if isinstance(value, list) else value for name, value in values.items()}
    raise AssertionError("no metrics document printed")


def test_all_successes(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")
    capsys.readouterr()

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert result == {
        "batchStatus": "imported",
        "imported": 10,
        "warning": 0,
        "failed": 0,
        "requeued": 0,
        "unconfirmed": 0,
        "nonprimary": 0,
        "requeueBatchId": None,
    }
    recorded = instances(aws.table)
    assert {item["status"] for item in recorded.values()} == {"imported"}
    assert {item["imageSetId"] for item in recorded.values()} == {PRIMARY}
    first = recorded[sop_uid(1)]
    assert first["isPrimary"] is True and first["jobId"] == JOB_ID
    assert "gsi3pk" not in first  # imported and primary: nothing for an admin to look at
    assert int(first["expiresAt"]) > 0
    record = batch_item(aws.table, FIXTURE_BATCH)
    assert record["status"] == "imported" and record["outcomeCounts"]["imported"] == 10
    job = aws.table.get_item(Key={"pk": f"BATCH#{FIXTURE_BATCH}", "sk": f"JOB#{JOB_ID}"})["Item"]
    assert job["jobStatus"] == "COMPLETED" and job["summary"]["numberOfImportedFiles"] == 10
    assert emitted_metrics(capsys) == {
        "InstancesImported": 10.0,
        "InstancesFailed": 0.0,
        "InstancesWarning": 0.0,
        "InstancesNonPrimary": 0.0,
        "InstancesRequeued": 0.0,
        "InstancesUnconfirmed": 0.0,
        "ImportJobDurationSeconds": 270.0,
    }


def test_two_failures_out_of_ten_one_parked_one_requeued(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert (result["batchStatus"], result["imported"], result["failed"], result["requeued"]) == (
        "partial",
        8,
        1,
        1,
    )
    recorded = instances(aws.table)
    customer = recorded[sop_uid(4)]
    assert customer["status"] == "failed"
    assert customer["reason"].startswith("ValidationException: Transfer syntax")
    assert customer["gsi3pk"] == "STATUS#instance#failed"
    server = recorded[sop_uid(9)]
    requeue_id = result["requeueBatchId"]
    assert server["status"] == "requeued" and server["requeuedTo"] == requeue_id
    assert server["reason"].startswith("InternalServerException")

    # The re-queued object sits in a new batch closed by its own manifest: the workflow picks it up as any.
    new_key = f"batches/{requeue_id}/{server['studyInstanceUid']}/{server['seriesInstanceUid']}/{sop_uid(9)}.dcm"
    original = aws.s3.get_object(Bucket=aws.dicom_bucket, Key=server["key"])["Body"].read()
    assert aws.s3.get_object(Bucket=aws.dicom_bucket, Key=new_key)["Body"].read() == original
    manifest = json.loads(aws.s3.get_object(Bucket=aws.dicom_bucket, Key=f"manifests/{requeue_id}.json")["Body"].read())
    assert manifest["closedBy"] == "requeue" and manifest["requeuedFrom"] == FIXTURE_BATCH
    assert [o["key"] for o in manifest["objects"]] == [new_key]
    assert manifest["objects"][0]["callingAETitle"] == "CT01"

    # Running the same task again (a retry) re-queues into the same batch, not a second one.
    again = app.handler(results_event(registered, output_uri), FakeContext())
    assert again["requeueBatchId"] == requeue_id


def test_a_requeued_batch_is_not_requeued_again(aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    requeue_id = app.handler(results_event(registered, output_uri), FakeContext())["requeueBatchId"]

    register_app = load_app("register_batch", monkeypatch, aws.env())
    second = register_app.handler(
        {"bucket": aws.dicom_bucket, "key": f"manifests/{requeue_id}.json", "executionArn": EXECUTION + "-2"},
        FakeContext(),
    )
    assert second["attempt"] == 2
    assert instances(aws.table)[sop_uid(9)]["batchId"] == requeue_id
    # The second job fails the file on the server side again: this time it is parked as failed.
    item = instances(aws.table)[sop_uid(9)]
    key = f"batches/{requeue_id}/{item['studyInstanceUid']}/{item['seriesInstanceUid']}/{sop_uid(9)}.dcm"
    line = {"inputFile": key, "exception": {"exceptionType": "InternalServerException", "message": "again"}}
    folder = f"jobs/{requeue_id}/x-DicomImport-{JOB_ID}/"
    summary = {"jobSummary": {"numberOfScannedFiles": 1, "numberOfImportedFiles": 0, "numberOfFilesWithServerError": 1}}
    aws.s3.put_object(
        Bucket=aws.results_bucket, Key=folder + "job-output-manifest.json", Body=json.dumps(summary).encode()
    )
    aws.s3.put_object(
        Bucket=aws.results_bucket, Key=folder + "FAILURE/failure.ndjson", Body=(json.dumps(line) + "\n").encode()
    )
    result = app.handler(results_event(second, f"s3://{aws.results_bucket}/jobs/{requeue_id}/"), FakeContext())
    assert (result["failed"], result["requeued"], result["requeueBatchId"]) == (1, 0, None)
    assert instances(aws.table)[sop_uid(9)]["status"] == "failed"


def test_warnings_and_non_primary_image_sets(aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "warnings_nonprimary")

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert (result["batchStatus"], result["imported"], result["warning"], result["nonprimary"]) == (
        "imported",
        8,
        2,
        3,
    )
    recorded = instances(aws.table)
    coerced = recorded[sop_uid(2)]
    assert coerced["status"] == "warning" and "0xB000" in coerced["reason"]
    assert coerced["imageSetId"] == PRIMARY and coerced["gsi3pk"] == "STATUS#instance#warning"
    conflicting = recorded[sop_uid(9)]
    assert conflicting["status"] == "warning" and conflicting["isPrimary"] is False
    assert conflicting["imageSetId"] == NON_PRIMARY
    assert conflicting["gsi3pk"] == "STATUS#instance#nonprimary"
    assert recorded[sop_uid(8)]["gsi3pk"] == "STATUS#instance#nonprimary"
    assert recorded[sop_uid(8)]["status"] == "imported"


def test_a_failed_job_fails_every_instance_with_the_job_message(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert (result["batchStatus"], result["failed"]) == ("failed", 10)
    reasons = {item["reason"] for item in instances(aws.table).values()}
    assert reasons == {f"import job {JOB_ID} FAILED: Could not access the input prefix"}
    assert batch_item(aws.table, FIXTURE_BATCH)["reason"].endswith("Could not access the input prefix")


def test_a_second_job_of_the_batch_that_failed_leaves_what_the_first_imported(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    # Two executions of one batch each started a job: the first imported every instance, the second failed.
    registered = register(aws, monkeypatch)
    imported_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")
    app.handler(results_event(registered, imported_uri), FakeContext())
    failed_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")
    second = results_event(registered, failed_uri, "FAILED")
    second["job"]["jobId"] = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

    app.handler(second, FakeContext())

    recorded = instances(aws.table).values()
    assert {(item["status"], item["jobId"], item["imageSetId"]) for item in recorded} == {("imported", JOB_ID, PRIMARY)}


def test_an_instance_taken_over_by_a_newer_batch_keeps_its_newer_record(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")
    # The modality sent every slice again; a newer batch now owns the instances.
    register(aws, monkeypatch, "20261123T190500Z-0123456789abcdef")

    app.handler(results_event(registered, output_uri), FakeContext())

    assert {item["status"] for item in instances(aws.table).values()} == {"importing"}


def rewrite_input_files(
    aws: Aws, output_uri: str, form: Callable[[str], str], names: tuple[str, ...] = ("SUCCESS/success.ndjson",)
) -> None:
    """Rewrite every ``inputFile`` of the uploaded output files into another of the forms the service may use."""
    prefix = output_uri.split("/", 3)[3]
    for entry in aws.s3.list_objects_v2(Bucket=aws.results_bucket, Prefix=prefix)["Contents"]:
        if not entry["Key"].endswith(names):
            continue
        raw = aws.s3.get_object(Bucket=aws.results_bucket, Key=entry["Key"])["Body"].read().decode()
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        for line in lines:
            line["inputFile"] = form(line["inputFile"])
        body = "".join(json.dumps(line) + "\n" for line in lines)
        aws.s3.put_object(Bucket=aws.results_bucket, Key=entry["Key"], Body=body.encode())


INPUT_FILE_FORMS: dict[str, Callable[[Aws, str], str]] = {
    "full key": lambda aws, key: key,
    "s3 uri": lambda aws, key: f"s3://{aws.dicom_bucket}/{key}",
    "relative to the input prefix": lambda aws, key: key.removeprefix(f"batches/{FIXTURE_BATCH}/"),
    "relative with a leading slash": lambda aws, key: "/" + key.removeprefix(f"batches/{FIXTURE_BATCH}/"),
}


@pytest.mark.parametrize("form", sorted(INPUT_FILE_FORMS))
def test_every_form_of_input_file_names_its_instance(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, form: str
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    names = ("SUCCESS/success.ndjson", "FAILURE/failure.ndjson")
    rewrite_input_files(aws, output_uri, lambda key: INPUT_FILE_FORMS[form](aws, key), names)

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert (result["imported"], result["failed"], result["requeued"]) == (8, 1, 1)
    recorded = instances(aws.table)
    assert recorded[sop_uid(1)]["imageSetId"] == PRIMARY
    assert recorded[sop_uid(4)]["reason"].startswith("ValidationException")


def test_an_s3_uri_into_another_bucket_names_no_instance(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")
    rewrite_input_files(aws, output_uri, lambda key: f"s3://someone-elses-bucket/{key}")

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert result["imported"] == 0 and result["failed"] == 10


def test_record_failure_marks_the_batch_and_its_unfinished_instances(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    register(aws, monkeypatch)
    app = load_app("record_failure", monkeypatch, aws.env())
    cause = json.dumps({"errorType": "ImportRejected", "errorMessage": "AccessDeniedException: no access"})
    state = {"batchId": FIXTURE_BATCH, "error": {"Error": "ImportRejected", "Cause": cause}}

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    reason = "ImportRejected: AccessDeniedException: no access"
    assert result == {"batchId": FIXTURE_BATCH, "reason": reason, "instancesFailed": 10, "batchFailed": True}
    record = batch_item(aws.table, FIXTURE_BATCH)
    assert (record["status"], record["reason"], record["gsi3pk"]) == ("failed", reason, "STATUS#batch#failed")
    assert {item["status"] for item in instances(aws.table).values()} == {"failed"}


def test_record_failure_after_a_completed_job_records_what_the_job_imported(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ProcessResults' retries ran out (a table that kept refusing writes, say) after the job had imported eight of
    # the ten: those are in HealthImaging and recorded so; only the other two are failed, with the workflow's error.
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    app = load_app("record_failure", monkeypatch, aws.env())
    error = {"Error": "States.TaskFailed", "Cause": "retries ran out"}
    state = {**results_event(registered, output_uri), "error": error}

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert (result["instancesFailed"], batch_item(aws.table, FIXTURE_BATCH)["status"]) == (2, "failed")
    recorded = instances(aws.table)
    for number in (1, 2, 3, 5, 6, 7, 8, 10):
        record = recorded[sop_uid(number)]
        assert (record["status"], record["jobId"]) == ("imported", JOB_ID)
        assert record["imageSetId"] == PRIMARY
    for number in (4, 9):
        assert (recorded[sop_uid(number)]["status"], recorded[sop_uid(number)]["reason"]) == (
            "failed",
            "States.TaskFailed: retries ran out",
        )


def test_record_failure_before_registration_names_the_batch_from_the_event(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("record_failure", monkeypatch, aws.env())
    state = {
        "detail": {
            "bucket": {"name": aws.dicom_bucket},
            "object": {"key": f"manifests/{FIXTURE_BATCH}.json"},
        },
        "error": {"Error": "ManifestError", "Cause": "manifest lists no objects"},
    }

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert result["batchId"] == FIXTURE_BATCH and result["instancesFailed"] == 0
    assert batch_item(aws.table, FIXTURE_BATCH)["reason"] == "ManifestError: manifest lists no objects"


def test_record_failure_leaves_a_batch_owned_by_another_execution(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    register(aws, monkeypatch)
    app = load_app("record_failure", monkeypatch, aws.env())
    state = {"batchId": FIXTURE_BATCH, "error": {"Error": "States.Timeout", "Cause": ""}}

    app.handler({"executionArn": EXECUTION + "-other", "state": state}, FakeContext())

    assert batch_item(aws.table, FIXTURE_BATCH)["status"] == "registered"
    assert {item["status"] for item in instances(aws.table).values()} == {"importing"}


def manifest_event(aws: Aws, batch_id: str) -> dict[str, Any]:
    """The state at RegisterBatch's Catch: the S3 event, without a batch id."""
    return {"detail": {"bucket": {"name": aws.dicom_bucket}, "object": {"key": f"manifests/{batch_id}.json"}}}


def test_record_failure_records_a_stored_batch_whose_registration_was_cut_short_imported(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # RegisterBatch registered the batch and timed out before its instances, every retry too.
    batch = stored_by_storedicom(aws.s3, daemon_batch(aws.s3, aws.dicom_bucket, count=3, write_manifest=False))
    manifest = read_manifest(aws.s3, aws.dicom_bucket, batch.batch_id)
    register_batch(aws.table, manifest, EXECUTION, utc_now())
    app = load_app("record_failure", monkeypatch, aws.env(RECORD_RETENTION_DAYS="30"))
    state = {**manifest_event(aws, batch.batch_id), "error": {"Error": "States.Timeout", "Cause": ""}}

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert (result["instancesFailed"], result["batchFailed"]) == (0, False)
    record = batch_item(aws.table, batch.batch_id)
    assert (record["status"], record["storedBy"], record["outcomeCounts"]["imported"]) == ("imported", "StoreDICOM", 3)
    recorded = instances(aws.table)
    assert sorted(recorded) == [sop_uid(n) for n in (1, 2, 3)], "an instance StoreDICOM stored has no record"
    assert {(item["status"], item["storedBy"]) for item in recorded.values()} == {("imported", "StoreDICOM")}
    assert emitted_metrics(capsys)["BatchesFailed"] == 0


def test_record_failure_gives_a_failed_record_to_every_instance_a_cut_short_registration_left_without_one(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RegisterBatch registered the batch and failed before its instances, every retry too; the first slice was
    # sent again meanwhile, into a newer batch that has its record.
    register_batch(aws.table, read_manifest(aws.s3, aws.dicom_bucket, daemon_batch(aws.s3, aws.dicom_bucket).batch_id),
                   EXECUTION, utc_now())  # fmt: skip
    newer = daemon_batch(aws.s3, aws.dicom_bucket, "20261123T190500Z-00000000000000bb", count=1)
    manifest = read_manifest(aws.s3, aws.dicom_bucket, newer.batch_id)
    register_instances(aws.table, manifest, register_batch(aws.table, manifest, EXECUTION + "-newer", utc_now()),
                       Retention(30), utc_now())  # fmt: skip
    app = load_app("record_failure", monkeypatch, aws.env(RECORD_RETENTION_DAYS="30"))
    state = {**manifest_event(aws, FIXTURE_BATCH), "error": {"Error": "States.Timeout", "Cause": ""}}

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert result["instancesFailed"] == 9
    recorded = instances(aws.table)
    assert sorted(recorded) == sorted(sop_uid(n) for n in range(1, 11)), "an instance of the batch has no record"
    assert (recorded[sop_uid(1)]["batchId"], recorded[sop_uid(1)]["status"]) == (newer.batch_id, "importing")
    for number in range(2, 11):
        item = recorded[sop_uid(number)]
        assert (item["batchId"], item["status"], item["reason"]) == (FIXTURE_BATCH, "failed", "States.Timeout")
        assert item["gsi3pk"] == "STATUS#instance#failed" and "expiresAt" in item and item["receiptAt"]


def test_record_failure_leaves_the_record_of_a_stored_copy_newer_than_the_failed_batch(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweeper sealed a dead daemon's batch from its listing (receipt: S3's LastModified, before StoreDICOM's
    # answer); StoreDICOM's copy of the same instances is in another manifest. The sealed batch's import fails.
    stored = stored_by_storedicom(aws.s3, daemon_batch(aws.s3, aws.dicom_bucket, count=3, write_manifest=False))
    sealed = daemon_batch(aws.s3, aws.dicom_bucket, "20261123T185600Z-00000000000000aa", 3, write_manifest=False)
    for mine, theirs in zip(sealed.manifest["objects"], stored.manifest["objects"], strict=True):
        mine["receivedAt"] = stored_seconds_after_receipt(theirs["receivedAt"], 1)
    sealed.manifest["closedBy"] = "sweeper"
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=sealed.manifest_key, Body=json.dumps(sealed.manifest).encode())
    registration = load_app("register_batch", monkeypatch, aws.env())
    for batch, execution in ((stored, EXECUTION + "-stored"), (sealed, EXECUTION)):
        event = {"bucket": aws.dicom_bucket, "key": batch.manifest_key, "executionArn": execution}
        registration.handler(event, FakeContext())
    app = load_app("record_failure", monkeypatch, aws.env())
    state = {"batchId": sealed.batch_id, "error": {"Error": "ImportRejected", "Cause": "ValidationException"}}

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert (result["instancesFailed"], batch_item(aws.table, sealed.batch_id)["status"]) == (0, "failed")
    recorded = instances(aws.table)
    assert {(item["batchId"], item["status"]) for item in recorded.values()} == {(stored.batch_id, "imported")}


def test_a_completed_job_whose_output_is_not_there_yet_is_read_again_never_failed(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    output_uri = f"s3://{aws.results_bucket}/jobs/{FIXTURE_BATCH}/"
    event = results_event(registered, output_uri)

    with pytest.raises(Exception, match=r"not readable yet: job-output-manifest\.json") as raised:
        app.handler(event, FakeContext())
    assert type(raised.value).__name__ == "JobOutputNotReady"

    # The manifest appears first; its summary counts imported files whose success file is not there yet.
    upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    folder = f"jobs/{FIXTURE_BATCH}/{DATASTORE_ID}-DicomImport-{JOB_ID}/"
    for name in ("SUCCESS/success.ndjson", "FAILURE/failure.ndjson"):
        body = aws.s3.get_object(Bucket=aws.results_bucket, Key=folder + name)["Body"].read()
        aws.s3.delete_object(Bucket=aws.results_bucket, Key=folder + name)
        with pytest.raises(Exception, match="not readable yet") as raised:
            app.handler(event, FakeContext())
        assert type(raised.value).__name__ == "JobOutputNotReady"
        assert {item["status"] for item in instances(aws.table).values()} == {"importing"}
        aws.s3.put_object(Bucket=aws.results_bucket, Key=folder + name, Body=body)

    result = app.handler(event, FakeContext())
    assert (result["imported"], result["failed"], result["requeued"]) == (8, 1, 1)


def test_output_that_never_appears_leaves_the_instances_unconfirmed_not_failed(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    event = results_event(registered, f"s3://{aws.results_bucket}/jobs/{FIXTURE_BATCH}/")
    cause = json.dumps({"errorType": "JobOutputNotReady", "errorMessage": "not readable yet"})
    event.update(outputUnreadable=True, error={"Error": "JobOutputNotReady", "Cause": cause})

    result = app.handler(event, FakeContext())

    assert (result["batchStatus"], result["unconfirmed"], result["failed"], result["imported"]) == (
        "unconfirmed",
        10,
        0,
        0,
    )
    recorded = instances(aws.table)
    assert {item["status"] for item in recorded.values()} == {"unconfirmed"}
    assert all(JOB_ID in item["reason"] and "may have imported" in item["reason"] for item in recorded.values())
    assert "(not readable yet)" in recorded[sop_uid(1)]["reason"]
    assert recorded[sop_uid(1)]["gsi3pk"] == "STATUS#instance#unconfirmed"
    assert batch_item(aws.table, FIXTURE_BATCH)["status"] == "unconfirmed"


def server_failures_output(aws: Aws, batch: Batch) -> str:
    """A COMPLETED job whose every file failed on the service's side."""
    folder = f"jobs/{batch.batch_id}/{DATASTORE_ID}-DicomImport-{JOB_ID}/"
    summary = {
        "jobSummary": {
            "numberOfScannedFiles": len(batch.keys),
            "numberOfImportedFiles": 0,
            "numberOfFilesWithServerError": len(batch.keys),
        }
    }
    lines = [
        {"inputFile": key, "exception": {"exceptionType": "InternalServerException", "message": "try again"}}
        for key in batch.keys
    ]
    aws.s3.put_object(
        Bucket=aws.results_bucket, Key=folder + "job-output-manifest.json", Body=json.dumps(summary).encode()
    )
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    aws.s3.put_object(Bucket=aws.results_bucket, Key=folder + "FAILURE/failure.ndjson", Body=body)
    return f"s3://{aws.results_bucket}/jobs/{batch.batch_id}/"


REQUEUE_OBJECTS = 300


def test_a_large_requeue_copies_in_parallel_and_writes_its_manifest_before_marking(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    register_app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket, FIXTURE_BATCH, REQUEUE_OBJECTS)
    registered = register_app.handler(
        {"bucket": aws.dicom_bucket, "key": batch.manifest_key, "executionArn": EXECUTION}, FakeContext()
    )
    output_uri = server_failures_output(aws, batch)

    started = time.monotonic()
    result = app.handler(results_event(registered, output_uri), FakeContext())
    elapsed = time.monotonic() - started

    assert result["requeued"] == REQUEUE_OBJECTS
    requeue_id = result["requeueBatchId"]
    manifest = json.loads(aws.s3.get_object(Bucket=aws.dicom_bucket, Key=f"manifests/{requeue_id}.json")["Body"].read())
    assert manifest["objectCount"] == REQUEUE_OBJECTS
    originals = {o["key"].replace(FIXTURE_BATCH, requeue_id): o for o in batch.manifest["objects"]}
    assert sorted(originals) == [entry["key"] for entry in manifest["objects"]]
    for entry in manifest["objects"]:
        original = originals[entry["key"]]
        assert (entry["bytes"], entry["receivedAt"]) == (original["bytes"], original["receivedAt"])
    copied = aws.s3.list_objects_v2(Bucket=aws.dicom_bucket, Prefix=f"batches/{requeue_id}/")["KeyCount"]
    assert copied == REQUEUE_OBJECTS
    assert {item["status"] for item in instances(aws.table).values()} == {"requeued"}
    # 300 copies and 600 table writes against one moto_server process on a shared 2-core machine.
    print(f"requeue of {REQUEUE_OBJECTS} objects: {elapsed:.1f} s")
    assert elapsed < 60


def test_a_failed_copy_marks_nothing_requeued_and_writes_no_manifest(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    register_app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket, FIXTURE_BATCH, 20)
    registered = register_app.handler(
        {"bucket": aws.dicom_bucket, "key": batch.manifest_key, "executionArn": EXECUTION}, FakeContext()
    )
    output_uri = server_failures_output(aws, batch)
    aws.s3.delete_object(Bucket=aws.dicom_bucket, Key=batch.keys[7])  # this copy fails (NoSuchKey)

    with pytest.raises(Exception, match=r"NoSuchKey|Not Found|does not exist"):
        app.handler(results_event(registered, output_uri), FakeContext())

    assert {item["status"] for item in instances(aws.table).values()} == {"importing"}
    requeue_id = batch_item(aws.table, FIXTURE_BATCH)["requeueBatchId"]
    manifests = aws.s3.list_objects_v2(Bucket=aws.dicom_bucket, Prefix=f"manifests/{requeue_id}")
    assert manifests["KeyCount"] == 0

    # Once the object is back (or the retried task succeeds), the same re-queue batch is completed.
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=batch.keys[7], Body=b"\0" * 128 + b"DICM")
    result = app.handler(results_event(registered, output_uri), FakeContext())
    assert (result["requeued"], result["requeueBatchId"]) == (20, requeue_id)


def test_a_requeue_batch_registered_before_the_original_marks_keeps_its_instances(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    # The re-queue manifest is written first, so its own execution may register before the instances are marked.
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    requeue_id = job_results.claim_requeue_id(aws.table, FIXTURE_BATCH, app.utc_now())
    manifest = read_manifest(aws.s3, aws.dicom_bucket, FIXTURE_BATCH)
    output = job_results.read_job_output(aws.s3, output_uri, JOB_ID, True)
    failed = [o for o in job_results.outcomes_from_output(manifest, output, None)[0] if o.server_error]
    job_results.requeue(aws.s3, manifest, failed, requeue_id, app.utc_now())
    register_app = load_app("register_batch", monkeypatch, aws.env())
    register_app.handler(
        {"bucket": aws.dicom_bucket, "key": f"manifests/{requeue_id}.json", "executionArn": EXECUTION + "-requeue"},
        FakeContext(),
    )

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert result["requeueBatchId"] == requeue_id
    item = instances(aws.table)[sop_uid(9)]
    assert (item["batchId"], item["status"]) == (requeue_id, "importing")  # its new batch's import decides
