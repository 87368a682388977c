"""A forwarding daemon killed with its batch open: what StoreDICOM stored is never recorded failed.

The real daemon in S3 mode (moto_server as S3, the STOW-RS stand-in as HealthImaging, some instances refused) is
killed with SIGKILL after StoreDICOM stored the others; their objects carry StoreDICOM's answer in their tags. The
real sweeper seals the batch whole, register_batch registers it, and its import job fails (check_import answered
by botocore's Stubber): process_results, or record_failure when the workflow fails, records the instances
StoreDICOM stored imported by it with the stand-in's image set id, and the others failed, as
`dicom-store-scp status` reports.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from batch_contract.stored_tags import parse_stored_tags
from scp.import_status import command
from tests.functions.workflow import DATASTORE_ID, ROLE_ARN, FakeContext, create_table, load_app
from tests.integration.test_s3_forwarding import STUDY, instances
from tests.support.corpus import read
from tests.support.daemon import Daemon, send_files
from tests.support.moto import MotoServer
from tests.support.s3 import new_bucket, open_batch_ids, parsed_manifests, s3
from tests.support.stow import StowStandIn
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

JOB_ID = "5d08d05d6aab2a27922d6260926077d4"


def stored_tags(client: Any, bucket: str, keys: list[str]) -> dict[str, Any]:
    """Key -> StoreDICOM's answer, for the objects whose tags carry one."""
    found = {}
    for key in keys:
        answer = parse_stored_tags(client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"])
        if answer is not None:
            found[key] = answer
    return found


def failed_job(check: Any, batch_id: str, output_uri: str, now: datetime) -> dict[str, Any]:
    """check_import's report of the batch's job, which HealthImaging (the Stubber) says FAILED."""
    submitted = now - timedelta(minutes=5)
    properties = {
        "jobId": JOB_ID, "jobName": batch_id, "jobStatus": "FAILED", "datastoreId": DATASTORE_ID,
        "dataAccessRoleArn": ROLE_ARN, "inputS3Uri": f"s3://x/batches/{batch_id}/", "outputS3Uri": output_uri,
        "submittedAt": submitted, "endedAt": now - timedelta(minutes=1), "message": "internal failure of the job",
    }  # fmt: skip
    payload = {
        "batchId": batch_id, "datastoreId": DATASTORE_ID, "jobId": JOB_ID,
        "submittedAt": submitted.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "executionStartedAt": submitted.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "pollIntervalSeconds": 60,
    }  # fmt: skip
    with Stubber(check.MEDICAL_IMAGING) as stub:
        stub.add_response("get_dicom_import_job", {"jobProperties": properties}, {"datastoreId": DATASTORE_ID,
                                                                                   "jobId": JOB_ID})  # fmt: skip
        return dict(check.check_import(payload, check.MEDICAL_IMAGING, check.S3, check.TABLE, check.SETTINGS, now))


@pytest.mark.parametrize("recorder", ["process_results", "record_failure"])
def test_what_storedicom_stored_before_the_daemon_died_is_recorded_imported_when_the_import_job_fails(
    tmp_path: Path, aws_env: MotoServer, bucket: str, standin: StowStandIn,
    forwarding_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    recorder: str,
) -> None:  # fmt: skip
    stow = standin
    results_bucket = new_bucket(aws_env, "results")
    client = s3(aws_env)
    table = create_table(boto3.resource("dynamodb"), f"imports-{uuid.uuid4().hex[:12]}")
    sent = instances(tmp_path, 8)
    uids = [str(read(path).SOPInstanceUID) for path in sent]
    refused = set(uids[1:3])
    stow.refuse_http = refused
    daemon = forwarding_daemon(BATCH_WINDOW_SECONDS="600")  # the batch is still open when the daemon dies
    try:
        assert send_files(daemon, sent) == [0] * len(sent)
        (batch_id,) = open_batch_ids(aws_env, bucket)
        keys = {uid: f"batches/{batch_id}/{STUDY}/{STUDY}.1/{uid}.dcm" for uid in uids}
        stored_keys = [keys[uid] for uid in uids if uid not in refused]
        tagged = wait_for(
            lambda: (found := stored_tags(client, bucket, stored_keys)) and len(found) == len(stored_keys) and found,
            30,
            "every object StoreDICOM stored tagged so",
        )
        daemon.signal(signal.SIGKILL)
        daemon.wait(10)
    finally:
        daemon.stop()
    assert set(stow.arrivals()) >= set(uids) - refused
    assert stored_tags(client, bucket, [keys[uid] for uid in refused]) == {}, "a refused instance is not tagged"
    assert {answer.image_set_id for answer in tagged.values()} == {stow.image_set_id(STUDY)}

    env = {"TABLE_NAME": table.name, "DICOM_BUCKET": bucket, "RESULTS_BUCKET": results_bucket,
           "DATASTORE_ID": DATASTORE_ID, "DATA_ACCESS_ROLE_ARN": ROLE_ARN, "BATCH_WINDOW_SECONDS": "600",
           "STATE_MACHINE_ARN": "arn:aws:states:us-east-1:123456789012:stateMachine:import"}  # fmt: skip
    sweeper = load_app("sweeper", monkeypatch, env)
    now = datetime.now(UTC) + timedelta(hours=2)
    assert sweeper.sweep(sweeper.S3, bucket, now, 900, 72) == [batch_id]
    (sealed,) = parsed_manifests(aws_env, bucket).values()
    assert sealed.closed_by == "sweeper" and len(sealed.objects) == 8 and not sealed.stored_by_storedicom
    execution = f"arn:aws:states:us-east-1:123456789012:execution:import:{batch_id}"
    registered = load_app("register_batch", monkeypatch, env).handler(
        {"bucket": bucket, "key": f"manifests/{batch_id}.json", "executionArn": execution}, FakeContext()
    )

    if recorder == "process_results":
        output_uri = f"s3://{results_bucket}/jobs/{batch_id}/"
        job_status = failed_job(load_app("check_import", monkeypatch, env), batch_id, output_uri, now)
        assert job_status["jobStatus"] == "FAILED"
        event = {
            "batchId": batch_id, "attempt": registered["attempt"], "jobStatus": job_status,
            "job": {"jobId": JOB_ID, "datastoreId": DATASTORE_ID, "outputS3Uri": output_uri,
                    "submittedAt": job_status.get("submittedAt") or "2026-11-23T18:59:00.000Z"},
        }  # fmt: skip
        result = load_app("process_results", monkeypatch, env).handler(event, FakeContext())
        assert (result["batchStatus"], result["imported"], result["failed"]) == ("failed", 6, 2)
    else:
        state = {"batchId": batch_id, "error": {"Error": "HealthImagingServerError", "Cause": "the job failed"}}
        result = load_app("record_failure", monkeypatch, env).handler(
            {"executionArn": execution, "state": state}, FakeContext()
        )
        assert result["instancesFailed"] == 2

    capsys.readouterr()  # the functions' log lines
    code = command.main(["--study", STUDY, "--table", table.name, "--no-s3", "--json"], os.environ)
    report = json.loads(capsys.readouterr().out)
    assert (code, report["counts"]["received"], report["counts"]["imported"], report["counts"]["failed"]) == (
        1, 8, 6, 2
    )
    by_uid = {item["sopInstanceUid"]: item for item in report["instances"]}
    for uid in uids:
        if uid in refused:
            assert by_uid[uid]["state"] == "failed" and by_uid[uid]["storedBy"] is None
        else:
            assert (by_uid[uid]["state"], by_uid[uid]["storedBy"]) == ("imported", "StoreDICOM")
            assert by_uid[uid]["imageSetId"] == stow.image_set_id(STUDY)


def test_an_answer_after_its_batch_closed_is_tagged_on_the_fallback_copy_and_a_failed_fallback_job_keeps_it(
    tmp_path: Path, aws_env: MotoServer, bucket: str, standin: StowStandIn,
    forwarding_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    stow = standin
    client = s3(aws_env)
    table = create_table(boto3.resource("dynamodb"), f"imports-{uuid.uuid4().hex[:12]}")
    first, late = instances(tmp_path, 2), instances(tmp_path, 1)
    late_uid = str(read(late[0]).SOPInstanceUID)
    # Answered past the close's 10 s wait for requests under way: the instance goes to the fallback batch.
    stow.delay = {late_uid: 14.0}
    daemon = forwarding_daemon(BATCH_WINDOW_SECONDS="2")
    try:
        assert send_files(daemon, first) == [0, 0]
        wait_for(lambda: len(stow.arrivals()) == 2, 10, "StoreDICOM to store the first two")
        assert send_files(daemon, late) == [0]
        found = wait_for(
            lambda: len(m := parsed_manifests(aws_env, bucket)) == 2 and m, 30, "the split batch's manifests"
        )
        (fallback,) = [manifest for manifest in found.values() if manifest.fallback_from]
        (moved,) = fallback.objects
        assert moved.sop_instance_uid == late_uid
        answer = wait_for(
            lambda: stored_tags(client, bucket, [moved.key]).get(moved.key), 30, "the fallback copy tagged stored"
        )
    finally:
        daemon.stop()
    assert answer.image_set_id == stow.image_set_id(STUDY)

    env = {"TABLE_NAME": table.name, "DICOM_BUCKET": bucket}
    execution = f"arn:aws:states:us-east-1:123456789012:execution:import:{fallback.batch_id}"
    load_app("register_batch", monkeypatch, env).handler(
        {"bucket": bucket, "key": f"manifests/{fallback.batch_id}.json", "executionArn": execution}, FakeContext()
    )
    state = {"batchId": fallback.batch_id, "error": {"Error": "ImportRejected", "Cause": "the job failed"}}
    result = load_app("record_failure", monkeypatch, env).handler(
        {"executionArn": execution, "state": state}, FakeContext()
    )

    assert result["instancesFailed"] == 0
    (record,) = [item for item in table.scan()["Items"] if item.get("sopInstanceUid") == late_uid]
    assert (record["status"], record["storedBy"], record["imageSetId"]) == (
        "imported", "StoreDICOM", stow.image_set_id(STUDY)
    )
