"""The stack's two halves agree: what the forwarding daemon's manifests say, the workflow records and the status
command reports.

The real daemon in S3 mode (moto_server as S3, the STOW-RS stand-in as HealthImaging, one instance refused), then
register_batch's own handler for each manifest against the workflow table on moto_server, then
`dicom-store-scp status`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from scp.import_status import command
from tests.functions.workflow import FakeContext, create_table, load_app
from tests.integration.test_s3_forwarding import STUDY, instances
from tests.support.corpus import read
from tests.support.daemon import Daemon, send_files
from tests.support.moto import MotoServer
from tests.support.s3 import parsed_manifests
from tests.support.stow import StowStandIn
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration


def test_a_split_batch_is_recorded_imported_where_storedicom_stored_it_and_left_to_its_job_elsewhere(
    tmp_path: Path, aws_env: MotoServer, bucket: str, standin: StowStandIn,
    forwarding_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    table = create_table(boto3.resource("dynamodb"), f"imports-{uuid.uuid4().hex[:12]}")
    sent = instances(tmp_path, 6)
    refused = str(read(sent[2]).SOPInstanceUID)
    standin.refuse_http = {refused}
    daemon = forwarding_daemon(BATCH_WINDOW_SECONDS="2")
    assert send_files(daemon, sent) == [0] * len(sent)
    wait_for(lambda: len(parsed_manifests(aws_env, bucket)) == 2, 30, "the split batch's manifest and its fallback's")
    assert daemon.stop() == 0
    register = load_app("register_batch", monkeypatch, {"TABLE_NAME": table.name, "DICOM_BUCKET": bucket})

    results: dict[str, dict[str, Any]] = {}
    for batch_id in sorted(parsed_manifests(aws_env, bucket)):
        key = f"manifests/{batch_id}.json"
        execution = f"arn:aws:states:us-east-1:123456789012:execution:import:{batch_id}"
        results[batch_id] = register.handler({"bucket": bucket, "key": key, "executionArn": execution}, FakeContext())

    assert sorted(result["storedByStoreDICOM"] for result in results.values()) == [False, True]
    capsys.readouterr()  # the functions' log lines
    code = command.main(["--study", STUDY, "--table", table.name, "--no-s3", "--json"], os.environ)
    report = json.loads(capsys.readouterr().out)
    assert (code, report["counts"]["received"], report["counts"]["imported"]) == (2, 6, 5)
    assert report["storedByStoreDICOM"] == 5
    by_state = {i["sopInstanceUid"]: i for i in report["instances"]}
    assert by_state[refused]["state"] == "batched" and by_state[refused]["storedBy"] is None  # its job comes next
    stored = [i for i in report["instances"] if i["state"] == "imported"]
    assert {i["imageSetId"] for i in stored} == {standin.image_set_id(STUDY)}
    assert all(i["storedBy"] == "StoreDICOM" and i["jobId"] is None for i in stored)
