"""Test helpers for the import workflow: load app.py as at a cold start; tables, batches, job outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from botocore.stub import Stubber

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The zips put common/ next to app.py; the tests get the same import path by putting functions/ on sys.path.
if str(FUNCTIONS) not in sys.path:
    sys.path.insert(0, str(FUNCTIONS))

# The batch the output fixtures were written for: ten CT slices of one series.
FIXTURE_BATCH = "20261123T185700Z-3f9a1c2b7d4e5f60"
STUDY = "1.2.826.0.1.3680043.8.498.10001"
SERIES = "1.2.826.0.1.3680043.8.498.10001.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DATASTORE_ID = "bd9e62ed2ef14b7d8a1a6b4f0f3c2d11"
JOB_ID = "5d08d05d6aab2a27922d6260926077d4"
ROLE_ARN = "arn:aws:iam::123456789012:role/HealthImagingImportRole"


def sop_uid(number: int) -> str:
    return f"{SERIES}.{number}"


def object_key(batch_id: str, number: int) -> str:
    return f"batches/{batch_id}/{STUDY}/{SERIES}/{sop_uid(number)}.dcm"


def load_app(name: str, monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> ModuleType:
    """Import functions/<name>/app.py afresh with ``env``, as Lambda does at a cold start."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = FUNCTIONS / name / "app.py"
    module_name = f"lambda_{name}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_table(dynamodb: Any, name: str) -> Any:
    """The workflow table as docs/import-workflow.rst describes it (the template creates the same)."""
    indexes = [
        ("ByBatch", "gsi1pk", "gsi1sk"),
        ("ByCallingAE", "gsi2pk", "gsi2sk"),
        ("ByStatus", "gsi3pk", "gsi3sk"),
    ]
    attributes = ["pk", "sk"] + [a for _, pk, sk in indexes for a in (pk, sk)]
    table = dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in attributes],
        GlobalSecondaryIndexes=[
            {
                "IndexName": index,
                "KeySchema": [
                    {"AttributeName": pk, "KeyType": "HASH"},
                    {"AttributeName": sk, "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
            for index, pk, sk in indexes
        ],
    )
    table.wait_until_exists()
    return table


@dataclass
class Batch:
    batch_id: str
    bucket: str
    keys: list[str]
    manifest: dict[str, Any]

    @property
    def manifest_key(self) -> str:
        return f"manifests/{self.batch_id}.json"


def received_at(batch_id: str, number: int) -> str:
    """Object ``number`` of a batch arrived ``number`` seconds after the batch opened (the time in its id)."""
    opened = datetime.strptime(batch_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return (opened + timedelta(seconds=number)).strftime("%Y-%m-%dT%H:%M:%S.113Z")


def daemon_batch(
    s3: Any, bucket: str, batch_id: str = FIXTURE_BATCH, count: int = 10, write_manifest: bool = True
) -> Batch:
    """Objects and manifest exactly as the daemon writes them (docs/s3-layout.rst)."""
    objects: list[dict[str, Any]] = []
    for number in range(1, count + 1):
        key = object_key(batch_id, number)
        body = b"\0" * 128 + b"DICM" + number.to_bytes(4, "little")
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        objects.append(
            {
                "key": key,
                "sopInstanceUid": sop_uid(number),
                "sopClassUid": CT_IMAGE_STORAGE,
                "studyInstanceUid": STUDY,
                "seriesInstanceUid": SERIES,
                "bytes": len(body),
                "callingAETitle": "CT01",
                "receivedAt": received_at(batch_id, number),
            }
        )
    manifest = {
        "manifestVersion": 1,
        "batchId": batch_id,
        "bucket": bucket,
        "prefix": f"batches/{batch_id}/",
        "closedBy": "window",
        "closedAt": "2026-11-23T18:58:12.504Z",
        "firstReceivedAt": objects[0]["receivedAt"],
        "lastReceivedAt": objects[-1]["receivedAt"],
        "objectCount": len(objects),
        "byteCount": sum(o["bytes"] for o in objects),
        "callingAETitles": ["CT01"],
        "objects": objects,
    }
    if write_manifest:
        s3.put_object(Bucket=bucket, Key=f"manifests/{batch_id}.json", Body=json.dumps(manifest).encode())
    return Batch(batch_id, bucket, [o["key"] for o in objects], manifest)


IMAGE_SET_ID = "0123456789abcdef0123456789abcdef"


def stored_seconds_after_receipt(received: str, seconds: float) -> str:
    moment = datetime.strptime(received, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def stored_by_storedicom(
    s3: Any, batch: Batch, warnings: Mapping[int, str] | None = None, fallback_batch_id: str | None = None
) -> Batch:
    """The manifest of a batch whose objects StoreDICOM stored, as the daemon writes it (docs/s3-layout.rst):
    each stored two seconds after its receipt, into IMAGE_SET_ID (none given for object 2), with ``warnings`` by
    object number."""
    warnings = warnings or {}
    for number, entry in enumerate(batch.manifest["objects"], start=1):
        entry["storeDICOM"] = {
            "storedAt": stored_seconds_after_receipt(entry["receivedAt"], 2),
            "imageSetId": None if number == 2 else IMAGE_SET_ID,
            "warning": warnings.get(number),
        }
    if fallback_batch_id:
        batch.manifest["fallbackBatchId"] = fallback_batch_id
    s3.put_object(Bucket=batch.bucket, Key=batch.manifest_key, Body=json.dumps(batch.manifest).encode())
    return batch


def upload_job_output(
    s3: Any, results_bucket: str, batch_id: str, scenario: str, job_id: str = JOB_ID
) -> str:
    """Put a fixture job output where HealthImaging would: ``<OutputS3Uri><datastore>-DicomImport-<job>/``."""
    output_uri = f"s3://{results_bucket}/jobs/{batch_id}/"
    folder = f"jobs/{batch_id}/{DATASTORE_ID}-DicomImport-{job_id}/"
    for path in sorted((FIXTURES / scenario).rglob("*")):
        if path.is_file():
            text = path.read_text().replace(FIXTURE_BATCH, batch_id)
            s3.put_object(
                Bucket=results_bucket,
                Key=folder + str(path.relative_to(FIXTURES / scenario)),
                Body=text.encode(),
            )
    return output_uri


def items(table: Any) -> Iterator[dict[str, Any]]:
    response = table.scan(ConsistentRead=True)
    yield from response["Items"]
    while "LastEvaluatedKey" in response:
        response = table.scan(ConsistentRead=True, ExclusiveStartKey=response["LastEvaluatedKey"])
        yield from response["Items"]


def instances(table: Any) -> dict[str, dict[str, Any]]:
    return {item["sopInstanceUid"]: item for item in items(table) if item.get("entity") == "instance"}


def batch_item(table: Any, batch_id: str) -> dict[str, Any]:
    return dict(table.get_item(Key={"pk": f"BATCH#{batch_id}", "sk": "BATCH"}, ConsistentRead=True)["Item"])


class FakeContext:
    """The fields of a Lambda context that Powertools' inject_lambda_context reads."""

    function_name = "test-function"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test-function"
    memory_limit_in_mb = 512
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = "/aws/lambda/test-function"
    log_stream_name = "stream"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


@dataclass(frozen=True)
class _TransportFault:
    error: Exception


class FaultStubber(Stubber):
    """botocore's Stubber that can also answer a call with a transport error (read timeout, reset connection).

    The error is raised where botocore would send the request, after the parameters were checked against the
    model, so the function sees exactly what a lost answer looks like from the SDK.
    """

    def add_transport_error(
        self, method: str, error: Exception, expected_params: Mapping[str, Any] | None = None
    ) -> None:
        self._queue.append(
            {
                "operation_name": self.client.meta.method_to_api_mapping.get(method),
                "response": _TransportFault(error),
                "expected_params": expected_params,
            }
        )

    def _get_response_handler(self, model: Any, params: Any, context: Any, **kwargs: Any) -> Any:
        response = super()._get_response_handler(model, params, context, **kwargs)
        if isinstance(response, _TransportFault):
            raise response.error
        return response
