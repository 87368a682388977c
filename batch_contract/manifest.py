"""The batch manifest (docs/s3-layout.rst): its fields, the words of ``closedBy``, encoding and validation.

The daemon writes manifests, the sweeper and the re-queue step of the workflow write them too, and the workflow
reads them; each builds a ``Manifest`` and encodes it with ``encode_manifest``, and reads with ``parse_manifest``.

With StoreDICOM forwarding in the stack, a batch splits when it closes: the objects StoreDICOM stored stay in the
batch, whose manifest carries each one's StoreDICOM answer (``storeDICOM``) and starts no import job; the others are
copied into a fallback batch of their own (``fallbackBatchId`` / ``fallbackFrom``), imported as any batch is. A
manifest's entries are either all stored by StoreDICOM or none, so no instance is imported by both paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from batch_contract.layout import batch_prefix, check_batch_id, parse_object_key
from batch_contract.table import STORED_BY_STOREDICOM

MANIFEST_VERSION = 1

# Who closed a batch, the manifest's ``closedBy``.
CLOSED_BY_FILES = "files"  # the daemon: BATCH_MAX_FILES reached
CLOSED_BY_BYTES = "bytes"  # the daemon: BATCH_MAX_BYTES reached
CLOSED_BY_WINDOW = "window"  # the daemon: BATCH_WINDOW_SECONDS without a new object
CLOSED_BY_SHUTDOWN = "shutdown"  # the daemon, at SIGTERM
# The daemon, for objects it had stored into a batch whose manifest another writer (the sweeper) wrote first
# without them: copied into a batch of their own, so that each is listed in exactly one manifest.
CLOSED_BY_LATE = "late"
CLOSED_BY_DAEMON = (CLOSED_BY_FILES, CLOSED_BY_BYTES, CLOSED_BY_WINDOW, CLOSED_BY_SHUTDOWN, CLOSED_BY_LATE)
CLOSED_BY_SWEEPER = "sweeper"  # a batch a dead daemon left open, rebuilt from its listing
CLOSED_BY_REQUEUE = "requeue"  # the workflow: instances that failed with a server error, imported again


class ManifestError(ValueError):
    """A manifest that cannot be used: missing fields, wrong batch, keys outside the batch."""


@dataclass(frozen=True)
class StoredByStoreDICOM:
    """StoreDICOM's answer for an instance it stored before the batch closed (docs/forwarding.rst)."""

    stored_at: str
    # Read from the answer's RetrieveURL where it names an image set; absent otherwise.
    image_set_id: str | None
    # The answer's Warning Reason (0008,1196) or WarningDetail for this instance, as HealthImaging gave it.
    warning: str | None
    # Set by the workflow only, never in a manifest: where HealthImaging was asked because no answer reached the
    # daemon (functions/common/held_in_healthimaging.py), the image set's isPrimary and ``storedBy`` saying so.
    is_primary: bool | None = None
    stored_by: str = STORED_BY_STOREDICOM

    def to_json(self) -> dict[str, Any]:
        return {"storedAt": self.stored_at, "imageSetId": self.image_set_id, "warning": self.warning}


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
    stored_by_storedicom: StoredByStoreDICOM | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "key": self.key,
            "sopInstanceUid": self.sop_instance_uid,
            "sopClassUid": self.sop_class_uid,
            "studyInstanceUid": self.study_instance_uid,
            "seriesInstanceUid": self.series_instance_uid,
            "bytes": self.size,
            "callingAETitle": self.calling_ae_title,
            "receivedAt": self.received_at,
        }
        if self.stored_by_storedicom is not None:
            document["storeDICOM"] = self.stored_by_storedicom.to_json()
        return document


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
    # The batch whose instances this one holds again: a re-queue (``requeue``) or late objects (``late``).
    requeued_from: str | None = None
    late_from: str | None = None
    # A split batch: the one holding the objects StoreDICOM did not store, and the batch they were copied from.
    fallback_batch_id: str | None = None
    fallback_from: str | None = None

    def __post_init__(self) -> None:
        stored = sum(1 for item in self.objects if item.stored_by_storedicom is not None)
        if stored not in (0, len(self.objects)):
            raise ManifestError(
                f"batch {self.batch_id}: {stored} of {len(self.objects)} objects stored by StoreDICOM; "
                "a batch's objects are all stored by StoreDICOM or all imported"
            )

    @property
    def prefix(self) -> str:
        return batch_prefix(self.batch_id)

    @property
    def stored_by_storedicom(self) -> bool:
        """Every object is in HealthImaging already: the batch needs no import job."""
        return bool(self.objects) and self.objects[0].stored_by_storedicom is not None

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
        if self.late_from is not None:
            document["lateFrom"] = self.late_from
        if self.fallback_batch_id is not None:
            document["fallbackBatchId"] = self.fallback_batch_id
        if self.fallback_from is not None:
            document["fallbackFrom"] = self.fallback_from
        return document


def encode_manifest(manifest: Manifest) -> bytes:
    """The bytes every writer puts at ``manifests/<batch-id>.json``."""
    return json.dumps(manifest.to_json(), separators=(",", ":")).encode()


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
        raise ManifestError(f"manifest is not a version {MANIFEST_VERSION} manifest object")
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
        late_from=_optional_text(document, "lateFrom"),
        fallback_batch_id=_optional_batch_id(document, "fallbackBatchId"),
        fallback_from=_optional_batch_id(document, "fallbackFrom"),
    )


def _optional_batch_id(document: dict[str, Any], name: str) -> str | None:
    value = _optional_text(document, name)
    if value is not None:
        try:
            check_batch_id(value)
        except ValueError as error:
            raise ManifestError(f"manifest field {name!r}: {error}") from error
    return value


def _parse_stored(item: dict[str, Any], key: str) -> StoredByStoreDICOM | None:
    stored = item.get("storeDICOM")
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise ManifestError(f"object {key!r}: storeDICOM is not an object")
    return StoredByStoreDICOM(
        stored_at=_text(stored, "storedAt"),
        image_set_id=_optional_text(stored, "imageSetId"),
        warning=_optional_text(stored, "warning"),
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
        stored_by_storedicom=_parse_stored(item, key),
    )
