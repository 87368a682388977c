"""The sweeper on moto_server: abandoned batches get a manifest once; young and closed ones are left alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

from tests.functions.conftest import Aws
from tests.functions.workflow import FakeContext, daemon_batch, load_app, unique

EVENTS = Path(__file__).resolve().parents[1] / "statemachine" / "events"


def batch_id_at(moment: datetime, suffix: str) -> str:
    return f"{moment.strftime('%Y%m%dT%H%M%SZ')}-{suffix}"


@pytest.fixture
def now(aws: Aws) -> datetime:
    """moto_server's clock: it stamps LastModified, which the sweeper compares with the batch ids and ``now``.

    Read from S3 rather than from this process, so that the tests hold whatever day and clock they run on.
    """
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key="clock-probe", Body=b"")
    stamped = aws.s3.head_object(Bucket=aws.dicom_bucket, Key="clock-probe")["LastModified"]
    aws.s3.delete_object(Bucket=aws.dicom_bucket, Key="clock-probe")
    return stamped.astimezone(UTC)


@pytest.fixture
def state_machine(aws: Aws) -> str:
    """A state machine on moto_server, which records the executions started (it does not run them)."""
    sfn = boto3.client("stepfunctions")
    definition = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})
    created = sfn.create_state_machine(
        name=unique("import"), definition=definition, roleArn="arn:aws:iam::123456789012:role/sfn"
    )
    return str(created["stateMachineArn"])


def sweeper_env(aws: Aws, state_machine: str, **extra: str) -> dict[str, str]:
    return aws.env(**{"STATE_MACHINE_ARN": state_machine, "BATCH_WINDOW_SECONDS": "60", **extra})


@pytest.fixture
def app(aws: Aws, monkeypatch: pytest.MonkeyPatch, state_machine: str) -> ModuleType:
    env = sweeper_env(aws, state_machine, SWEEP_MIN_AGE_SECONDS="900", SWEEP_LOOKBACK_HOURS="24")
    return load_app("sweeper", monkeypatch, env)


def manifest(aws: Aws, batch_id: str) -> dict[str, Any]:
    body = aws.s3.get_object(Bucket=aws.dicom_bucket, Key=f"manifests/{batch_id}.json")["Body"].read()
    return dict(json.loads(body))


def test_an_abandoned_batch_is_closed_with_a_manifest_rebuilt_from_its_keys(
    aws: Aws, app: ModuleType, now: datetime
) -> None:
    batch = daemon_batch(
        aws.s3,
        aws.dicom_bucket,
        batch_id_at(now - timedelta(hours=1), "00000000000000a1"),
        3,
        write_manifest=False,
    )
    # The daemon died a while ago: its newest object is older than the sweeper's minimum age.
    later = now + timedelta(minutes=20)

    closed = app.sweep(aws.s3, aws.dicom_bucket, later, 900, 24)

    assert closed == [batch.batch_id]
    written = manifest(aws, batch.batch_id)
    assert written["closedBy"] == "sweeper" and written["objectCount"] == 3
    assert written["callingAETitles"] == []
    assert [o["key"] for o in written["objects"]] == sorted(batch.keys)
    first = written["objects"][0]
    assert first["sopClassUid"] is None and first["callingAETitle"] is None
    stored = aws.s3.head_object(Bucket=aws.dicom_bucket, Key=first["key"])["LastModified"]
    # The time S3 stored it stands for its receipt.
    assert first["receivedAt"] == stored.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stored.microsecond // 1000:03d}Z"
    assert first["sopInstanceUid"] == batch.manifest["objects"][0]["sopInstanceUid"]
    assert written["byteCount"] == sum(o["bytes"] for o in batch.manifest["objects"])

    # Idempotent: the next run finds the manifest and writes nothing.
    assert app.sweep(aws.s3, aws.dicom_bucket, later, 900, 24) == []


def test_batches_with_recent_objects_are_left_open(aws: Aws, app: ModuleType, now: datetime) -> None:
    daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=1), "00000000000000b2"), 2, False)
    # The batch id is an hour old but its objects were just written: a daemon may still be filling it.
    assert app.sweep(aws.s3, aws.dicom_bucket, now + timedelta(minutes=1), 900, 24) == []


def test_young_closed_and_out_of_window_batches_are_not_touched(aws: Aws, app: ModuleType, now: datetime) -> None:
    closed = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=2), "00000000000000c3"), 2)
    daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(days=3), "00000000000000d4"), 2, False)
    daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now + timedelta(minutes=19), "00000000000000e5"), 2, False)
    before = manifest(aws, closed.batch_id)

    assert app.sweep(aws.s3, aws.dicom_bucket, now + timedelta(minutes=20), 900, 24) == []
    assert manifest(aws, closed.batch_id) == before


def test_a_manifest_already_written_by_the_daemon_is_never_replaced(aws: Aws, app: ModuleType, now: datetime) -> None:
    # The race: the sweeper rebuilt a manifest, the daemon wrote its own first. The conditional put loses.
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=1), "00000000000000f6"), 2, False)
    rebuilt = app.manifest_from_listing(aws.s3, aws.dicom_bucket, batch.batch_id, now)
    assert rebuilt is not None
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=batch.manifest_key, Body=json.dumps(batch.manifest).encode())

    assert app.write_manifest_once(aws.s3, rebuilt[0]) is False
    assert manifest(aws, batch.batch_id)["closedBy"] == "window"


def test_the_handler_sweeps_with_its_settings(aws: Aws, app: ModuleType, now: datetime) -> None:
    # Nothing is old enough yet under the real clock, so the scheduled run closes nothing and says so.
    daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now, "0000000000000107"), 1, False)
    daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now, "0000000000000108"), 1)
    assert app.handler({"source": "aws.scheduler"}, FakeContext()) == {"closed": [], "reconciled": []}


@pytest.mark.parametrize(("window", "expected"), [(60, 900), (300, 900), (3600, 4200)])
def test_the_minimum_age_follows_the_daemons_batch_window(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, state_machine: str, window: int, expected: int
) -> None:
    env = sweeper_env(aws, state_machine, SWEEP_MIN_AGE_SECONDS="900", BATCH_WINDOW_SECONDS=str(window))
    assert load_app("sweeper", monkeypatch, env).SETTINGS.min_age_seconds == expected


def test_a_batch_still_inside_a_long_window_is_never_sealed(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, state_machine: str, now: datetime
) -> None:
    # BatchWindowSeconds may be 3600: a daemon quiet for 20 minutes still owns its batch and may add to it.
    app = load_app("sweeper", monkeypatch, sweeper_env(aws, state_machine, BATCH_WINDOW_SECONDS="3600"))
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=2), "0000000000000208"), 2, False)
    min_age = app.SETTINGS.min_age_seconds

    for quiet in (timedelta(minutes=20), timedelta(minutes=61), timedelta(seconds=min_age - 5)):
        assert app.sweep(aws.s3, aws.dicom_bucket, now + quiet, min_age, 24) == [], quiet
    assert app.sweep(aws.s3, aws.dicom_bucket, now + timedelta(seconds=min_age + 5), min_age, 24) == [batch.batch_id]


def test_a_sweeper_without_its_settings_fails_at_cold_start_naming_each(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BATCH_WINDOW_SECONDS", "STATE_MACHINE_ARN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception, match=r"STATE_MACHINE_ARN: required.*BATCH_WINDOW_SECONDS: required"):
        load_app("sweeper", monkeypatch, aws.env())


def executions(state_machine: str) -> list[dict[str, Any]]:
    sfn = boto3.client("stepfunctions")
    listed = sfn.list_executions(stateMachineArn=state_machine)["executions"]
    return [dict(sfn.describe_execution(executionArn=e["executionArn"])) for e in listed]


def test_a_manifest_whose_trigger_was_lost_gets_its_workflow_started(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, state_machine: str, now: datetime
) -> None:
    lost = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=2), "0000000000000301"), 2)
    registered = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=2), "0000000000000302"), 2)
    load_app("register_batch", monkeypatch, aws.env()).handler(
        {"bucket": aws.dicom_bucket, "key": registered.manifest_key, "executionArn": "arn:x"}, FakeContext()
    )
    sfn = boto3.client("stepfunctions")

    # A fresh manifest is left to its own event; once settled, a manifest without a batch item is re-driven.
    assert app.reconcile(aws.s3, sfn, aws.table, app.SETTINGS, now + timedelta(minutes=5), 24) == []
    later = now + timedelta(minutes=20)
    assert app.reconcile(aws.s3, sfn, aws.table, app.SETTINGS, later, 24) == [lost.batch_id]

    (started,) = executions(state_machine)
    assert started["name"] == f"reconcile-{lost.batch_id}-{later.strftime('%Y%m%dT%H%M%SZ')}"
    event = json.loads(started["input"])
    template = json.loads((EVENTS / "manifest-created.json").read_text())
    assert set(event) <= set(template) and set(event["detail"]) <= set(template["detail"])
    assert event["detail-type"] == "Object Created" and event["source"] == "aws.s3"
    assert event["detail"]["bucket"] == {"name": aws.dicom_bucket}
    assert event["detail"]["object"]["key"] == lost.manifest_key
    assert event["detail"]["object"]["size"] > 0


def test_a_registered_or_out_of_window_manifest_is_not_re_driven(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, state_machine: str, now: datetime
) -> None:
    daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(days=3), "0000000000000303"), 1)
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=1), "0000000000000304"), 1)
    # A failed registration leaves a batch item too (record_failure writes it): nothing to re-drive either.
    aws.table.put_item(Item={"pk": f"BATCH#{batch.batch_id}", "sk": "BATCH", "status": "failed"})

    assert (
        app.reconcile(aws.s3, boto3.client("stepfunctions"), aws.table, app.SETTINGS, now + timedelta(hours=1), 24)
        == []
    )
    assert executions(state_machine) == []
