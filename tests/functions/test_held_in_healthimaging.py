"""An instance the workflow would record failed, without StoreDICOM's tag, in a stack with forwarding on: HealthImaging
is asked (SearchImageSets, GetImageSetMetadata through botocore's Stubber) and what it holds is recorded imported;
process_results and record_failure on moto_server."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from common.held_in_healthimaging import LOOKUP_ATTEMPTS, HealthImagingUnreadable

from tests.functions.conftest import Aws
from tests.functions.test_process_results import EXECUTION, register, results_event
from tests.functions.workflow import (
    DATASTORE_ID,
    FIXTURE_BATCH,
    SERIES,
    STUDY,
    FakeContext,
    batch_item,
    instances,
    load_app,
    sop_uid,
    upload_job_output,
)

PRIMARY_SET = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
UPDATED_AT = datetime(2026, 11, 23, 18, 57, 30, 250000, tzinfo=UTC)
TIMED_OUT = {"batchId": FIXTURE_BATCH, "error": {"Error": "States.Timeout", "Cause": "poll gave up"}}
SEARCH = {
    "datastoreId": DATASTORE_ID,
    "searchCriteria": {"filters": [{"values": [{"DICOMSeriesInstanceUID": SERIES}], "operator": "EQUAL"}]},
}


def forwarding_env(aws: Aws, forwarding: str = "true") -> dict[str, str]:
    return aws.env(RECORD_RETENTION_DAYS="30", STOREDICOM_FORWARDING=forwarding)


def metadata(sops: Iterable[str]) -> StreamingBody:
    """GetImageSetMetadata's blob: gzip JSON, Study -> Series[series] -> Instances[sop]."""
    document = {
        "SchemaVersion": "1.1",
        "DatastoreID": DATASTORE_ID,
        "ImageSetID": PRIMARY_SET,
        "Study": {
            "DICOM": {"StudyInstanceUID": STUDY},
            "Series": {SERIES: {"DICOM": {"SeriesInstanceUID": SERIES}, "Instances": {sop: {} for sop in sops}}},
        },
    }
    raw = gzip.compress(json.dumps(document).encode())
    return StreamingBody(io.BytesIO(raw), len(raw))


def expect_found(stub: Stubber, numbers: Iterable[int], is_primary: bool = True) -> None:
    """One search for the batch's one series, answered in two pages, and one metadata read for the image set."""
    summary = {"imageSetId": PRIMARY_SET, "version": 1, "updatedAt": UPDATED_AT, "isPrimary": is_primary}
    stub.add_response("search_image_sets", {"imageSetsMetadataSummaries": [], "nextToken": "page-2"}, SEARCH)
    stub.add_response(
        "search_image_sets", {"imageSetsMetadataSummaries": [summary]}, {**SEARCH, "nextToken": "page-2"}
    )
    stub.add_response(
        "get_image_set_metadata",
        {"imageSetMetadataBlob": metadata(sop_uid(n) for n in numbers), "contentEncoding": "gzip"},
        {"datastoreId": DATASTORE_ID, "imageSetId": PRIMARY_SET},
    )


@pytest.fixture
def app(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_app("process_results", monkeypatch, forwarding_env(aws))


@pytest.fixture
def stub(app: ModuleType) -> Iterator[Stubber]:
    with Stubber(app.HEALTHIMAGING.client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def assert_found(record: dict[str, Any], is_primary: bool = True) -> None:
    assert (record["status"], record["storedBy"]) == ("imported", "HealthImaging search")
    assert record["imageSetId"] == PRIMARY_SET
    assert (record["isPrimary"], record["storedAt"]) == (is_primary, "2026-11-23T18:57:30.250Z")
    assert "jobId" not in record


def test_a_failed_job_records_imported_what_healthimaging_holds_in_a_primary_image_set(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, stub: Stubber
) -> None:
    # StoreDICOM stored objects 3 and 4 but its answers never reached the daemon: no tags; the fallback batch's
    # job FAILED.
    registered = register(aws, monkeypatch)
    expect_found(stub, [3, 4])
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert (result["batchStatus"], result["imported"], result["failed"]) == ("failed", 2, 8)
    recorded = instances(aws.table)
    for number in (3, 4):
        assert_found(recorded[sop_uid(number)])
        assert "gsi3pk" not in recorded[sop_uid(number)]
    assert {recorded[sop_uid(n)]["status"] for n in (1, 2, 5, 6, 7, 8, 9, 10)} == {"failed"}


def test_an_instance_found_in_a_non_primary_image_set_is_recorded_non_primary(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, stub: Stubber
) -> None:
    registered = register(aws, monkeypatch)
    expect_found(stub, [5], is_primary=False)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert (result["imported"], result["nonprimary"], result["failed"]) == (1, 1, 9)
    record = instances(aws.table)[sop_uid(5)]
    assert_found(record, is_primary=False)
    assert record["gsi3pk"] == "STATUS#instance#nonprimary"


def test_what_healthimaging_does_not_hold_is_failed(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, stub: Stubber
) -> None:
    registered = register(aws, monkeypatch)
    stub.add_response("search_image_sets", {"imageSetsMetadataSummaries": []}, SEARCH)  # no metadata read follows
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert (result["imported"], result["failed"]) == (0, 10)
    assert {item["status"] for item in instances(aws.table).values()} == {"failed"}


def test_a_passing_error_is_asked_again_within_the_call(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, stub: Stubber
) -> None:
    # A batch's lookup is many calls; retried only as a whole, passing errors on a few of them would fail it.
    registered = register(aws, monkeypatch)
    stub.add_client_error("search_image_sets", "ThrottlingException", http_status_code=429, expected_params=SEARCH)
    stub.add_client_error("search_image_sets", "InternalServerException", http_status_code=500)
    expect_found(stub, [3])
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert (result["imported"], result["failed"]) == (1, 9)
    assert_found(instances(aws.table)[sop_uid(3)])


def test_process_results_is_retried_when_healthimaging_cannot_be_asked(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, stub: Stubber
) -> None:
    registered = register(aws, monkeypatch)
    for _ in range(LOOKUP_ATTEMPTS):
        stub.add_client_error("search_image_sets", "ThrottlingException", http_status_code=429, expected_params=SEARCH)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    with pytest.raises(HealthImagingUnreadable, match=f"ThrottlingException \\(attempt {LOOKUP_ATTEMPTS}\\)"):
        app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    # Nothing recorded failed: the state machine runs the task again.
    assert {item["status"] for item in instances(aws.table).values()} == {"importing"}


def test_an_error_asking_again_cannot_mend_is_not_retried(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, app: ModuleType, stub: Stubber
) -> None:
    registered = register(aws, monkeypatch)
    stub.add_client_error("search_image_sets", "AccessDeniedException", http_status_code=403)  # one call only
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    with pytest.raises(HealthImagingUnreadable, match="AccessDeniedException \\(attempt 1\\)"):
        app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())


def record_failure_asking(
    aws: Aws, monkeypatch: pytest.MonkeyPatch, state: dict[str, Any], answers: Callable[[Stubber], None]
) -> dict[str, Any]:
    """RecordFailure with forwarding on, its HealthImaging calls answered as ``answers`` sets them up, all used."""
    failure_app = load_app("record_failure", monkeypatch, forwarding_env(aws))
    with Stubber(failure_app.HEALTHIMAGING.client) as stub:
        answers(stub)
        result = dict(failure_app.handler({"executionArn": EXECUTION, "state": state}, FakeContext()))
        stub.assert_no_pending_responses()
    return result


def test_record_failure_records_what_healthimaging_holds_and_fails_the_rest(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(aws, monkeypatch)
    result = record_failure_asking(aws, monkeypatch, TIMED_OUT, lambda stub: expect_found(stub, [7]))

    assert (result["instancesFailed"], batch_item(aws.table, FIXTURE_BATCH)["status"]) == (9, "failed")
    recorded = instances(aws.table)
    assert_found(recorded[sop_uid(7)])
    assert {recorded[sop_uid(n)]["status"] for n in range(1, 11) if n != 7} == {"failed"}


def test_record_failure_after_a_completed_job_asks_only_about_what_the_job_did_not_import(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job imported all but 4 and 9; StoreDICOM had stored 9 (its answer lost). One search, one metadata read.
    registered = register(aws, monkeypatch)
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "partial_failure")
    error = {"Error": "States.TaskFailed", "Cause": "retries ran out"}
    state = {**results_event(registered, output_uri), "error": error}
    result = record_failure_asking(aws, monkeypatch, state, lambda stub: expect_found(stub, [9]))

    assert result["instancesFailed"] == 1
    recorded = instances(aws.table)
    assert_found(recorded[sop_uid(9)])
    assert recorded[sop_uid(4)]["status"] == "failed"
    assert {recorded[sop_uid(n)]["status"] for n in (1, 2, 3, 5, 6, 7, 8, 10)} == {"imported"}


def test_record_failure_fails_the_instances_when_healthimaging_cannot_be_asked(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last step of the workflow: nothing retries it, so what is known (the import failed) is recorded.
    register(aws, monkeypatch)

    def always_failing(stub: Stubber) -> None:
        for _ in range(LOOKUP_ATTEMPTS):
            stub.add_client_error("search_image_sets", "InternalServerException", http_status_code=500)

    result = record_failure_asking(aws, monkeypatch, TIMED_OUT, always_failing)

    assert result["instancesFailed"] == 10
    assert {item["status"] for item in instances(aws.table).values()} == {"failed"}


def test_with_forwarding_off_healthimaging_is_not_asked(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    registered = register(aws, monkeypatch)
    off_app = load_app("process_results", monkeypatch, forwarding_env(aws, "false"))
    assert off_app.HEALTHIMAGING is None  # no client at all: no call can be made
    output_uri = upload_job_output(aws.s3, aws.results_bucket, FIXTURE_BATCH, "job_failed")

    result = off_app.handler(results_event(registered, output_uri, "FAILED"), FakeContext())

    assert result["failed"] == 10
