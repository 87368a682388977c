"""register_batch against moto_server: one registration per batch, instance records, bad manifests."""

from __future__ import annotations

import json

import pytest

from tests.functions.conftest import Aws
from tests.functions.workflow import (
    FIXTURE_BATCH,
    IMAGE_SET_ID,
    Batch,
    FakeContext,
    batch_item,
    daemon_batch,
    instances,
    load_app,
    sop_uid,
    stored_by_storedicom,
    stored_seconds_after_receipt,
)

EXECUTION = "arn:aws:states:us-east-1:123456789012:execution:import:first"


def event(aws: Aws, key: str, execution: str = EXECUTION) -> dict[str, str]:
    return {"bucket": aws.dicom_bucket, "key": key, "executionArn": execution}


def test_a_closed_batch_is_registered_with_every_instance(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket)

    result = app.handler(event(aws, batch.manifest_key), FakeContext())

    assert result == {
        "batchId": batch.batch_id,
        "duplicate": False,
        "storedByStoreDICOM": False,
        "bucket": aws.dicom_bucket,
        "prefix": f"batches/{batch.batch_id}/",
        "attempt": 1,
        "objectCount": 10,
        "firstReceivedAt": "2026-11-23T18:57:01.113Z",
    }
    record = batch_item(aws.table, batch.batch_id)
    assert (record["status"], record["executionArn"], record["objectCount"]) == ("registered", EXECUTION, 10)
    recorded = instances(aws.table)
    assert sorted(recorded) == sorted(sop_uid(n) for n in range(1, 11))
    first = recorded[sop_uid(1)]
    assert first["status"] == "importing"
    assert first["gsi2pk"] == "AE#CT01" and first["gsi2sk"].startswith("2026-11-23T18:57:01.113Z#")
    assert first["gsi3pk"] == "STATUS#instance#importing"
    assert "expiresAt" not in first  # in-flight records never expire


def test_a_second_execution_for_the_same_batch_is_a_duplicate(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket)
    app.handler(event(aws, batch.manifest_key), FakeContext())

    again = app.handler(event(aws, batch.manifest_key, EXECUTION + "-duplicate"), FakeContext())

    assert again == {"batchId": batch.batch_id, "duplicate": True, "owner": EXECUTION}
    assert batch_item(aws.table, batch.batch_id)["executionArn"] == EXECUTION


def test_the_owning_execution_may_register_again(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    # A task retried after a lost response must not mistake its own registration for a duplicate.
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket)
    app.handler(event(aws, batch.manifest_key), FakeContext())

    assert app.handler(event(aws, batch.manifest_key), FakeContext())["duplicate"] is False


def test_a_manifest_from_another_bucket_is_refused(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app("register_batch", monkeypatch, aws.env(DICOM_BUCKET="somewhere-else"))
    batch = daemon_batch(aws.s3, aws.dicom_bucket)
    with pytest.raises(app.ManifestError, match="expected 'somewhere-else'"):
        app.handler(event(aws, batch.manifest_key), FakeContext())


def test_a_missing_variable_fails_at_cold_start(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TABLE_NAME", raising=False)
    env = aws.env()
    del env["TABLE_NAME"]
    with pytest.raises(Exception, match="TABLE_NAME: required"):
        load_app("register_batch", monkeypatch, env)


OLDER = "20261123T185700Z-00000000000000aa"  # a daemon's batch, sealed late by the sweeper
NEWER = "20261123T190500Z-00000000000000bb"  # the same slices, sent again later into another batch


def test_a_late_batch_never_takes_over_an_instance_a_newer_receipt_holds(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    newer = daemon_batch(aws.s3, aws.dicom_bucket, NEWER, 10)
    older = daemon_batch(aws.s3, aws.dicom_bucket, OLDER, 4)
    app.handler(event(aws, newer.manifest_key), FakeContext())

    late = app.handler(event(aws, older.manifest_key, EXECUTION + "-late"), FakeContext())

    assert late["duplicate"] is False and late["objectCount"] == 4
    recorded = instances(aws.table)
    assert {item["batchId"] for item in recorded.values()} == {NEWER}
    assert recorded[sop_uid(1)]["receiptAt"] == newer.manifest["objects"][0]["receivedAt"]
    # The late batch's own registration stays: its job imports, its outcomes find the instances held.
    assert batch_item(aws.table, OLDER)["objectCount"] == 4


def test_a_newer_receipt_takes_over_the_instance(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    older = daemon_batch(aws.s3, aws.dicom_bucket, OLDER, 4)
    newer = daemon_batch(aws.s3, aws.dicom_bucket, NEWER, 10)
    app.handler(event(aws, older.manifest_key), FakeContext())

    app.handler(event(aws, newer.manifest_key, EXECUTION + "-newer"), FakeContext())

    assert {item["batchId"] for item in instances(aws.table).values()} == {NEWER}
    # Registering the older batch again (a retried task of its execution) takes nothing back.
    app.handler(event(aws, older.manifest_key), FakeContext())
    assert {item["batchId"] for item in instances(aws.table).values()} == {NEWER}


FALLBACK = "20261123T185812Z-00000000000000cc"  # what StoreDICOM did not store of FIXTURE_BATCH's objects
WARNING_TEXT = "B000 coercion of data elements"


def test_a_batch_storedicom_stored_is_recorded_imported_and_needs_no_job(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env(RECORD_RETENTION_DAYS="30"))
    batch = daemon_batch(aws.s3, aws.dicom_bucket, count=4, write_manifest=False)
    stored_by_storedicom(aws.s3, batch, warnings={3: WARNING_TEXT}, fallback_batch_id=FALLBACK)

    result = app.handler(event(aws, batch.manifest_key), FakeContext())

    assert result["storedByStoreDICOM"] is True and result["objectCount"] == 4
    record = batch_item(aws.table, batch.batch_id)
    assert (record["status"], record["storedBy"], record["fallbackBatchId"]) == ("imported", "StoreDICOM", FALLBACK)
    assert record["outcomeCounts"]["imported"] == 3 and record["outcomeCounts"]["warning"] == 1
    assert record["gsi3pk"] == "STATUS#batch#imported" and "expiresAt" in record
    recorded = instances(aws.table)
    first, second, third = recorded[sop_uid(1)], recorded[sop_uid(2)], recorded[sop_uid(3)]
    assert (first["status"], first["imageSetId"], first["storedBy"]) == ("imported", IMAGE_SET_ID, "StoreDICOM")
    assert first["storedAt"] == stored_seconds_after_receipt(first["receivedAt"], 2)
    assert "gsi3pk" not in first and "jobId" not in first and "reason" not in first
    assert first["gsi2pk"] == "AE#CT01"  # found by the calling-AE report as any instance
    assert int(first["expiresAt"]) == int(record["expiresAt"])  # final records expire
    assert second["status"] == "imported" and "imageSetId" not in second  # StoreDICOM's answer named none
    assert (third["status"], third["reason"], third["gsi3pk"]) == ("warning", WARNING_TEXT, "STATUS#instance#warning")


def test_the_retried_registration_of_a_stored_batch_keeps_it_imported(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = stored_by_storedicom(aws.s3, daemon_batch(aws.s3, aws.dicom_bucket, count=3, write_manifest=False))
    app.handler(event(aws, batch.manifest_key), FakeContext())

    assert app.handler(event(aws, batch.manifest_key), FakeContext())["storedByStoreDICOM"] is True

    assert batch_item(aws.table, batch.batch_id)["status"] == "imported"
    assert {item["status"] for item in instances(aws.table).values()} == {"imported"}


def test_the_fallback_batch_is_imported_as_any_batch_and_names_where_it_came_from(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket, FALLBACK, 2, write_manifest=False)
    batch.manifest["fallbackFrom"] = FIXTURE_BATCH
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=batch.manifest_key, Body=json.dumps(batch.manifest).encode())

    result = app.handler(event(aws, batch.manifest_key), FakeContext())

    assert result["storedByStoreDICOM"] is False
    record = batch_item(aws.table, FALLBACK)
    assert (record["status"], record["fallbackFrom"]) == ("registered", FIXTURE_BATCH) and "storedBy" not in record
    assert {item["status"] for item in instances(aws.table).values()} == {"importing"}


def stored_copy_and_copy_sealed_before_it_was_stored(aws: Aws) -> tuple[Batch, Batch]:
    """A daemon died after StoreDICOM stored its objects and before it wrote their batch's manifest: the sweeper
    seals the batch from its listing (receipt = S3's LastModified, a moment after the daemon's receipt and before
    StoreDICOM's answer), and that batch is imported again. Another daemon's copy of the same instances, stored by
    StoreDICOM, is in a manifest of its own. Returns the stored batch and the sealed one."""
    stored = stored_by_storedicom(aws.s3, daemon_batch(aws.s3, aws.dicom_bucket, NEWER, 3, write_manifest=False))
    sealed = daemon_batch(aws.s3, aws.dicom_bucket, OLDER, 3, write_manifest=False)
    for mine, theirs in zip(sealed.manifest["objects"], stored.manifest["objects"], strict=True):
        mine["receivedAt"] = stored_seconds_after_receipt(theirs["receivedAt"], 1)
    sealed.manifest["closedBy"] = "sweeper"
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=sealed.manifest_key, Body=json.dumps(sealed.manifest).encode())
    return stored, sealed


def test_an_import_of_a_copy_received_before_storedicom_stored_it_never_replaces_the_stored_record(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    stored, sealed = stored_copy_and_copy_sealed_before_it_was_stored(aws)

    app.handler(event(aws, stored.manifest_key), FakeContext())
    app.handler(event(aws, sealed.manifest_key, EXECUTION + "-sealed"), FakeContext())

    recorded = instances(aws.table)
    assert {(item["batchId"], item["status"]) for item in recorded.values()} == {(NEWER, "imported")}


def test_a_stored_copy_takes_over_from_an_import_of_a_copy_received_before_it_was_stored(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same two batches registered the other way round: StoreDICOM's answer is the newer fact.
    app = load_app("register_batch", monkeypatch, aws.env())
    stored, sealed = stored_copy_and_copy_sealed_before_it_was_stored(aws)

    app.handler(event(aws, sealed.manifest_key, EXECUTION + "-sealed"), FakeContext())
    app.handler(event(aws, stored.manifest_key), FakeContext())

    recorded = instances(aws.table)
    assert {(item["batchId"], item["status"]) for item in recorded.values()} == {(NEWER, "imported")}


def test_an_instance_sent_again_after_storedicom_stored_it_is_recorded_by_the_newer_copy(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    stored = stored_by_storedicom(aws.s3, daemon_batch(aws.s3, aws.dicom_bucket, OLDER, 3, write_manifest=False))
    again = daemon_batch(aws.s3, aws.dicom_bucket, NEWER, 3)  # minutes later, not stored by StoreDICOM
    app.handler(event(aws, stored.manifest_key), FakeContext())

    app.handler(event(aws, again.manifest_key, EXECUTION + "-again"), FakeContext())

    recorded = instances(aws.table)
    assert {(item["batchId"], item["status"]) for item in recorded.values()} == {(NEWER, "importing")}
    assert not any("storedBy" in item for item in recorded.values())  # the whole item is the newer copy's


def test_a_stored_time_that_is_no_timestamp_becomes_the_batch_closing_time(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket, count=2, write_manifest=False)
    stored_by_storedicom(aws.s3, batch)
    batch.manifest["objects"][0]["storeDICOM"]["storedAt"] = "yesterday"
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=batch.manifest_key, Body=json.dumps(batch.manifest).encode())

    app.handler(event(aws, batch.manifest_key), FakeContext())

    first = instances(aws.table)[sop_uid(1)]
    assert (first["status"], first["storedAt"]) == ("imported", batch.manifest["closedAt"])
