"""Batch manifests (docs/s3-layout.rst): reading them, building them from a listing, writing them once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from common.layout import batch_prefix, check_batch_id, manifest_key, parse_object_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MANIFEST_VERSION = 1
CLOSED_BY_DAEMON = ("files", "bytes", "window", "shutdown")
CLOSED_BY_SWEEPER = "sweeper"
CLOSED_BY_REQUEUE = "requeue"


class ManifestError(ValueError):
    """A manifest that cannot be used: missing fields, wrong batch, keys outside the batch."""


@dataclass(frozen=True)
class ManifestObject:
    key: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str | None
    size: int
    calling_ae_title: str | None
    received_at: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "sopInstanceUid": self.sop_instance_uid,
            "sopClassUid": self.sop_class_uid,
            "studyInstanceUid": self.study_instance_uid,
            "seriesInstanceUid": self.series_instance_uid,
            "bytes": self.size,
            "callingAETitle": self.calling_ae_title,
            "receivedAt": self.received_at,
        }


@dataclass(frozen=True)
class Manifest:
    batch_id: str
    bucket: str
    closed_by: str
    closed_at: str
    first_received_at: str
    last_received_at: str
    calling_ae_titles: tuple[str, ...]
    objects: tuple[ManifestObject, ...]
    requeued_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return batch_prefix(self.batch_id)

    @property
    def byte_count(self) -> int:
        return sum(item.size for item in self.objects)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "manifestVersion": MANIFEST_VERSION,
            "batchId": self.batch_id,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "closedBy": self.closed_by,
            "closedAt": self.closed_at,
            "firstReceivedAt": self.first_received_at,
            "lastReceivedAt": self.last_received_at,
            "objectCount": len(self.objects),
            "byteCount": self.byte_count,
            "callingAETitles": list(self.calling_ae_titles),
            "objects": [item.to_json() for item in self.objects],
        }
        if self.requeued_from is not None:
            document["requeuedFrom"] = self.requeued_from
        return document


def iso_millis(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, the manifest's timestamp format."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _text(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise ManifestError(f"manifest field {name!r} missing or not a string")
    return value


def _optional_text(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    return value if isinstance(value, str) and value else None


def parse_manifest(raw: bytes, expected_batch_id: str, expected_bucket: str) -> Manifest:
    """Validate a manifest against the batch and bucket it was found for."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"manifest is not JSON: {error}") from error
    if not isinstance(document, dict) or document.get("manifestVersion") != MANIFEST_VERSION:
        raise ManifestError("manifest is not a version 1 manifest object")
    batch_id = _text(document, "batchId")
    if batch_id != expected_batch_id:
        raise ManifestError(f"manifest names batch {batch_id!r}, its key names {expected_batch_id!r}")
    check_batch_id(batch_id)
    bucket = _text(document, "bucket")
    if bucket != expected_bucket:
        raise ManifestError(f"manifest names bucket {bucket!r}, it was found in {expected_bucket!r}")
    if document.get("prefix") != batch_prefix(batch_id):
        raise ManifestError(f"manifest prefix {document.get('prefix')!r} is not {batch_prefix(batch_id)!r}")
    raw_objects = document.get("objects")
    if not isinstance(raw_objects, list) or not raw_objects:
        raise ManifestError("manifest lists no objects")
    objects = tuple(_parse_object(item, batch_id) for item in raw_objects)
    if document.get("objectCount") != len(objects):
        raise ManifestError(f"objectCount {document.get('objectCount')!r} but {len(objects)} objects listed")
    titles = document.get("callingAETitles") or []
    return Manifest(
        batch_id=batch_id,
        bucket=bucket,
        closed_by=_text(document, "closedBy"),
        closed_at=_text(document, "closedAt"),
        first_received_at=_text(document, "firstReceivedAt"),
        last_received_at=_text(document, "lastReceivedAt"),
        calling_ae_titles=tuple(str(title) for title in titles),
        objects=objects,
        requeued_from=_optional_text(document, "requeuedFrom"),
    )


def _parse_object(item: Any, batch_id: str) -> ManifestObject:
    if not isinstance(item, dict):
        raise ManifestError("manifest object entry is not an object")
    key = _text(item, "key")
    parsed = parse_object_key(key)
    if parsed.batch_id != batch_id:
        raise ManifestError(f"object {key!r} is outside batch {batch_id}")
    if (_text(item, "sopInstanceUid"), _text(item, "studyInstanceUid"), _text(item, "seriesInstanceUid")) != (
        parsed.sop_instance_uid,
        parsed.study_instance_uid,
        parsed.series_instance_uid,
    ):
        raise ManifestError(f"object {key!r}: UIDs in the entry differ from the UIDs in its key")
    size = item.get("bytes")
    return ManifestObject(
        key=key,
        sop_instance_uid=parsed.sop_instance_uid,
        study_instance_uid=parsed.study_instance_uid,
        series_instance_uid=parsed.series_instance_uid,
        sop_class_uid=_optional_text(item, "sopClassUid"),
        size=size if isinstance(size, int) else 0,
        calling_ae_title=_optional_text(item, "callingAETitle"),
        received_at=_optional_text(item, "receivedAt"),
    )


def read_manifest(s3: S3Client, bucket: str, batch_id: str) -> Manifest:
    body = s3.get_object(Bucket=bucket, Key=manifest_key(batch_id))["Body"].read()
    return parse_manifest(body, batch_id, bucket)


def write_manifest_once(s3: S3Client, manifest: Manifest) -> bool:
    """Conditional put (If-None-Match: *): True if this call created it, False if one already existed."""
    body = json.dumps(manifest.to_json(), separators=(",", ":")).encode()
    try:
        s3.put_object(
            Bucket=manifest.bucket,
            Key=manifest_key(manifest.batch_id),
            Body=body,
            ContentType="application/json",
            IfNoneMatch="*",
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "PreconditionFailed":
            return False
        raise
    return True
