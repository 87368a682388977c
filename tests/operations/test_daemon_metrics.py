"""The running daemon writes its metrics as EMF lines on stdout, next to its JSON log lines."""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydicom.uid import UID
from pynetdicom import AE

from scp.metrics import METRICS, NAMESPACE, SERVICE
from tests.operations.emf import Datum, data_from_lines
from tests.support.corpus import CT_IMAGE_STORAGE, make_instance, read
from tests.support.daemon import start_daemon
from tests.support.moto import MotoServer

pytestmark = pytest.mark.integration


def total(data: list[Datum], name: str, **dimensions: str) -> float:
    wanted = (("service", SERVICE), *dimensions.items())
    return sum(sum(d.values) for d in data if d.name == name and d.dimensions == wanted)


def test_outcomes_of_a_session_reach_the_emf_lines(tmp_path: Path, moto: MotoServer) -> None:
    bucket = f"dicom-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)  # fmt: skip
    settings: dict[str, Any] = {"DICOM_BUCKET": bucket, "REQUIRE_CALLING_AE_TITLE": "CT01", **moto.env()}
    daemon = start_daemon(tmp_path, storage_dir=tmp_path / "spool", **settings)
    try:
        files = [make_instance(tmp_path, pixel_bytes=4096) for _ in range(3)]
        broken = read(files[0])
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.999")
        del broken.StudyInstanceUID  # answered 0xA900: the data set lacks a required UID
        association = daemon.associate(calling="CT01", contexts=[(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])])
        assert association.is_established
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            statuses = [association.send_c_store(read(f)).Status for f in files]
            statuses.append(association.send_c_store(broken).Status)
        association.release()
        assert statuses == [0, 0, 0, 0xA900]
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context("1.2.840.10008.1.1")
        assert intruder.associate("127.0.0.1", daemon.port, ae_title=daemon.ae_title).is_rejected
    finally:
        assert daemon.stop() == 0

    lines = daemon.log_path.read_text().splitlines()
    data = data_from_lines(lines)

    assert {d.namespace for d in data} == {NAMESPACE}
    assert {d.name for d in data} == {spec.name for spec in METRICS}
    assert {d.unit for d in data if d.name == "BytesStored"} == {"Bytes"}
    assert total(data, "ObjectsStored") == 3
    stored_bytes = sum(entry["bytes"] for entry in daemon.log_messages("stored"))
    assert total(data, "BytesStored") == stored_bytes > 0
    assert len([v for d in data if d.name == "StoreLatency" for v in d.values]) == 3
    assert total(data, "StoreFailures") == 1
    assert total(data, "StoreFailures", Status="0xA900") == 1
    assert total(data, "AssociationsAccepted") == 1
    assert max(max(d.values) for d in data if d.name == "ActiveAssociations") == 1
    # The start-up readiness probe (calling AE TESTSCU) is refused by the same policy as the intruder.
    assert total(data, "AssociationsRejected", Reason="calling AE title not recognised") == 2
    assert total(data, "AssociationsRejected") == 2
    assert total(data, "BatchesClosed") == 1, "SIGTERM closes the open batch before the last flush"
    assert total(data, "S3UploadRetries") == 0

    # Every stdout line is still one JSON object with the log fields the existing readers rely on.
    documents = [json.loads(line) for line in lines if line.startswith("{")]
    assert all({"time", "level", "logger", "message"} <= set(document) for document in documents)
    assert daemon.log_messages("stopped"), "the metrics lines do not hide the log lines"
