"""start_import and check_import: HealthImaging answered by botocore's Stubber (requests checked against the
real API model), records in DynamoDB on moto_server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType

import pytest
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber

from tests.functions.conftest import Aws
from tests.functions.test_process_results import results_event
from tests.functions.workflow import (
    DATASTORE_ID,
    FIXTURE_BATCH,
    JOB_ID,
    ROLE_ARN,
    FakeContext,
    FaultStubber,
    batch_item,
    daemon_batch,
    instances,
    load_app,
    sop_uid,
    upload_job_output,
)

SUBMITTED = datetime(2026, 11, 23, 18, 59, 0, tzinfo=UTC)
EXECUTION = "arn:aws:states:us-east-1:123456789012:execution:import:first"
# The client token of EXECUTION's attempt: the batch id and the first 16 hex of sha256(EXECUTION).
TOKEN = f"{FIXTURE_BATCH}-50352b921882e7d0"


@pytest.fixture
def start_app(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_app("start_import", monkeypatch, aws.env(POLL_INTERVAL_SECONDS="30"))


@pytest.fixture
def stub(start_app: ModuleType) -> Iterator[FaultStubber]:
    with FaultStubber(start_app.MEDICAL_IMAGING) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def registered(aws: Aws, monkeypatch: pytest.MonkeyPatch, execution: str = EXECUTION) -> dict[str, object]:
    """The StartImportJob task's input: RegisterBatch's output and the execution ARN (as the ASL passes it)."""
    register = load_app("register_batch", monkeypatch, aws.env())
    batch = daemon_batch(aws.s3, aws.dicom_bucket)
    output = register.handler(
        {"bucket": aws.dicom_bucket, "key": batch.manifest_key, "executionArn": execution}, FakeContext()
    )
    return {**output, "executionArn": execution}


def expected_start(aws: Aws, token: str = TOKEN) -> dict[str, str]:
    return {
        "jobName": FIXTURE_BATCH,
        "datastoreId": DATASTORE_ID,
        "dataAccessRoleArn": ROLE_ARN,
        "clientToken": token,
        "inputS3Uri": f"s3://{aws.dicom_bucket}/batches/{FIXTURE_BATCH}/",
        "outputS3Uri": f"s3://{aws.results_bucket}/jobs/{FIXTURE_BATCH}/",
    }


def started_response() -> dict[str, object]:
    return {"datastoreId": DATASTORE_ID, "jobId": JOB_ID, "jobStatus": "SUBMITTED", "submittedAt": SUBMITTED}


def test_start_uses_the_batch_prefix_a_results_prefix_and_a_client_token_per_attempt(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, start_app: ModuleType, stub: Stubber
) -> None:
    batch = registered(aws, monkeypatch)
    stub.add_response("start_dicom_import_job", started_response(), expected_start(aws))

    output = start_app.handler(batch, FakeContext())

    assert output == {
        "jobId": JOB_ID,
        "datastoreId": DATASTORE_ID,
        "jobStatus": "SUBMITTED",
        "submittedAt": "2026-11-23T18:59:00.000Z",
        "outputS3Uri": f"s3://{aws.results_bucket}/jobs/{FIXTURE_BATCH}/",
        "pollIntervalSeconds": 30,
    }
    record = batch_item(aws.table, FIXTURE_BATCH)
    assert (record["status"], record["jobId"]) == ("importing", JOB_ID)
    job = aws.table.get_item(Key={"pk": f"BATCH#{FIXTURE_BATCH}", "sk": f"JOB#{JOB_ID}"})["Item"]
    assert (job["jobStatus"], job["datastoreId"]) == ("SUBMITTED", DATASTORE_ID)


def test_start_reports_the_age_of_the_batch(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, start_app: ModuleType, stub: Stubber
) -> None:
    batch = registered(aws, monkeypatch)
    stub.add_response("start_dicom_import_job", started_response(), expected_start(aws))
    now = datetime(2026, 11, 23, 18, 59, 1, 113000, tzinfo=UTC)

    started = start_app.start_import(batch, start_app.MEDICAL_IMAGING, aws.table, start_app.SETTINGS, now)

    assert started.batch_age_seconds == pytest.approx(120.0)
    assert batch_item(aws.table, FIXTURE_BATCH)["batchAgeAtImportSeconds"] == 120


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("ThrottlingException", "ImportThrottled"),
        ("ServiceQuotaExceededException", "ImportQuotaExceeded"),
        ("InternalServerException", "HealthImagingServerError"),
        ("AccessDeniedException", "ImportRejected"),
        ("ValidationException", "ImportRejected"),
        ("ResourceNotFoundException", "ImportRejected"),
        ("ConflictException", "ImportRejected"),
    ],
)
def test_start_errors_surface_under_the_names_the_state_machine_matches(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, start_app: ModuleType, stub: Stubber, code: str, name: str
) -> None:
    batch = registered(aws, monkeypatch)
    stub.add_client_error("start_dicom_import_job", code, "refused", 400, expected_params=expected_start(aws))

    with pytest.raises(Exception) as raised:
        start_app.handler(batch, FakeContext())

    assert type(raised.value).__name__ == name
    assert batch_item(aws.table, FIXTURE_BATCH)["status"] == "registered"  # nothing recorded as started


def test_a_retried_start_repeats_its_token_and_a_new_attempt_gets_a_new_one(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, start_app: ModuleType, stub: FaultStubber
) -> None:
    batch = registered(aws, monkeypatch)
    # The first answer is lost after HealthImaging created the job; the retry asks again with the same token.
    timeout = ReadTimeoutError(endpoint_url="https://medical-imaging.us-east-1.amazonaws.com")
    stub.add_transport_error("start_dicom_import_job", timeout, expected_start(aws))
    stub.add_response("start_dicom_import_job", started_response(), expected_start(aws))
    with pytest.raises(Exception, match="ReadTimeoutError") as raised:
        start_app.handler(batch, FakeContext())
    assert type(raised.value).__name__ == "HealthImagingUnreachable"
    assert batch_item(aws.table, FIXTURE_BATCH)["status"] == "registered"
    assert start_app.handler(batch, FakeContext())["jobId"] == JOB_ID

    # A deliberate re-import is a new execution: its token differs, so HealthImaging starts a new job.
    again = {**batch, "executionArn": EXECUTION.replace("first", "second")}
    token = start_app.client_token(FIXTURE_BATCH, again["executionArn"])
    assert token != TOKEN and len(token) <= 64
    stub.add_response("start_dicom_import_job", started_response(), expected_start(aws, token))
    start_app.handler(again, FakeContext())


@pytest.mark.parametrize(
    "error",
    [
        ReadTimeoutError(endpoint_url="https://medical-imaging.us-east-1.amazonaws.com"),
        EndpointConnectionError(endpoint_url="https://medical-imaging.us-east-1.amazonaws.com"),
        ConnectionClosedError(endpoint_url="https://medical-imaging.us-east-1.amazonaws.com"),
    ],
)
def test_transport_errors_are_named_for_the_retry(aws: Aws, check_app: ModuleType, error: Exception) -> None:
    with FaultStubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_transport_error("get_dicom_import_job", error)
        with pytest.raises(Exception) as raised:
            check_app.handler(poll_input(), FakeContext())
    assert type(raised.value).__name__ == "HealthImagingUnreachable"


def test_the_medical_imaging_client_does_not_retry_on_its_own(start_app: ModuleType) -> None:
    # The state machine's Retry waits out throttling; SDK retries would only add calls at 1 TPS.
    assert start_app.MEDICAL_IMAGING.meta.config.retries["total_max_attempts"] == 1
    # A hung call ends inside the function's 30 s as a named, retried error, not as a Lambda timeout.
    config = start_app.MEDICAL_IMAGING.meta.config
    assert config.connect_timeout + config.read_timeout < 30


@pytest.fixture
def check_app(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_app("check_import", monkeypatch, aws.env(IMPORT_TIMEOUT_HOURS="2"))


def job_properties(status: str, submitted: datetime | None, **extra: object) -> dict[str, object]:
    properties: dict[str, object] = {
        "jobId": JOB_ID,
        "jobName": FIXTURE_BATCH,
        "jobStatus": status,
        "datastoreId": DATASTORE_ID,
        "dataAccessRoleArn": ROLE_ARN,
        "inputS3Uri": "s3://dicom/batches/x/",
        "outputS3Uri": "s3://results/jobs/x/",
        **extra,
    }
    if submitted is not None:
        properties["submittedAt"] = submitted
    return {"jobProperties": properties}


def poll_input(submitted: str | None = "2026-11-23T18:59:00.000Z") -> dict[str, object]:
    """CheckImportJob's payload as the ASL builds it: the start response's submittedAt, the execution start."""
    return {
        "batchId": FIXTURE_BATCH,
        "datastoreId": DATASTORE_ID,
        "jobId": JOB_ID,
        "submittedAt": submitted,
        "executionStartedAt": "2026-11-23T18:58:13.200Z",
        "pollIntervalSeconds": 60,
    }


def check(check_app: ModuleType, aws: Aws, stub: Stubber, now: datetime, **payload: object) -> dict[str, object]:
    del stub  # the responses are queued on it
    return dict(
        check_app.check_import(
            {**poll_input(), **payload}, check_app.MEDICAL_IMAGING, aws.s3, aws.table, check_app.SETTINGS, now
        )
    )


@pytest.mark.parametrize("status", ["SUBMITTED", "IN_PROGRESS", "COMPLETED", "FAILED"])
def test_check_reports_each_job_status(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, check_app: ModuleType, status: str
) -> None:
    ended = {"endedAt": SUBMITTED + timedelta(minutes=3)} if status in ("COMPLETED", "FAILED") else {}
    message = {"message": "input not readable"} if status == "FAILED" else {}
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_response(
            "get_dicom_import_job",
            job_properties(status, SUBMITTED, **ended, **message),
            {"datastoreId": DATASTORE_ID, "jobId": JOB_ID},
        )
        result = check(check_app, aws, stub, SUBMITTED + timedelta(minutes=5))
    assert result["jobStatus"] == status
    assert result["endedAt"] == ("2026-11-23T19:02:00.000Z" if ended else None)
    assert result["message"] == message.get("message")
    assert (result["stuck"], result["waitSeconds"]) == (False, 60)


def test_the_wait_grows_with_the_jobs_age_up_to_fifteen_minutes(check_app: ModuleType) -> None:
    wait = check_app.next_wait_seconds
    assert [wait(timedelta(minutes=m), 60, False) for m in (1, 10, 20, 100, 150, 1000)] == [60, 60, 120, 600, 900, 900]
    assert wait(timedelta(hours=30), 60, True) == 3600
    assert wait(timedelta(minutes=1), 3600, False) == 3600  # never shorter than POLL_INTERVAL_SECONDS


def test_a_job_past_the_timeout_is_recorded_stuck_then_resolved_by_its_outcome(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, check_app: ModuleType
) -> None:
    batch = registered(aws, monkeypatch)
    aws.table.update_item(
        Key={"pk": f"BATCH#{FIXTURE_BATCH}", "sk": "BATCH"},
        UpdateExpression="SET #s = :s, jobId = :j",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":s": "importing", ":j": JOB_ID},
    )
    late = SUBMITTED + timedelta(hours=2, seconds=1)
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        # GetDICOMImportJob's submittedAt is optional: this answer has none, the start response's is used.
        stub.add_response("get_dicom_import_job", job_properties("IN_PROGRESS", None))
        stub.add_response("get_dicom_import_job", job_properties("IN_PROGRESS", None))
        first = check(check_app, aws, stub, late)
        again = check(check_app, aws, stub, late + timedelta(hours=1))

    assert (first["stuck"], first["waitSeconds"], first["jobStatus"]) == (True, 3600, "IN_PROGRESS")
    assert again["stuck"] is True
    record = batch_item(aws.table, FIXTURE_BATCH)
    assert record["status"] == "stuck" and JOB_ID in record["reason"] and "expiresAt" not in record
    recorded = instances(aws.table)
    assert {item["status"] for item in recorded.values()} == {"stuck"}
    assert "may still finish" in recorded[sop_uid(1)]["reason"]

    # HealthImaging finishes the job after all: its outcome replaces "stuck".
    results = load_app("process_results", monkeypatch, aws.env())
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "all_success")
    results.handler(results_event({"batchId": FIXTURE_BATCH, "attempt": batch["attempt"]}, output_uri), FakeContext())
    assert {item["status"] for item in instances(aws.table).values()} == {"imported"}
    assert batch_item(aws.table, FIXTURE_BATCH)["status"] == "imported"


def test_without_a_submitted_time_the_execution_start_counts(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, check_app: ModuleType
) -> None:
    registered(aws, monkeypatch)
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_response("get_dicom_import_job", job_properties("IN_PROGRESS", None))
        # 2 h after the execution started (18:58:13), but only 1 h 59 min after the unused submittedAt.
        result = check(check_app, aws, stub, datetime(2026, 11, 23, 20, 58, 14, tzinfo=UTC), submittedAt=None)
    assert result["stuck"] is True


def test_a_job_unfinished_a_week_after_it_was_declared_stuck_fails_the_batch(aws: Aws, check_app: ModuleType) -> None:
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_response("get_dicom_import_job", job_properties("IN_PROGRESS", SUBMITTED))
        with pytest.raises(Exception, match="still IN_PROGRESS 7 days after") as raised:
            check(check_app, aws, stub, SUBMITTED + timedelta(days=7, hours=2, seconds=1))
    assert type(raised.value).__name__ == "ImportJobStuck"


def test_check_throttling_is_named_for_the_retry(aws: Aws, check_app: ModuleType) -> None:
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_client_error("get_dicom_import_job", "ThrottlingException", "slow down", 400)
        with pytest.raises(Exception) as raised:
            check_app.handler(poll_input(), FakeContext())
    assert type(raised.value).__name__ == "ImportThrottled"


def test_stuck_instances_are_failed_with_the_reason_when_the_workflow_gives_up(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, check_app: ModuleType
) -> None:
    registered(aws, monkeypatch)
    aws.table.update_item(
        Key={"pk": f"BATCH#{FIXTURE_BATCH}", "sk": "BATCH"},
        UpdateExpression="SET #s = :s, jobId = :j",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":s": "importing", ":j": JOB_ID},
    )
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_response("get_dicom_import_job", job_properties("IN_PROGRESS", None))
        assert check(check_app, aws, stub, SUBMITTED + timedelta(hours=3))["stuck"] is True
    record_failure = load_app("record_failure", monkeypatch, aws.env())
    cause = json.dumps({"errorType": "ImportJobStuck", "errorMessage": f"import job {JOB_ID} still IN_PROGRESS"})
    state = {"batchId": FIXTURE_BATCH, "error": {"Error": "ImportJobStuck", "Cause": cause}}

    result = record_failure.handler({"executionArn": EXECUTION, "state": state}, FakeContext())

    assert result["instancesFailed"] == 10
    recorded = instances(aws.table)
    assert {item["status"] for item in recorded.values()} == {"failed"}
    assert recorded[sop_uid(1)]["reason"] == f"ImportJobStuck: import job {JOB_ID} still IN_PROGRESS"
