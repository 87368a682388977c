"""register_batch against moto_server: one registration per batch, instance records, bad manifests."""

from __future__ import annotations

import pytest

from tests.functions.conftest import Aws
from tests.functions.workflow import FakeContext, batch_item, daemon_batch, instances, load_app, sop_uid

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
