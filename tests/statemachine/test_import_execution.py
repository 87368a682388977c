"""Executes statemachines/import.asl.json in moto's Step Functions interpreter with the real Lambda handlers.

How: moto runs the state machine in-process (``execute_state_machine``). Its Lambda task calls AWS Lambda
through ``boto_client_for("lambda")``; moto cannot run Lambda code without Docker, so the test hands the
interpreter a Lambda endpoint that runs the real ``functions/<name>/app.py`` handler in this process and
answers as Lambda does (``FunctionError``, ``errorType`` = exception class name). HealthImaging, which moto
lacks, is reached only through our start_import/check_import functions, whose boto3 clients get botocore's
Stubber: each request is checked against the real medical-imaging model. S3 and DynamoDB are moto's in-process
backends. Retry intervals and Wait states are recorded instead of slept (moto sleeps them for real); a Wait
moves the functions' clock forward by its length instead, so hours of polling run in a moment.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import boto3
import pytest
import time_machine
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import ANY
from moto import mock_aws
from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils
from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction
from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for

from tests.functions.workflow import (
    DATASTORE_ID,
    FIXTURE_BATCH,
    IMAGE_SET_ID,
    JOB_ID,
    ROLE_ARN,
    FakeContext,
    FaultStubber,
    batch_item,
    create_table,
    daemon_batch,
    instances,
    load_app,
    sop_uid,
    stored_by_storedicom,
    upload_job_output,
)
from tests.support.waits import wait_for

ROOT = Path(__file__).resolve().parents[2]
ASL = ROOT / "statemachines" / "import.asl.json"
EVENT = Path(__file__).resolve().parent / "events" / "manifest-created.json"
REGION = "us-east-1"
FUNCTIONS = {
    "RegisterBatchFunctionArn": "register_batch",
    "StartImportFunctionArn": "start_import",
    "CheckImportFunctionArn": "check_import",
    "ProcessResultsFunctionArn": "process_results",
    "RecordFailureFunctionArn": "record_failure",
}
# The job is submitted as the test runs: the stuck-job check compares submittedAt with the functions' clock.
SUBMITTED = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
# What one more poll adds to an execution's history (Wait, Task, Choice); measured below, Step Functions allows
# 25,000 events per execution.
EVENTS_PER_POLL = 9
HISTORY_EVENT_LIMIT = 25_000


def load_app_module(name: str) -> ModuleType:
    """A function's module for its pure helpers (no AWS call at import needs more than the region)."""
    return load_app(name, pytest.MonkeyPatch(), {"TABLE_NAME": "t", "DICOM_BUCKET": "b", "AWS_DEFAULT_REGION": REGION})


def function_arn(placeholder: str) -> str:
    return f"arn:aws:lambda:{REGION}:123456789012:function:dicom-store-scp-{FUNCTIONS[placeholder]}"


def serve_functions(apps: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch) -> LambdaService:
    """Have moto's Step Functions interpreter invoke the real handlers of ``apps`` (by placeholder) at their ARNs;
    its other AWS calls go where moto sends them."""
    lambda_service = LambdaService({function_arn(p): app.handler for p, app in apps.items()})

    def client_for(region: str, service: str, state_credentials: Any = None) -> Any:
        if service == "lambda":
            return lambda_service
        return boto_client_for(region=region, service=service, state_credentials=state_credentials)

    monkeypatch.setattr(lambda_eval_utils, "boto_client_for", client_for)
    return lambda_service


def create_import_state_machine(sfn: Any, name: str) -> str:
    """statemachines/import.asl.json, every placeholder replaced by its function's ARN, as a state machine;
    returns its ARN."""
    definition = ASL.read_text()
    for placeholder in FUNCTIONS:
        definition = definition.replace("${" + placeholder + "}", function_arn(placeholder))
    assert not re.search(r"\$\{", definition), "a placeholder the test does not substitute"
    role = "arn:aws:iam::123456789012:role/sfn"
    return str(sfn.create_state_machine(name=name, definition=definition, roleArn=role)["stateMachineArn"])


class LambdaService:
    """AWS Lambda's Invoke: runs the real handler, reports errors the way the Python runtime does."""

    def __init__(self, handlers: dict[str, Callable[[Any, Any], Any]]) -> None:
        self.handlers = handlers
        self.calls: list[str] = []
        self.service_errors: dict[str, list[str]] = {}
        self.function_errors: dict[str, list[str]] = {}

    def invoke(self, FunctionName: str, Payload: bytes, **_: Any) -> dict[str, Any]:
        self.calls.append(FunctionName)
        pending = self.service_errors.get(FunctionName)
        if pending:
            code = pending.pop(0)
            response: Any = {
                "Error": {"Code": code, "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 429, "RequestId": "r"},
            }
            raise ClientError(response, "Invoke")
        failing = self.function_errors.get(FunctionName)
        if failing:
            # A function error as the runtime reports it: Sandbox.Timedout when it ended the function at its
            # timeout, the exception's class name when the function raised.
            error_type = failing.pop(0)
            body = {"errorType": error_type, "errorMessage": f"{error_type} (injected by the test)"}
            return {"StatusCode": 200, "FunctionError": "Unhandled", "Payload": io.BytesIO(json.dumps(body).encode())}
        try:
            result = self.handlers[FunctionName](json.loads(Payload), FakeContext())
        except Exception as error:  # the runtime turns any exception into a function error
            body = {"errorType": type(error).__name__, "errorMessage": str(error)}
            return {
                "StatusCode": 200,
                "FunctionError": "Unhandled",
                "Payload": io.BytesIO(json.dumps(body).encode()),
            }
        return {
            "StatusCode": 200,
            "ExecutedVersion": "$LATEST",
            "Payload": io.BytesIO(json.dumps(result).encode()),
        }


@dataclass
class Workflow:
    sfn: Any
    s3: Any
    table: Any
    state_machine_arn: str
    dicom_bucket: str
    results_bucket: str
    lambda_service: LambdaService
    start_stub: FaultStubber
    check_stub: FaultStubber
    retry_sleeps: list[float] = field(default_factory=list)
    waits: list[int] = field(default_factory=list)
    on_retry: list[Callable[[], None]] = field(default_factory=list)
    on_wait: list[Callable[[int], None]] = field(default_factory=list)

    def execution_arn(self, name: str) -> str:
        return self.state_machine_arn.replace(":stateMachine:", ":execution:") + ":" + name

    def trigger(self, batch_id: str = FIXTURE_BATCH, name: str | None = None) -> str:
        event = EVENT.read_text().replace("BUCKET", self.dicom_bucket).replace("BATCH", batch_id)
        # EventBridge names every execution uniquely: a redelivered event is a new execution, same input.
        name = name or uuid.uuid4().hex
        started = self.sfn.start_execution(stateMachineArn=self.state_machine_arn, name=name, input=event)
        return str(started["executionArn"])

    def finish(self, execution_arn: str) -> dict[str, Any]:
        def done() -> dict[str, Any]:
            described = self.sfn.describe_execution(executionArn=execution_arn)
            return dict(described) if described["status"] != "RUNNING" else {}

        return dict(wait_for(done, 60, f"execution {execution_arn} to finish", interval=0.1))

    def states_entered(self, execution_arn: str) -> list[str]:
        events = self.sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
        return [e["stateEnteredEventDetails"]["name"] for e in events if "stateEnteredEventDetails" in e]

    def expect_start(
        self,
        response: dict[str, Any] | None = None,
        error: str | Exception | None = None,
        execution_name: str | None = None,
        submitted: datetime = SUBMITTED,
    ) -> None:
        """The next StartDICOMImportJob; with ``execution_name``, its client token is checked exactly."""
        token = self.client_token(execution_name) if execution_name else ANY
        params = {
            "jobName": FIXTURE_BATCH,
            "datastoreId": DATASTORE_ID,
            "dataAccessRoleArn": ROLE_ARN,
            "clientToken": token,
            "inputS3Uri": f"s3://{self.dicom_bucket}/batches/{FIXTURE_BATCH}/",
            "outputS3Uri": f"s3://{self.results_bucket}/jobs/{FIXTURE_BATCH}/",
        }
        if isinstance(error, Exception):
            self.start_stub.add_transport_error("start_dicom_import_job", error, expected_params=params)
        elif error:
            self.start_stub.add_client_error("start_dicom_import_job", error, "refused", 400, expected_params=params)
        else:
            started = {
                "datastoreId": DATASTORE_ID,
                "jobId": JOB_ID,
                "jobStatus": "SUBMITTED",
                "submittedAt": submitted,
            }
            self.start_stub.add_response("start_dicom_import_job", response or started, params)

    def client_token(self, execution_name: str) -> str:
        return f"{FIXTURE_BATCH}-{hashlib.sha256(self.execution_arn(execution_name).encode()).hexdigest()[:16]}"

    def expect_status(self, status: str, message: str | None = None) -> None:
        properties: dict[str, Any] = {
            "jobId": JOB_ID,
            "jobName": FIXTURE_BATCH,
            "jobStatus": status,
            "datastoreId": DATASTORE_ID,
            "dataAccessRoleArn": ROLE_ARN,
            "submittedAt": SUBMITTED,
            "inputS3Uri": f"s3://{self.dicom_bucket}/batches/{FIXTURE_BATCH}/",
            "outputS3Uri": f"s3://{self.results_bucket}/jobs/{FIXTURE_BATCH}/",
        }
        if status in ("COMPLETED", "FAILED"):
            properties["endedAt"] = SUBMITTED + timedelta(minutes=4)
        if message:
            properties["message"] = message
        self.check_stub.add_response(
            "get_dicom_import_job",
            {"jobProperties": properties},
            {"datastoreId": DATASTORE_ID, "jobId": JOB_ID},
        )


@pytest.fixture
def workflow(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Workflow]:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # everything in-process, nothing on moto_server
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        s3 = boto3.client("s3", region_name=REGION)
        dicom_bucket, results_bucket = "dicom-store-scp-dicom", "dicom-store-scp-results"
        s3.create_bucket(Bucket=dicom_bucket)
        s3.create_bucket(Bucket=results_bucket)
        table = create_table(boto3.resource("dynamodb", region_name=REGION), "dicom-store-scp-imports")
        env = {
            "TABLE_NAME": table.name,
            "DICOM_BUCKET": dicom_bucket,
            "RESULTS_BUCKET": results_bucket,
            "DATASTORE_ID": DATASTORE_ID,
            "DATA_ACCESS_ROLE_ARN": ROLE_ARN,
            "POLL_INTERVAL_SECONDS": "1",
        }
        apps: dict[str, ModuleType] = {p: load_app(n, monkeypatch, env) for p, n in FUNCTIONS.items()}
        lambda_service = serve_functions(apps, monkeypatch)
        sleeps: list[float] = []
        on_retry: list[Callable[[], None]] = []

        def retry_sleep(seconds: float) -> None:
            sleeps.append(seconds)
            for hook in on_retry:
                hook()

        monkeypatch.setattr(retrier_decl, "time", SimpleNamespace(sleep=retry_sleep))
        clock = time_machine.travel(datetime.now(UTC), tick=True)
        traveller = clock.start()
        request.addfinalizer(clock.stop)
        waits: list[int] = []
        on_wait: list[Callable[[int], None]] = []

        def wait(self: WaitFunction, env: Any, wait_seconds: int) -> None:
            waits.append(wait_seconds)
            traveller.shift(timedelta(seconds=wait_seconds))
            for hook in on_wait:
                hook(wait_seconds)

        monkeypatch.setattr(WaitFunction, "_wait_interval", wait)

        sfn = boto3.client("stepfunctions", region_name=REGION)
        arn = create_import_state_machine(sfn, "dicom-store-scp-import")
        daemon_batch(s3, dicom_bucket)
        with (
            FaultStubber(apps["StartImportFunctionArn"].MEDICAL_IMAGING) as start_stub,
            FaultStubber(apps["CheckImportFunctionArn"].MEDICAL_IMAGING) as check_stub,
        ):
            flow = Workflow(
                sfn,
                s3,
                table,
                arn,
                dicom_bucket,
                results_bucket,
                lambda_service,
                start_stub,
                check_stub,
                sleeps,
                waits,
                on_retry,
                on_wait,
            )
            yield flow
            start_stub.assert_no_pending_responses()
            check_stub.assert_no_pending_responses()


def test_success(workflow: Workflow) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start()
    workflow.expect_status("IN_PROGRESS")
    workflow.expect_status("COMPLETED")

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert described["status"] == "SUCCEEDED", described
    output = json.loads(described["output"])
    assert output["results"]["batchStatus"] == "imported" and output["results"]["imported"] == 10
    assert workflow.states_entered(execution) == [
        "RegisterBatch",
        "IsDuplicateTrigger",
        "IsStoredByStoreDICOM",
        "StartImportJob",
        "WaitBeforeFirstCheck",
        "CheckImportJob",
        "IsImportJobFinished",
        "WaitForImportJob",
        "CheckImportJob",
        "IsImportJobFinished",
        "ProcessResults",
        "DidImportJobFail",
        "ImportFinished",
    ]
    assert {item["status"] for item in instances(workflow.table).values()} == {"imported"}
    assert batch_item(workflow.table, FIXTURE_BATCH)["status"] == "imported"


def test_partial_failure(workflow: Workflow) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "partial_failure")
    workflow.expect_start()
    workflow.expect_status("COMPLETED")

    described = workflow.finish(workflow.trigger())

    assert described["status"] == "SUCCEEDED", described
    results = json.loads(described["output"])["results"]
    assert (results["batchStatus"], results["imported"], results["failed"], results["requeued"]) == (
        "partial",
        8,
        1,
        1,
    )
    recorded = instances(workflow.table)
    assert recorded[sop_uid(4)]["status"] == "failed"
    assert recorded[sop_uid(9)]["status"] == "requeued"
    manifest_key = f"manifests/{results['requeueBatchId']}.json"
    assert workflow.s3.head_object(Bucket=workflow.dicom_bucket, Key=manifest_key)["ContentLength"] > 0


def test_job_failed(workflow: Workflow) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "job_failed")
    workflow.expect_start()
    workflow.expect_status("FAILED", "Unable to read input: access denied on the input prefix")

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert (described["status"], described.get("error")) == ("FAILED", "ImportJobFailed")
    assert workflow.states_entered(execution)[-2:] == ["DidImportJobFail", "ImportJobFailed"]
    assert {item["status"] for item in instances(workflow.table).values()} == {"failed"}
    assert "access denied" in batch_item(workflow.table, FIXTURE_BATCH)["reason"]


@pytest.mark.parametrize("error", ["ThrottlingException", "ServiceQuotaExceededException"])
def test_throttled_or_over_quota_start_is_waited_out(workflow: Workflow, error: str) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    for _ in range(3):
        workflow.expect_start(error=error)
    workflow.expect_start()
    workflow.expect_status("COMPLETED")
    # Lambda itself throttles the first status check once: a transient error retried as well.
    workflow.lambda_service.service_errors[function_arn("CheckImportFunctionArn")] = ["TooManyRequestsException"]

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert described["status"] == "SUCCEEDED", described
    assert workflow.lambda_service.calls.count(function_arn("StartImportFunctionArn")) == 4
    # Backoff with full jitter: each wait drawn from [0, 5 * 2^n] seconds, capped at MaxDelaySeconds (300).
    start_waits, check_wait = workflow.retry_sleeps[:3], workflow.retry_sleeps[3:]
    for attempt, slept in enumerate(start_waits):
        assert 0 <= slept <= min(5 * 2**attempt, 300)
    assert len(check_wait) == 1 and 0 <= check_wait[0] <= 2
    assert batch_item(workflow.table, FIXTURE_BATCH)["status"] == "imported"


def test_rejected_start_marks_the_batch_failed_with_the_reason(workflow: Workflow) -> None:
    workflow.expect_start(error="AccessDeniedException")

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert (described["status"], described.get("error")) == ("FAILED", "BatchFailed")
    assert workflow.states_entered(execution)[-3:] == ["StartImportJob", "RecordFailure", "BatchFailed"]
    assert workflow.lambda_service.calls.count(function_arn("StartImportFunctionArn")) == 1  # never retried
    record = batch_item(workflow.table, FIXTURE_BATCH)
    assert record["status"] == "failed"
    assert record["reason"] == "ImportRejected: AccessDeniedException: refused"
    assert {item["status"] for item in instances(workflow.table).values()} == {"failed"}


def test_duplicate_trigger_imports_once(workflow: Workflow) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start()  # one StartDICOMImportJob response only: a second call would fail the Stubber
    workflow.expect_status("COMPLETED")

    first = workflow.trigger()
    assert workflow.finish(first)["status"] == "SUCCEEDED"
    second = workflow.trigger()
    described = workflow.finish(second)

    assert described["status"] == "SUCCEEDED"
    assert workflow.states_entered(second) == ["RegisterBatch", "IsDuplicateTrigger", "DuplicateTrigger"]
    assert workflow.lambda_service.calls.count(function_arn("StartImportFunctionArn")) == 1
    assert batch_item(workflow.table, FIXTURE_BATCH)["executionArn"] == first


def test_a_batch_storedicom_stored_ends_recorded_imported_without_an_import_job(workflow: Workflow) -> None:
    batch = daemon_batch(workflow.s3, workflow.dicom_bucket, write_manifest=False)
    stored_by_storedicom(workflow.s3, batch, warnings={5: "B006 elements discarded"})
    # No StartDICOMImportJob expected: a call would fail the Stubber, and the fixture checks none is pending.

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert described["status"] == "SUCCEEDED", described
    assert workflow.states_entered(execution) == [
        "RegisterBatch",
        "IsDuplicateTrigger",
        "IsStoredByStoreDICOM",
        "StoredByStoreDICOM",
    ]
    assert workflow.lambda_service.calls == [function_arn("RegisterBatchFunctionArn")]
    recorded = instances(workflow.table)
    assert sorted(item["status"] for item in recorded.values()) == ["imported"] * 9 + ["warning"]
    assert {item["storedBy"] for item in recorded.values()} == {"StoreDICOM"}
    assert recorded[sop_uid(1)]["imageSetId"] == IMAGE_SET_ID
    assert batch_item(workflow.table, FIXTURE_BATCH)["status"] == "imported"


def test_transport_errors_are_retried_and_the_retried_start_keeps_its_token(workflow: Workflow) -> None:
    # HealthImaging created the job but its answer was lost; a poll then finds the endpoint unreachable.
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    endpoint = "https://medical-imaging.us-east-1.amazonaws.com"
    workflow.expect_start(error=ReadTimeoutError(endpoint_url=endpoint), execution_name="lost-answer")
    workflow.expect_start(execution_name="lost-answer")  # the same token: the same job comes back
    workflow.check_stub.add_transport_error("get_dicom_import_job", EndpointConnectionError(endpoint_url=endpoint))
    workflow.expect_status("COMPLETED")

    execution = workflow.trigger(name="lost-answer")
    described = workflow.finish(execution)

    assert described["status"] == "SUCCEEDED", described
    assert workflow.lambda_service.calls.count(function_arn("StartImportFunctionArn")) == 2
    assert workflow.lambda_service.calls.count(function_arn("CheckImportFunctionArn")) == 2
    assert len(workflow.retry_sleeps) == 2 and all(0 <= slept <= 5 for slept in workflow.retry_sleeps)
    assert {item["status"] for item in instances(workflow.table).values()} == {"imported"}


def test_a_manual_reimport_gets_a_new_client_token(workflow: Workflow) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start(execution_name="first-import")
    workflow.expect_status("COMPLETED")
    assert workflow.finish(workflow.trigger(name="first-import"))["status"] == "SUCCEEDED"

    # The documented re-import: delete the batch item, send the event again. A new token, so a new job.
    workflow.table.delete_item(Key={"pk": f"BATCH#{FIXTURE_BATCH}", "sk": "BATCH"})
    workflow.expect_start(execution_name="re-import")
    workflow.expect_status("COMPLETED")
    described = workflow.finish(workflow.trigger(name="re-import"))

    assert described["status"] == "SUCCEEDED", described
    assert workflow.client_token("first-import") != workflow.client_token("re-import")
    assert batch_item(workflow.table, FIXTURE_BATCH)["executionArn"] == workflow.execution_arn("re-import")


def test_a_poll_costs_nine_history_events_and_the_loop_fits_the_budget_for_any_timeout(
    workflow: Workflow,
) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start()
    for _ in range(3):
        workflow.expect_status("IN_PROGRESS")
    workflow.expect_status("COMPLETED")
    execution = workflow.trigger()
    assert workflow.finish(execution)["status"] == "SUCCEEDED"

    events = workflow.sfn.get_execution_history(executionArn=execution, maxResults=1000)["events"]
    entered = [
        i for i, e in enumerate(events) if e.get("stateEnteredEventDetails", {}).get("name") == "WaitForImportJob"
    ]
    assert len(entered) == 3
    assert {later - earlier for earlier, later in itertools.pairwise(entered)} == {EVENTS_PER_POLL}
    # A job minutes old and ageing with each wait: a tenth of its age, at least POLL_INTERVAL_SECONDS (1).
    polls = workflow.waits[1:]
    assert polls == sorted(polls) and 6 <= polls[0] <= 900, workflow.waits

    # Every poll until the give-up, for the extremes of IMPORT_TIMEOUT_HOURS and POLL_INTERVAL_SECONDS.
    check = load_app_module("check_import")
    for hours in (1, 24, 168):
        for interval in (1, 60, 3600):
            age, polls = timedelta(seconds=interval), 0
            deadline = timedelta(hours=hours)
            while age <= deadline + check.STUCK_POLL_LIMIT:
                polls += 1
                age += timedelta(seconds=check.next_wait_seconds(age, interval, age > deadline))
            # Room is left for the other states and for retries (3 events each).
            assert polls * EVENTS_PER_POLL < HISTORY_EVENT_LIMIT // 2, (hours, interval, polls)


def test_a_stuck_job_is_recorded_stuck_and_resolved_when_it_finishes(workflow: Workflow) -> None:
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start(submitted=SUBMITTED - timedelta(hours=24))  # past IMPORT_TIMEOUT_HOURS (24)
    workflow.expect_status("IN_PROGRESS")
    workflow.expect_status("IN_PROGRESS")
    workflow.expect_status("COMPLETED")
    seen: list[tuple[str, set[str]]] = []

    def record(wait_seconds: int) -> None:
        statuses = {item["status"] for item in instances(workflow.table).values()}
        seen.append((batch_item(workflow.table, FIXTURE_BATCH)["status"], statuses))

    workflow.on_wait.append(record)
    described = workflow.finish(workflow.trigger())

    assert described["status"] == "SUCCEEDED", described
    assert workflow.waits[1:] == [3600, 3600]
    assert seen[1:] == [("stuck", {"stuck"}), ("stuck", {"stuck"})]
    assert {item["status"] for item in instances(workflow.table).values()} == {"imported"}
    assert batch_item(workflow.table, FIXTURE_BATCH)["status"] == "imported"


def test_a_job_that_never_finishes_fails_its_batch_after_a_week_stuck(workflow: Workflow) -> None:
    workflow.expect_start(submitted=SUBMITTED - timedelta(days=8))
    workflow.expect_status("IN_PROGRESS")

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert (described["status"], described.get("error")) == ("FAILED", "BatchFailed")
    assert workflow.states_entered(execution)[-3:] == ["CheckImportJob", "RecordFailure", "BatchFailed"]
    record = batch_item(workflow.table, FIXTURE_BATCH)
    assert record["status"] == "failed" and record["reason"].startswith("ImportJobStuck: import job")
    assert {item["status"] for item in instances(workflow.table).values()} == {"failed"}


def test_output_that_appears_late_is_read_again(workflow: Workflow) -> None:
    workflow.expect_start()
    workflow.expect_status("COMPLETED")
    retries: list[None] = []

    def appear_on_the_third_read() -> None:
        retries.append(None)
        if len(retries) == 2:
            upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")

    workflow.on_retry.append(appear_on_the_third_read)
    described = workflow.finish(workflow.trigger())

    assert described["status"] == "SUCCEEDED", described
    assert workflow.lambda_service.calls.count(function_arn("ProcessResultsFunctionArn")) == 3
    assert {item["status"] for item in instances(workflow.table).values()} == {"imported"}


def test_output_that_never_appears_ends_unconfirmed_not_failed(workflow: Workflow) -> None:
    workflow.expect_start()
    workflow.expect_status("COMPLETED")

    execution = workflow.trigger()
    described = workflow.finish(execution)

    assert (described["status"], described.get("error")) == ("FAILED", "ImportUnconfirmed")
    assert workflow.states_entered(execution)[-3:] == ["ProcessResults", "RecordOutputUnreadable", "ImportUnconfirmed"]
    # 16 reads (the first and 15 retries, each wait drawn from [0, min(5 * 2^n, 120)] s), then the record.
    assert workflow.lambda_service.calls.count(function_arn("ProcessResultsFunctionArn")) == 17
    assert sum(min(5 * 2**n, 120) for n in range(15)) < 30 * 60
    assert {item["status"] for item in instances(workflow.table).values()} == {"unconfirmed"}
    assert batch_item(workflow.table, FIXTURE_BATCH)["status"] == "unconfirmed"


def test_a_lost_trigger_is_re_driven_by_the_sweeper_and_imported(
    workflow: Workflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest is written but its S3 event never started an execution.
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start()
    workflow.expect_status("COMPLETED")
    env = {"STATE_MACHINE_ARN": workflow.state_machine_arn, "BATCH_WINDOW_SECONDS": "60"}
    sweeper = load_app("sweeper", monkeypatch, env)
    later = datetime.now(UTC) + timedelta(minutes=20)

    opened = datetime.strptime(FIXTURE_BATCH[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    lookback = int((later - opened).total_seconds() // 3600) + 1  # back to the fixture batch, whatever the day
    settings = sweeper.SETTINGS
    targets = (settings.dicom_bucket, settings.state_machine_arn)
    started = sweeper.reconcile(
        workflow.s3, workflow.sfn, workflow.table, *targets, later, settings.min_age_seconds, lookback
    )

    assert started == [FIXTURE_BATCH]
    (execution,) = workflow.sfn.list_executions(stateMachineArn=workflow.state_machine_arn)["executions"]
    described = workflow.finish(execution["executionArn"])
    assert described["status"] == "SUCCEEDED", described
    assert {item["status"] for item in instances(workflow.table).values()} == {"imported"}
    # Registered now: the next run leaves it alone.
    again = sweeper.reconcile(
        workflow.s3, workflow.sfn, workflow.table, *targets, later, settings.min_age_seconds, lookback
    )
    assert again == []


def test_a_results_task_cut_off_at_its_timeout_runs_again(workflow: Workflow) -> None:
    # process_results is idempotent (outcomes from the output, the re-queue id fixed on the batch item), so a
    # run the Lambda runtime ended at its timeout is simply run again rather than failing imported instances.
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "partial_failure")
    workflow.expect_start()
    workflow.expect_status("COMPLETED")
    workflow.lambda_service.function_errors[function_arn("ProcessResultsFunctionArn")] = ["Sandbox.Timedout"]

    described = workflow.finish(workflow.trigger())

    assert described["status"] == "SUCCEEDED", described
    results = json.loads(described["output"])["results"]
    assert (results["imported"], results["failed"], results["requeued"]) == (8, 1, 1)


def test_a_transient_failure_of_the_results_task_is_tried_again(workflow: Workflow) -> None:
    # An S3 or DynamoDB error that outlasted the SDK's own retries: the job COMPLETED, so failing its instances
    # would be untrue; the idempotent task runs again instead.
    upload_job_output(workflow.s3, workflow.results_bucket, FIXTURE_BATCH, "all_success")
    workflow.expect_start()
    workflow.expect_status("COMPLETED")
    workflow.lambda_service.function_errors[function_arn("ProcessResultsFunctionArn")] = ["ReadTimeoutError"]
    workflow.lambda_service.function_errors[function_arn("RegisterBatchFunctionArn")] = ["ClientError"]

    described = workflow.finish(workflow.trigger())

    assert described["status"] == "SUCCEEDED", described
    assert workflow.lambda_service.calls.count(function_arn("ProcessResultsFunctionArn")) == 2
    assert workflow.lambda_service.calls.count(function_arn("RegisterBatchFunctionArn")) == 2
    assert {item["status"] for item in instances(workflow.table).values()} == {"imported"}
