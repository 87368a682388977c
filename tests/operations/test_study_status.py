"""`dicom-store-scp status` against moto: records for every stage, exit codes, JSON and text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from common.records import FAILED, IMPORTED, REQUEUED, WARNING

from scp.import_status import command
from scp.import_status.report import EXIT_ATTENTION, STATES, Report
from scp.import_status.table import instance_from_item
from tests.operations.conftest import Aws
from tests.operations.pipeline import Pipeline, uid
from tests.support.moto import MotoServer

IMAGE_SET_1 = "b9f8a7e6d5c4b3a29180f7e6d5c4b3a2"
IMAGE_SET_2 = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"


def status(aws: Aws, *arguments: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = command.main([*arguments, "--table", aws.table.name, "--bucket", aws.bucket], os.environ)
    captured = capsys.readouterr()
    assert captured.out, captured.err
    return code, captured.out


def status_json(aws: Aws, *arguments: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code, out = status(aws, *arguments, "--json", capsys=capsys)
    return code, json.loads(out)


def sops(report: dict[str, Any], state: str) -> list[str]:
    return sorted(i["sopInstanceUid"] for i in report["instances"] if i["state"] == state)


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


def every_stage(aws: Aws, now: datetime, study: str) -> dict[str, list[str]]:
    """One study with instances in every stage; returns the SOP Instance UIDs expected in each state."""
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, now)
    series = f"{study}.1"
    sop = [f"{series}.{n}" for n in range(14)]
    first = pipeline.send(60, study, series, sop[1:7] + sop[12:14])
    job = pipeline.start_job(first)
    for number in (1, 2, 3):
        pipeline.outcome(first, job, sop[number], IMPORTED, IMAGE_SET_1, True)
    pipeline.outcome(first, job, sop[4], IMPORTED, IMAGE_SET_2, False)
    pipeline.outcome(first, job, sop[5], FAILED, reason="ValidationException: PixelData length mismatch")
    pipeline.outcome(first, job, sop[6], WARNING, IMAGE_SET_1, True, "0xB000: coerced StudyDate")
    pipeline.outcome(first, job, sop[12], REQUEUED, reason="InternalServerException: try again")
    pipeline.outcome(first, job, sop[13], FAILED, reason="ValidationException: not DICOM")
    pipeline.start_job(pipeline.send(30, study, series, sop[7:9]))  # importing
    pipeline.register(pipeline.send(20, study, series, [sop[9]]))  # registered, job not started
    pipeline.close(pipeline.send(10, study, series, [sop[10]]))  # manifest written, not registered
    pipeline.send(2, study, series, [sop[11], sop[5]])  # open batch; sop 5 sent again after its failure
    return {
        "registered": [sop[9]],
        "resent": [sop[5]],
        "imported": [sop[1], sop[2], sop[3], sop[6]],
        "nonprimary": [sop[4]],
        "failed": [sop[13]],
        "requeued": [sop[12]],
        "importing": sorted(sop[7:9]),
        "batched": sorted([sop[9], sop[10]]),
        "open": sorted([sop[5], sop[11]]),
        "stuck": [],
        "unconfirmed": [],
    }


def test_a_study_in_every_stage(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    study = uid(1)
    expected = every_stage(aws, now, study)

    code, report = status_json(aws, "--study", study, capsys=capsys)

    assert code == EXIT_ATTENTION == 1
    assert report["exitCode"] == 1 and report["verdict"] == "attention"
    assert report["counts"] == {
        "received": 13,
        "open": 2,
        "batched": 2,
        "importing": 2,
        "requeued": 1,
        "imported": 4,
        "nonprimary": 1,
        "failed": 1,
        "stuck": 0,
        "unconfirmed": 0,
    }
    for state in STATES:
        assert sops(report, state) == expected[state], state
    by_sop = {i["sopInstanceUid"]: i for i in report["instances"]}
    failed = by_sop[expected["failed"][0]]
    assert failed["reason"] == "ValidationException: not DICOM" and failed["jobId"]
    assert by_sop[expected["nonprimary"][0]]["imageSetId"] == IMAGE_SET_2
    assert by_sop[expected["imported"][3]]["reason"] == "0xB000: coerced StudyDate", "a warning stays visible"
    assert report["imageSets"] == [{"imageSetId": IMAGE_SET_1, "instances": 4}]
    oldest = report["oldestPending"]
    assert oldest["sopInstanceUid"] == expected["requeued"][0] and oldest["state"] == "requeued"
    assert 3590 <= oldest["waitingSeconds"] <= 3700, oldest
    assert report["s3Checked"] is True and report["bucket"] == aws.bucket


def test_the_table_alone_sees_only_what_the_workflow_registered(
    aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    study = uid(2)
    expected = every_stage(aws, now, study)
    code, report = status_json(aws, "--study", study, "--no-s3", capsys=capsys)
    assert code == 1
    assert report["s3Checked"] is False
    assert report["counts"]["open"] == 0
    assert sops(report, "batched") == expected["registered"], "registered, job not started"
    resent = {i["sopInstanceUid"]: i for i in report["instances"]}[expected["resent"][0]]
    assert resent["state"] == "failed", "without S3 the resend is unseen"


def test_human_readable_report(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    study = uid(3)
    expected = every_stage(aws, now, study)
    code, text = status(aws, "--study", study, capsys=capsys)
    assert code == 1
    assert text.startswith(f"Study {study}\n")
    assert "  received         13   (table " in text
    assert "  open batch        2   stored in S3, batch still open" in text
    assert f"Oldest not yet imported: {expected['requeued'][0]} (requeued, batch " in text
    # Received 6 s after its batch opened an hour before ``now``: waiting 59m 54s plus however long this test ran.
    ran = int((datetime.now(UTC) - now).total_seconds()) + 1
    waited = re.search(r"received 20[0-9-]+T[0-9:.]+Z, waiting (?:(59)m ([0-9]+)s|1h ([0-9]+)m)\n", text)
    assert waited, text
    minutes, seconds, past_the_hour = waited.groups()
    seconds_waited = 3540 + int(seconds) if minutes else 3600 + 60 * int(past_the_hour)
    assert 3594 <= seconds_waited <= 3594 + ran + 60 * (past_the_hour is not None)
    assert f"Failed: {expected['failed'][0]}: ValidationException: not DICOM" in text
    assert f"Non-primary: {expected['nonprimary'][0]} in image set {IMAGE_SET_2}" in text
    assert f"Image sets: {IMAGE_SET_1} (4)" in text
    assert text.endswith("Result: ATTENTION (exit 1)\n")


def test_everything_imported_exits_0(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, now)
    study, series = uid(4), uid(4, 1)
    sent = pipeline.send(15, study, series, [f"{series}.1", f"{series}.2"])
    job = pipeline.start_job(sent)
    pipeline.outcome(sent, job, f"{series}.1", IMPORTED, IMAGE_SET_1, True)
    pipeline.outcome(sent, job, f"{series}.2", WARNING, IMAGE_SET_1, True, "0xB006: elements discarded")
    code, report = status_json(aws, "--study", study, capsys=capsys)
    assert code == 0
    assert report["counts"]["imported"] == 2 and report["oldestPending"] is None
    assert report["verdict"] == "imported"


def test_instances_storedicom_stored_are_imported_with_their_image_set(
    aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, now)
    study, series = uid(14), uid(14, 1)
    sent = pipeline.send(15, study, series, [f"{series}.1", f"{series}.2", f"{series}.3"], calling="MR01")
    # StoreDICOM stored two of them, one with a warning; the daemon's split leaves the third to an import job.
    stored = {f"{series}.1": None, f"{series}.2": "B000 coercion of data elements"}
    fallback = pipeline.split(sent, stored, IMAGE_SET_1)
    assert fallback is not None and list(fallback.keys) == [f"{series}.3"]
    pipeline.register(sent)
    job = pipeline.start_job(fallback)
    pipeline.outcome(fallback, job, f"{series}.3", IMPORTED, IMAGE_SET_1, True)
    batches = {
        batch_id: aws.table.get_item(Key={"pk": f"BATCH#{batch_id}", "sk": "BATCH"})["Item"]
        for batch_id in (sent.batch.batch_id, fallback.batch.batch_id)
    }
    assert batches[sent.batch.batch_id]["fallbackBatchId"] == fallback.batch.batch_id
    assert batches[fallback.batch.batch_id]["fallbackFrom"] == sent.batch.batch_id

    code, report = status_json(aws, "--study", study, capsys=capsys)

    assert (code, report["verdict"]) == (0, "imported")
    assert report["counts"]["imported"] == 3 and report["storedByStoreDICOM"] == 2
    by_sop = {i["sopInstanceUid"]: i for i in report["instances"]}
    assert by_sop[f"{series}.1"]["storedBy"] == "StoreDICOM" and by_sop[f"{series}.1"]["jobId"] is None
    assert by_sop[f"{series}.2"]["reason"] == "B000 coercion of data elements"
    assert by_sop[f"{series}.3"]["storedBy"] is None and by_sop[f"{series}.3"]["jobId"] == job
    assert report["imageSets"] == [{"imageSetId": IMAGE_SET_1, "instances": 3}]
    code, text = status(aws, "--study", study, capsys=capsys)
    assert "Stored by StoreDICOM (no import job): 2 of the 3 imported\n" in text
    assert f"Warning (from StoreDICOM): {series}.2: B000 coercion of data elements\n" in text
    code, by_ae = status_json(aws, "--calling-ae", "MR01", "--since", "1h", capsys=capsys)
    assert (code, by_ae["counts"]["imported"], by_ae["storedByStoreDICOM"]) == (0, 3, 2)


def test_something_on_its_way_exits_2(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, now)
    study, series = uid(5), uid(5, 1)
    sent = pipeline.send(15, study, series, [f"{series}.1", f"{series}.2"])
    job = pipeline.start_job(sent)
    pipeline.outcome(sent, job, f"{series}.1", IMPORTED, IMAGE_SET_1, True)
    pipeline.send(1, study, series, [f"{series}.3"])
    code, report = status_json(aws, "--study", study, capsys=capsys)
    assert code == 2
    assert report["counts"] | {} == {**report["counts"], "importing": 1, "open": 1, "imported": 1}
    assert report["oldestPending"]["sopInstanceUid"] == f"{series}.2"
    assert 890 <= report["oldestPending"]["waitingSeconds"] <= 1000


def test_an_open_batch_alone_is_pending(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    study, series = uid(6), uid(6, 1)
    Pipeline(aws.s3, aws.table, aws.bucket, now).send(0.5, study, series, [f"{series}.1"])
    code, report = status_json(aws, "--study", study, capsys=capsys)
    assert code == 2
    assert sops(report, "open") == [f"{series}.1"]


def test_a_failure_only_exits_1(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, now)
    study, series = uid(7), uid(7, 1)
    sent = pipeline.send(15, study, series, [f"{series}.1"])
    pipeline.outcome(sent, pipeline.start_job(sent), f"{series}.1", FAILED, reason="ValidationException: x")
    code, report = status_json(aws, "--study", study, capsys=capsys)
    assert code == 1 and report["counts"]["failed"] == 1


def test_an_unknown_study_exits_3(aws: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = status(aws, "--study", uid(8), capsys=capsys)
    assert code == 3
    assert "Result: NOT FOUND (exit 3)" in text


def test_by_calling_ae_and_time_range(aws: Aws, now: datetime, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = Pipeline(aws.s3, aws.table, aws.bucket, now)
    study, series = uid(9), uid(9, 1)
    old = pipeline.send(60 * 30, study, series, [f"{series}.1"])  # 30 h ago: outside the default 24 h
    pipeline.outcome(old, pipeline.start_job(old), f"{series}.1", FAILED, reason="ValidationException: old")
    recent = pipeline.send(90, study, series, [f"{series}.2", f"{series}.3"])
    job = pipeline.start_job(recent)
    pipeline.outcome(recent, job, f"{series}.2", IMPORTED, IMAGE_SET_1, True)
    pipeline.outcome(recent, job, f"{series}.3", IMPORTED, IMAGE_SET_1, True)
    other = pipeline.send(5, uid(10), uid(10, 1), [uid(10, 1, 1)], calling="MR02")
    pipeline.close(other)
    pipeline.send(1, uid(11), uid(11, 1), [uid(11, 1, 1)], calling="CT01")  # open batch, sender in the file
    pipeline.send(1, uid(12), uid(12, 1), [uid(12, 1, 1)], calling="MR02")

    code, report = status_json(aws, "--calling-ae", "CT01", capsys=capsys)
    assert code == 2, report
    assert report["query"]["callingAETitle"] == "CT01"
    assert sorted(i["sopInstanceUid"] for i in report["instances"]) == sorted(
        [f"{series}.2", f"{series}.3", uid(11, 1, 1)]
    )
    assert report["counts"]["imported"] == 2 and report["counts"]["open"] == 1
    assert set(report["studies"]) == {study, uid(11)}

    code, report = status_json(aws, "--calling-ae", "CT01", "--since", "2d", "--until", "1h", capsys=capsys)
    assert code == 1, "the failure of 30 h ago is inside two days"
    assert sorted(i["sopInstanceUid"] for i in report["instances"]) == [f"{series}.1", f"{series}.2", f"{series}.3"]

    code, report = status_json(aws, "--calling-ae", "MR02", "--since", "10m", capsys=capsys)
    assert code == 2
    assert {i["sopInstanceUid"]: i["state"] for i in report["instances"]} == {
        uid(10, 1, 1): "batched",
        uid(12, 1, 1): "open",
    }

    since = (now - timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, report = status_json(aws, "--calling-ae", "CT02", "--since", since, capsys=capsys)
    assert code == 0 and report["counts"]["received"] == 0, "a quiet modality is not a failure"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--study", "1.2.x"], "--study: not a valid UID"),
        (["--calling-ae", "WAY_TOO_LONG_AE_TITLE"], "--calling-ae:"),
        (["--study", "1.2.3", "--since", "2h"], "--since and --until go with --calling-ae"),
        (["--calling-ae", "CT01", "--since", "yesterday"], "not a time: 'yesterday'"),
        (["--calling-ae", "CT01", "--since", "1h", "--until", "2h"], "--since is after --until"),
        (["--study", "1.2.3", "--calling-ae", "CT01"], "not allowed with argument"),
        ([], "one of the arguments --study --calling-ae is required"),
    ],
)
def test_invalid_configuration_exits_3(
    aws: Aws, arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = command.main([*arguments, "--table", aws.table.name], os.environ)
    except SystemExit as usage_error:  # argparse's own checks end the process
        code = int(str(usage_error.code))
    assert code == 3
    error = capsys.readouterr().err
    assert "invalid configuration" in error and message in error, error


def test_the_console_script_without_a_table_and_with_a_missing_one(moto: MotoServer) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in ("IMPORT_TABLE_NAME", "DICOM_BUCKET")}
    environment.update(moto.env())
    command = [sys.executable, "-m", "scp", "status", "--study", "1.2.3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 3
    assert "invalid configuration" in result.stderr and "IMPORT_TABLE_NAME" in result.stderr
    environment["IMPORT_TABLE_NAME"] = "no-such-table"
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 3
    assert "cannot read the import status" in result.stderr and "ResourceNotFoundException" in result.stderr


def test_the_console_script_reports_a_study(aws: Aws, now: datetime, moto: MotoServer) -> None:
    study = uid(13)
    every_stage(aws, now, study)
    environment = {**os.environ, **moto.env(), "IMPORT_TABLE_NAME": aws.table.name, "DICOM_BUCKET": aws.bucket}
    result = subprocess.run(
        [sys.executable, "-m", "scp", "status", "--study", study, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["counts"]["received"] == 13


@pytest.mark.parametrize(
    ("status", "state", "exit_code"),
    [("stuck", "stuck", 2), ("unconfirmed", "unconfirmed", 1)],
)
def test_stuck_and_unconfirmed_instances_are_never_reported_failed(status: str, state: str, exit_code: int) -> None:
    # A stuck job may still finish; an unconfirmed instance may well be in HealthImaging: neither is "failed".
    item = {"sopInstanceUid": "1.2.3", "studyInstanceUid": "1.2", "seriesInstanceUid": "1.2.9", "batchId": "b"}
    instance = instance_from_item({**item, "status": status}, {"b": status})
    assert instance.state == state
    report = Report({"studyInstanceUid": "1.2"}, "t", None, datetime.now(UTC), [instance])
    assert report.exit_code == exit_code
