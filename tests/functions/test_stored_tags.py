"""An instance the workflow would record failed, whose S3 object's tags say StoreDICOM stored it, is recorded
imported by StoreDICOM (batch_contract/stored_tags.py), by process_results and record_failure on moto_server."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.stored_tags import TAG_WARNING, parse_stored_tags, stored_tags
from tests.functions.conftest import Aws
from tests.functions.test_process_results import EXECUTION, register, results_event
from tests.functions.workflow import (
    FIXTURE_BATCH,
    IMAGE_SET_ID,
    FakeContext,
    batch_item,
    instances,
    load_app,
    object_key,
    received_at,
    sop_uid,
    stored_seconds_after_receipt,
    upload_job_output,
)

NEWER_BATCH = "20261123T190500Z-0123456789abcdef"


def tag_stored(aws: Aws, number: int, warning: str | None = None, batch: str = FIXTURE_BATCH) -> str:
    """What the daemon writes once StoreDICOM stored object ``number`` of ``batch``; returns the stored time."""
    stored_at = stored_seconds_after_receipt(received_at(batch, number), 2)
    tags = stored_tags(StoredByStoreDICOM(stored_at, IMAGE_SET_ID, warning))
    aws.s3.put_object_tagging(Bucket=aws.dicom_bucket, Key=object_key(batch, number), Tagging={"TagSet": tags})
    return stored_at


@pytest.fixture
def app(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_app("process_results", monkeypatch, aws.env(RECORD_RETENTION_DAYS="30"))


def assert_stored_by_storedicom(record: dict[str, Any], stored_at: str, status: str = "imported") -> None:
    assert (record["status"], record["storedBy"], record["imageSetId"]) == (status, "StoreDICOM", IMAGE_SET_ID)
    assert record["storedAt"] == stored_at and record["batchId"] == FIXTURE_BATCH
    assert "jobId" not in record


def test_the_tags_carry_storedicoms_answer_within_what_s3_allows() -> None:
    answer = StoredByStoreDICOM("2026-11-23T18:57:03.113Z", IMAGE_SET_ID, "warning 0xB000 (coercion of data elements)")
    tags = stored_tags(answer)
    assert {tag["Key"]: tag["Value"] for tag in tags}[TAG_WARNING] == "warning 0xB000 coercion of data elements"
    assert parse_stored_tags(tags) == StoredByStoreDICOM(answer.stored_at, IMAGE_SET_ID, tags[2]["Value"])
    assert parse_stored_tags([]) is None
    assert parse_stored_tags([{"Key": "storedicom-stored-at", "Value": "yesterday"}]) is None
    # An image set id that is not ASCII letters and digits names none.
    assert parse_stored_tags([*tags[:1], {"Key": "storedicom-image-set", "Value": "../x"}]) == StoredByStoreDICOM(
        answer.stored_at, None, None
    )


def test_per_file_failures_of_instances_storedicom_stored_are_recorded_imported_by_it(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    # The daemon died with the batch open; the sweeper sealed it whole. The job failed object 4 (a customer error)
    # and object 9 (a server error, re-queued otherwise), both of which StoreDICOM had stored.
    registered = register(aws, monkeypatch)
    stored_at = {4: tag_stored(aws, 4), 9: tag_stored(aws, 9)}
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert (result["batchStatus"], result["imported"], result["failed"], result["requeued"]) == ("imported", 10, 0, 0)
    assert result["requeueBatchId"] is None
    recorded = instances(aws.table)
    for number, stamp in stored_at.items():
        assert_stored_by_storedicom(recorded[sop_uid(number)], stamp)
        assert "gsi3pk" not in recorded[sop_uid(number)] and "expiresAt" in recorded[sop_uid(number)]
    assert {recorded[sop_uid(n)].get("storedBy") for n in (1, 2, 3, 5, 6, 7, 8, 10)} == {None}


def test_a_failed_job_fails_only_what_storedicom_did_not_store(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    registered = register(aws, monkeypatch)
    stamps = {1: tag_stored(aws, 1), 2: tag_stored(aws, 2, warning="warning 0xB000 (coercion of data elements)")}
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert (result["batchStatus"], result["imported"], result["warning"], result["failed"]) == ("failed", 1, 1, 8)
    recorded = instances(aws.table)
    assert_stored_by_storedicom(recorded[sop_uid(1)], stamps[1])
    assert_stored_by_storedicom(recorded[sop_uid(2)], stamps[2], "warning")
    assert recorded[sop_uid(2)]["reason"] == "warning 0xB000 coercion of data elements"
    assert recorded[sop_uid(2)]["gsi3pk"] == "STATUS#instance#warning"
    assert {recorded[sop_uid(n)]["status"] for n in range(3, 11)} == {"failed"}


def test_a_newer_receipt_keeps_its_record_over_an_older_copy_storedicom_stored(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    # Object 1 was stored by StoreDICOM two seconds after its receipt; the modality sent every slice again later,
    # into a newer batch. The old batch's job fails: the newer receipt's record stays.
    registered = register(aws, monkeypatch)
    tag_stored(aws, 1)
    register(aws, monkeypatch, NEWER_BATCH)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert {(item["batchId"], item["status"]) for item in instances(aws.table).values()} == {(NEWER_BATCH, "importing")}


def test_record_failure_records_what_storedicom_stored_imported_and_fails_the_rest(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(aws, monkeypatch)
    stamps = {3: tag_stored(aws, 3), 7: tag_stored(aws, 7)}
    # A missing object (or tags that cannot be read) says nothing: that instance is failed, as known.
    aws.s3.delete_object(Bucket=aws.dicom_bucket, Key=object_key(FIXTURE_BATCH, 5))
    app = load_app("record_failure", monkeypatch, aws.env(RECORD_RETENTION_DAYS="30"))
    cause = json.dumps({"errorType": "ImportRejected", "errorMessage": "AccessDeniedException: no access"})
    state = {"batchId": FIXTURE_BATCH, "error": {"Error": "ImportRejected", "Cause": cause}}

    result = app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert (result["instancesFailed"], batch_item(aws.table, FIXTURE_BATCH)["status"]) == (8, "failed")
    recorded = instances(aws.table)
    for number, stamp in stamps.items():
        assert_stored_by_storedicom(recorded[sop_uid(number)], stamp)
    assert {recorded[sop_uid(n)]["status"] for n in (1, 2, 4, 5, 6, 8, 9, 10)} == {"failed"}


def test_record_failure_keeps_a_newer_receipts_record(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    register(aws, monkeypatch)
    tag_stored(aws, 1)
    register(aws, monkeypatch, NEWER_BATCH)
    app = load_app("record_failure", monkeypatch, aws.env())
    state = {"batchId": FIXTURE_BATCH, "error": {"Error": "States.Timeout", "Cause": ""}}

    app.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert {(item["batchId"], item["status"]) for item in instances(aws.table).values()} == {(NEWER_BATCH, "importing")}


def test_the_job_that_imported_an_instance_storedicom_stored_leaves_storedicoms_record(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    # The job's output was unreadable at first: the instances were recorded unconfirmed, object 3 from its tags as
    # StoreDICOM stored it. The re-check then reads the output, in which the same job imported all ten.
    registered = register(aws, monkeypatch)
    stamp = tag_stored(aws, 3)
    unreadable = results_event(registered, f"s3://{aws.results_bucket}/jobs/{FIXTURE_BATCH}/")
    unreadable.update(outputUnreadable=True, error={"Error": "JobOutputNotReady", "Cause": "not readable yet"})
    app.handler(unreadable, FakeContext())
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")

    result = app.handler(results_event(registered, output_uri), FakeContext())

    assert result["imported"] == 10
    recorded = instances(aws.table)
    # Whole: StoreDICOM's answer and image set, not the job's image set under StoreDICOM's name.
    assert_stored_by_storedicom(recorded[sop_uid(3)], stamp)
    assert {recorded[sop_uid(n)].get("storedBy") for n in range(1, 11) if n != 3} == {None}
    assert {recorded[sop_uid(n)]["status"] for n in range(1, 11)} == {"imported"}
