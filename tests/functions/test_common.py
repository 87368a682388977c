"""The shared workflow code: key layout, manifest validation, settings errors, HealthImaging error names."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError
from common.config import ConfigurationError, EnvironmentReader
from common.healthimaging import (
    HealthImagingServerError,
    ImportQuotaExceeded,
    ImportRejected,
    ImportThrottled,
    translate,
)
from common.layout import (
    LayoutError,
    batch_id_from_manifest_key,
    batch_opened_at,
    parse_object_key,
    results_prefix,
)
from common.manifest import ManifestError, iso_millis, parse_manifest

from tests.functions.workflow import FIXTURE_BATCH, object_key


def manifest_document(bucket: str = "b") -> dict[str, object]:
    key = object_key(FIXTURE_BATCH, 1)
    parsed = parse_object_key(key)
    return {
        "manifestVersion": 1,
        "batchId": FIXTURE_BATCH,
        "bucket": bucket,
        "prefix": f"batches/{FIXTURE_BATCH}/",
        "closedBy": "window",
        "closedAt": "2026-11-23T18:58:12.504Z",
        "firstReceivedAt": "2026-11-23T18:57:00.113Z",
        "lastReceivedAt": "2026-11-23T18:57:00.113Z",
        "objectCount": 1,
        "byteCount": 10,
        "callingAETitles": ["CT01"],
        "objects": [
            {
                "key": key,
                "sopInstanceUid": parsed.sop_instance_uid,
                "sopClassUid": "1.2.840.10008.5.1.4.1.1.2",
                "studyInstanceUid": parsed.study_instance_uid,
                "seriesInstanceUid": parsed.series_instance_uid,
                "bytes": 10,
                "callingAETitle": "CT01",
                "receivedAt": "2026-11-23T18:57:00.113Z",
            }
        ],
    }


def test_object_keys_split_into_batch_and_uids() -> None:
    parsed = parse_object_key("batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert (
        parsed.batch_id,
        parsed.study_instance_uid,
        parsed.series_instance_uid,
        parsed.sop_instance_uid,
    ) == (
        "20261123T185700Z-3f9a1c2b7d4e5f60",
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.5",
    )


@pytest.mark.parametrize(
    "key",
    [
        "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.5.txt",
        "batches/not-a-batch/1.2.3/1.2.3.4/1.2.3.4.5.dcm",
        "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.x/1.2.3.4/1.2.3.4.5.dcm",
        "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4.5.dcm",
        f"batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.{'2' * 70}.dcm",
    ],
)
def test_keys_outside_the_layout_are_refused(key: str) -> None:
    with pytest.raises(LayoutError):
        parse_object_key(key)


def test_batch_ids_give_their_open_time_and_results_prefix() -> None:
    assert batch_opened_at(FIXTURE_BATCH) == datetime(2026, 11, 23, 18, 57, 0, tzinfo=UTC)
    assert batch_id_from_manifest_key(f"manifests/{FIXTURE_BATCH}.json") == FIXTURE_BATCH
    assert results_prefix(FIXTURE_BATCH) == f"jobs/{FIXTURE_BATCH}/"
    with pytest.raises(LayoutError):
        batch_id_from_manifest_key("manifests/../x.json")


def test_iso_millis_matches_the_manifest_format() -> None:
    assert iso_millis(datetime(2026, 11, 23, 18, 58, 12, 504999, tzinfo=UTC)) == "2026-11-23T18:58:12.504Z"


def test_a_valid_manifest_parses() -> None:
    manifest = parse_manifest(json.dumps(manifest_document()).encode(), FIXTURE_BATCH, "b")
    assert manifest.objects[0].calling_ae_title == "CT01"
    assert manifest.byte_count == 10
    assert manifest.to_json()["objects"] == manifest_document()["objects"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bucket": "other"}, "found in"),
        ({"batchId": "20261123T185700Z-0000000000000000"}, "its key names"),
        ({"objectCount": 2}, "objectCount"),
        ({"objects": []}, "no objects"),
        ({"manifestVersion": 2}, "version 1"),
    ],
)
def test_inconsistent_manifests_are_refused(change: dict[str, object], message: str) -> None:
    document = {**manifest_document(), **change}
    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(document).encode(), FIXTURE_BATCH, "b")


def test_a_manifest_entry_whose_uids_differ_from_its_key_is_refused() -> None:
    document = manifest_document()
    document["objects"][0]["sopInstanceUid"] = "9.9.9"  # type: ignore[index]
    with pytest.raises(ManifestError, match="differ"):
        parse_manifest(json.dumps(document).encode(), FIXTURE_BATCH, "b")


def test_every_bad_variable_is_reported_at_once() -> None:
    reader = EnvironmentReader({"POLL": "zero", "DATASTORE_ID": "UPPER"})
    reader.text("TABLE_NAME")
    reader.text("DATASTORE_ID", r"[0-9a-z]{32}")
    reader.integer("POLL", 60, 1, 10)
    with pytest.raises(ConfigurationError) as raised:
        reader.finish()
    assert str(raised.value).count(";") == 2
    for name in ("TABLE_NAME", "DATASTORE_ID", "POLL"):
        assert name in str(raised.value)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("ThrottlingException", ImportThrottled),
        ("ServiceQuotaExceededException", ImportQuotaExceeded),
        ("InternalServerException", HealthImagingServerError),
        ("AccessDeniedException", ImportRejected),
        ("ValidationException", ImportRejected),
        ("ResourceNotFoundException", ImportRejected),
        ("ConflictException", ImportRejected),
    ],
)
def test_healthimaging_errors_get_the_names_the_state_machine_matches(
    code: str, kind: type[Exception]
) -> None:
    error = ClientError({"Error": {"Code": code, "Message": "details"}}, "StartDICOMImportJob")
    translated = translate(error)
    assert type(translated) is kind
    assert str(translated) == f"{code}: details"


def test_unknown_errors_stay_client_errors() -> None:
    error = ClientError({"Error": {"Code": "SomethingNew", "Message": "x"}}, "StartDICOMImportJob")
    assert translate(error) is error
