"""start_import and check_import: HealthImaging answered by botocore's Stubber (requests checked against the
real API model), records in DynamoDB on moto_server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType

import pytest
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber

from tests.functions.conftest import Aws
from tests.functions.workflow import (
    DATASTORE_ID,
    FIXTURE_BATCH,
    JOB_ID,
    ROLE_ARN,
    FakeContext,
    FaultStubber,
    batch_item,
    daemon_batch,
    load_app,
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
            check_app.handler(
                {"batchId": FIXTURE_BATCH, "datastoreId": DATASTORE_ID, "jobId": JOB_ID}, FakeContext()
            )
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


def job_properties(status: str, submitted: datetime, **extra: object) -> dict[str, object]:
    return {
        "jobProperties": {
            "jobId": JOB_ID,
            "jobName": FIXTURE_BATCH,
            "jobStatus": status,
            "datastoreId": DATASTORE_ID,
            "dataAccessRoleArn": ROLE_ARN,
            "submittedAt": submitted,
            "inputS3Uri": "s3://dicom/batches/x/",
            "outputS3Uri": "s3://results/jobs/x/",
            **extra,
        }
    }


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
        result = check_app.check_import(
            {"batchId": FIXTURE_BATCH, "datastoreId": DATASTORE_ID, "jobId": JOB_ID},
            check_app.MEDICAL_IMAGING,
            aws.table,
            check_app.SETTINGS,
            SUBMITTED + timedelta(minutes=5),
        )
    assert result["jobStatus"] == status
    assert result["endedAt"] == ("2026-11-23T19:02:00.000Z" if ended else None)
    assert result["message"] == message.get("message")


def test_a_job_running_past_the_timeout_is_reported_stuck(aws: Aws, check_app: ModuleType) -> None:
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_response("get_dicom_import_job", job_properties("IN_PROGRESS", SUBMITTED))
        with pytest.raises(Exception) as raised:
            check_app.check_import(
                {"batchId": FIXTURE_BATCH, "datastoreId": DATASTORE_ID, "jobId": JOB_ID},
                check_app.MEDICAL_IMAGING,
                aws.table,
                check_app.SETTINGS,
                SUBMITTED + timedelta(hours=2, seconds=1),
            )
    assert type(raised.value).__name__ == "ImportJobStuck"


def test_check_throttling_is_named_for_the_retry(aws: Aws, check_app: ModuleType) -> None:
    with Stubber(check_app.MEDICAL_IMAGING) as stub:
        stub.add_client_error("get_dicom_import_job", "ThrottlingException", "slow down", 400)
        with pytest.raises(Exception) as raised:
            check_app.handler(
                {"batchId": FIXTURE_BATCH, "datastoreId": DATASTORE_ID, "jobId": JOB_ID}, FakeContext()
            )
    assert type(raised.value).__name__ == "ImportThrottled"
