"""The sweeper on moto_server: abandoned batches get a manifest once; young and closed ones are left alone; objects
stored into a batch after it was sealed end up in exactly one late batch's manifest."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from common.manifest import iso_millis
from common.records import record_job_started, utc_now

from batch_contract.layout import late_batch_id, parse_object_key
from tests.functions.conftest import Aws
from tests.functions.test_process_results import register, results_event
from tests.functions.workflow import (
    DATASTORE_ID,
    FIXTURE_BATCH,
    JOB_ID,
    FakeContext,
    batch_item,
    daemon_batch,
    instances,
    load_app,
    object_key,
    sop_uid,
    unique,
    upload_job_output,
)

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
    assert app.handler({"source": "aws.scheduler"}, FakeContext()) == {
        "closed": [],
        "late": [],
        "reconciled": [],
        "rechecked": {"recorded": [], "unreadable": [], "ended": []},
    }


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


def reconcile(app: ModuleType, sfn: Any, now: datetime) -> list[str]:
    """The reconcile pass with the function's own settings and a 24 h lookback."""
    settings = app.SETTINGS
    return list(
        app.reconcile(
            app.S3, sfn, app.TABLE, settings.dicom_bucket, settings.state_machine_arn, now, settings.min_age_seconds, 24
        )
    )


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
    assert reconcile(app, sfn, now + timedelta(minutes=5)) == []
    later = now + timedelta(minutes=20)
    assert reconcile(app, sfn, later) == [lost.batch_id]

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

    assert reconcile(app, boto3.client("stepfunctions"), now + timedelta(hours=1)) == []
    assert executions(state_machine) == []


def listed_sop_uids(aws: Aws) -> Counter[str]:
    """How many manifests list each SOP Instance UID."""
    listed: Counter[str] = Counter()
    for entry in aws.s3.list_objects_v2(Bucket=aws.dicom_bucket, Prefix="manifests/").get("Contents", []):
        body = json.loads(aws.s3.get_object(Bucket=aws.dicom_bucket, Key=entry["Key"])["Body"].read())
        listed.update(str(item["sopInstanceUid"]) for item in body["objects"])
    return listed


def store_late(aws: Aws, batch_id: str, numbers: range) -> None:
    """Objects a live daemon stores into ``batch_id`` after the sweeper listed it."""
    for number in numbers:
        body = b"\0" * 128 + b"DICM" + number.to_bytes(4, "little")
        aws.s3.put_object(Bucket=aws.dicom_bucket, Key=object_key(batch_id, number), Body=body)


def test_objects_stored_after_the_sweeper_sealed_their_batch_are_put_into_its_late_batch_once_settled(
    aws: Aws, app: ModuleType, now: datetime
) -> None:
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=1), "0000000000000401"), 3, False)
    assert app.sweep(aws.s3, aws.dicom_bucket, now + timedelta(minutes=20), 900, 24) == [batch.batch_id]
    # Its daemon was alive after all: two more objects, whose copies it never made (S3 refused, or it died).
    store_late(aws, batch.batch_id, range(4, 6))
    late_id = late_batch_id(batch.batch_id)

    # Still young: its daemon may be copying them; the pass waits.
    assert app.recover_late(aws.s3, aws.dicom_bucket, now + timedelta(minutes=5), 900, 24) == []
    assert "Contents" not in aws.s3.list_objects_v2(Bucket=aws.dicom_bucket, Prefix=f"manifests/{late_id}")

    later = now + timedelta(minutes=20)
    assert app.recover_late(aws.s3, aws.dicom_bucket, later, 900, 24) == [late_id]
    late = manifest(aws, late_id)
    assert (late["closedBy"], late["lateFrom"], late["objectCount"]) == ("late", batch.batch_id, 2)
    assert [o["sopInstanceUid"] for o in late["objects"]] == [sop_uid(4), sop_uid(5)]
    for entry in late["objects"]:
        assert parse_object_key(entry["key"]).batch_id == late_id
        number = int(entry["sopInstanceUid"].rsplit(".", 1)[1])
        original = aws.s3.get_object(Bucket=aws.dicom_bucket, Key=object_key(batch.batch_id, number))
        copy = aws.s3.get_object(Bucket=aws.dicom_bucket, Key=entry["key"])
        assert copy["Body"].read() == original["Body"].read() and entry["bytes"] == original["ContentLength"]
        # The original's store time, not the copy's, stands for the receipt.
        stored = original["LastModified"].astimezone(UTC)
        assert entry["receivedAt"] == stored.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stored.microsecond // 1000:03d}Z"
    assert listed_sop_uids(aws) == Counter({sop_uid(n): 1 for n in range(1, 6)})

    # Idempotent, and the late batch is never taken for an abandoned batch of its own.
    assert app.recover_late(aws.s3, aws.dicom_bucket, later, 900, 24) == []
    assert app.sweep(aws.s3, aws.dicom_bucket, later, 900, 24) == []
    assert listed_sop_uids(aws) == Counter({sop_uid(n): 1 for n in range(1, 6)})


def test_what_a_late_batch_written_first_by_the_daemon_left_out_goes_on_along_the_chain(
    aws: Aws, app: ModuleType, now: datetime
) -> None:
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=1), "0000000000000402"), 2, False)
    assert app.sweep(aws.s3, aws.dicom_bucket, now + timedelta(minutes=20), 900, 24) == [batch.batch_id]
    store_late(aws, batch.batch_id, range(3, 6))
    first = late_batch_id(batch.batch_id)
    second = late_batch_id(first)
    # The daemon copied object 3 into the late batch and wrote its manifest; objects 4 and 5 came later. It then
    # began the late batch of that one: object 4's copy is there, object 5's never made (the daemon died).
    for number, into in ((3, first), (4, second)):
        source = {"Bucket": aws.dicom_bucket, "Key": object_key(batch.batch_id, number)}
        aws.s3.copy_object(Bucket=aws.dicom_bucket, Key=object_key(into, number), CopySource=source)
    rebuilt = app.manifest_from_listing(aws.s3, aws.dicom_bucket, first, now)
    assert rebuilt is not None
    written = replace(rebuilt[0], closed_by="late", late_from=batch.batch_id)
    assert app.write_manifest_once(aws.s3, written)

    assert app.recover_late(aws.s3, aws.dicom_bucket, now + timedelta(minutes=20), 900, 24) == [second]
    chained = manifest(aws, second)
    assert (chained["closedBy"], chained["lateFrom"]) == ("late", first)
    assert [o["sopInstanceUid"] for o in chained["objects"]] == [sop_uid(4), sop_uid(5)]
    assert listed_sop_uids(aws) == Counter({sop_uid(n): 1 for n in range(1, 6)})


def test_a_batch_whose_daemon_wrote_its_manifest_first_gets_no_late_batch(
    aws: Aws, app: ModuleType, now: datetime
) -> None:
    # The sweeper marked the batch and lost the race for its manifest: the daemon's lists every object it
    # acknowledged, and one it did not (its upload answered too late) must not be imported.
    batch = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(hours=1), "0000000000000403"), 2)
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=f"sealed/{batch.batch_id}", Body=b"")
    store_late(aws, batch.batch_id, range(3, 4))

    assert app.recover_late(aws.s3, aws.dicom_bucket, now + timedelta(hours=1), 900, 24) == []
    assert listed_sop_uids(aws) == Counter({sop_uid(1): 1, sop_uid(2): 1})


def test_the_late_object_pass_waits_for_the_seal_and_keeps_to_the_lookback_window(
    aws: Aws, app: ModuleType, now: datetime
) -> None:
    # Sealed by the sweeper, with an object stored after, but opened before a 24-hour lookback window.
    old = daemon_batch(aws.s3, aws.dicom_bucket, batch_id_at(now - timedelta(days=3), "0000000000000404"), 1, False)
    assert app.sweep(aws.s3, aws.dicom_bucket, now + timedelta(minutes=20), 900, 96) == [old.batch_id]
    store_late(aws, old.batch_id, range(2, 3))
    # Marked, but the run that marked it ended before its manifest: the sealing pass closes it, not this one.
    unsealed = batch_id_at(now - timedelta(hours=1), "0000000000000405")
    daemon_batch(aws.s3, aws.dicom_bucket, unsealed, 2, False)
    aws.s3.put_object(Bucket=aws.dicom_bucket, Key=f"sealed/{unsealed}", Body=b"")

    later = now + timedelta(minutes=20)
    assert app.recover_late(aws.s3, aws.dicom_bucket, later, 900, 24) == []
    assert app.recover_late(aws.s3, aws.dicom_bucket, later, 900, 96) == [late_batch_id(old.batch_id)]
    assert listed_sop_uids(aws) == Counter({sop_uid(1): 1, sop_uid(2): 1})


# --- Unconfirmed batches: a COMPLETED job whose output the workflow could not read -----------------------------
def unconfirmed_batch(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fixture batch registered, its job started, and its output never readable through the workflow's
    retries: ProcessResults has recorded it unconfirmed. Returns the job's output URI (nothing there yet)."""
    registered = register(aws, monkeypatch)
    output_uri = f"s3://{aws.results_bucket}/jobs/{FIXTURE_BATCH}/"
    job = {"jobId": JOB_ID, "datastoreId": DATASTORE_ID, "jobStatus": "SUBMITTED", "submittedAt": utc_now()}
    record_job_started(aws.table, FIXTURE_BATCH, job, output_uri, 60, utc_now())
    event = results_event(registered, output_uri)
    cause = json.dumps({"errorType": "JobOutputNotReady", "errorMessage": "not readable yet"})
    event.update(outputUnreadable=True, error={"Error": "JobOutputNotReady", "Cause": cause})
    load_app("process_results", monkeypatch, aws.env()).handler(event, FakeContext())
    assert batch_item(aws.table, FIXTURE_BATCH)["status"] == "unconfirmed"
    return output_uri


def recheck(app: ModuleType, aws: Aws, now: datetime, seconds_left: float = 290.0) -> dict[str, list[str]]:
    retention = app.Retention(30)
    rechecked = app.recheck_unconfirmed(
        aws.s3, aws.table, aws.dicom_bucket, app.HEALTHIMAGING, retention, now, lambda: seconds_left
    )
    return dict(rechecked.to_json())


NOTHING = {"recorded": [], "unreadable": [], "ended": []}


def test_an_unconfirmed_batch_is_read_again_hourly_and_its_late_output_recorded(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    unconfirmed_batch(aws, monkeypatch)
    became = utc_now()

    # A run short of time leaves it for the next; the first re-check finds the output still missing.
    assert recheck(app, aws, became + timedelta(minutes=10), seconds_left=60) == NOTHING
    assert recheck(app, aws, became + timedelta(minutes=10)) == {**NOTHING, "unreadable": [FIXTURE_BATCH]}
    assert {item["status"] for item in instances(aws.table).values()} == {"unconfirmed"}

    # The output appears; the runs within the hour leave the batch alone, the next one records it.
    upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    assert recheck(app, aws, became + timedelta(minutes=40)) == NOTHING
    assert recheck(app, aws, became + timedelta(minutes=71)) == {**NOTHING, "recorded": [FIXTURE_BATCH]}

    # What ProcessResults records for this output (test_process_results): 8 imported, 1 parked, 1 re-queued.
    recorded = instances(aws.table)
    assert Counter(item["status"] for item in recorded.values()) == {"imported": 8, "failed": 1, "requeued": 1}
    assert all(item["imageSetId"] for item in recorded.values() if item["status"] == "imported")
    batch = batch_item(aws.table, FIXTURE_BATCH)
    assert batch["status"] == "partial" and "reason" not in batch
    assert batch["gsi3pk"] == "STATUS#batch#partial" and batch["recheckCount"] == 2
    requeued = batch["requeueBatchId"]
    assert aws.s3.head_object(Bucket=aws.dicom_bucket, Key=f"manifests/{requeued}.json")["ContentLength"] > 0
    job = aws.table.get_item(Key={"pk": f"BATCH#{FIXTURE_BATCH}", "sk": f"JOB#{JOB_ID}"})["Item"]
    assert job["jobStatus"] == "COMPLETED" and job["summary"]["numberOfImportedFiles"] == 8

    # Recorded: no longer unconfirmed, never read again.
    assert recheck(app, aws, became + timedelta(hours=3)) == NOTHING


def test_an_unconfirmed_batch_whose_output_never_appears_stays_unconfirmed_once_re_checks_end(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    output_uri = unconfirmed_batch(aws, monkeypatch)
    became = utc_now()

    assert recheck(app, aws, became + timedelta(days=6, hours=23)) == {**NOTHING, "unreadable": [FIXTURE_BATCH]}
    assert recheck(app, aws, became + timedelta(days=7, hours=1)) == {**NOTHING, "ended": [FIXTURE_BATCH]}

    # Unconfirmed for good, never failed: HealthImaging may hold these instances; the reasons say so.
    batch = batch_item(aws.table, FIXTURE_BATCH)
    assert batch["status"] == "unconfirmed" and "recheckEndedAt" in batch
    assert JOB_ID in batch["reason"] and "re-checks have ended" in batch["reason"] and "7 days" in batch["reason"]
    recorded = instances(aws.table)
    assert {item["status"] for item in recorded.values()} == {"unconfirmed"}
    assert all("may have imported" in item["reason"] for item in recorded.values())

    # Ended: not read again, even once output appears.
    upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")
    assert output_uri.endswith(f"jobs/{FIXTURE_BATCH}/")
    assert recheck(app, aws, became + timedelta(days=7, hours=3)) == NOTHING
    assert {item["status"] for item in instances(aws.table).values()} == {"unconfirmed"}


def test_each_run_re_checks_a_bounded_number_of_batches(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType
) -> None:
    unconfirmed_batch(aws, monkeypatch)
    # Unconfirmed batches without their job's record (an older stack's, say): each costs a claim, never more.
    became = utc_now()
    for number in range(app.RECHECKS_PER_RUN + 2):
        batch_id = f"20261123T1{number:03d}00Z-{number:016x}"[:33]
        aws.table.put_item(
            Item={
                "pk": f"BATCH#{batch_id}",
                "sk": "BATCH",
                "batchId": batch_id,
                "status": "unconfirmed",
                "jobId": f"{number:032x}",
                "finishedAt": iso_millis(became),
                "gsi3pk": "STATUS#batch#unconfirmed",
                "gsi3sk": f"{iso_millis(became - timedelta(hours=1))}#{batch_id}",
            }
        )

    first = recheck(app, aws, became + timedelta(minutes=10))
    assert first == NOTHING  # the first ten claims went to the older, record-less batches
    claimed = [item for item in batches(aws.table) if "recheckedAt" in item]
    assert len(claimed) == app.RECHECKS_PER_RUN
    assert recheck(app, aws, became + timedelta(minutes=20)) == {**NOTHING, "unreadable": [FIXTURE_BATCH]}


def batches(table: Any) -> list[dict[str, Any]]:
    return [item for item in table.scan(ConsistentRead=True)["Items"] if item.get("sk") == "BATCH"]
