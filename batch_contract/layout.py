"""The S3 key layout (docs/s3-layout.rst): batch ids, object and manifest keys, the import jobs' results prefix."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

BATCH_ID_PATTERN = r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}"
# PS3.5 9.1 as the daemon validates it (scp/uids.py) before a UID may name a key.
UID_PATTERN = r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*"
BATCHES_PREFIX = "batches/"
MANIFESTS_PREFIX = "manifests/"
# One empty object per batch the sweeper sealed: the batches whose late objects it looks for (docs/s3-layout.rst).
SEALED_PREFIX = "sealed/"
RESULTS_PREFIX = "jobs/"
OBJECT_SUFFIX = ".dcm"
MANIFEST_SUFFIX = ".json"
_BATCH_ID = re.compile(BATCH_ID_PATTERN)
_UID = re.compile(UID_PATTERN)
_BATCH_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


class LayoutError(ValueError):
    """A key or batch id that does not follow the documented layout."""


@dataclass(frozen=True)
class ObjectKey:
    batch_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def new_batch_id(opened: datetime) -> str:
    """``<UTC open time>-<16 random hex digits>``: sortable by age, unique across every daemon."""
    return f"{batch_id_time_part(opened)}-{os.urandom(8).hex()}"


def late_batch_id(batch_id: str) -> str:
    """The one batch that takes the objects a manifest written by another writer left out of ``batch_id``.

    Derived, not drawn: the daemon and the sweeper, each finding such objects, name the same batch, and the first
    manifest written for it (If-None-Match) is final for both. The time part is the sealed batch's, so a listing
    that reaches the batch reaches its late batch too; the late batch of a late batch continues the chain.
    """
    digest = hashlib.sha256(f"late:{check_batch_id(batch_id)}".encode()).hexdigest()
    return f"{batch_id[:16]}-{digest[:16]}"


def is_batch_id(candidate: str) -> bool:
    return _BATCH_ID.fullmatch(candidate) is not None


def check_batch_id(batch_id: str) -> str:
    if not is_batch_id(batch_id):
        raise LayoutError(f"not a batch id: {batch_id!r}")
    return batch_id


def batch_id_time_part(moment: datetime) -> str:
    """The time part a batch id opened at ``moment`` begins with; also a ``StartAfter`` bound for listings."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime(_BATCH_TIME_FORMAT)


def batch_opened_at(batch_id: str) -> datetime:
    """The UTC time encoded in the batch id (when its first object arrived)."""
    return datetime.strptime(check_batch_id(batch_id)[:16], _BATCH_TIME_FORMAT).replace(tzinfo=UTC)


def batch_prefix(batch_id: str) -> str:
    return f"{BATCHES_PREFIX}{check_batch_id(batch_id)}/"


def manifest_key(batch_id: str) -> str:
    return f"{MANIFESTS_PREFIX}{check_batch_id(batch_id)}{MANIFEST_SUFFIX}"


def batch_id_from_manifest_key(key: str) -> str:
    if not key.startswith(MANIFESTS_PREFIX) or not key.endswith(MANIFEST_SUFFIX):
        raise LayoutError(f"not a manifest key: {key!r}")
    return check_batch_id(key[len(MANIFESTS_PREFIX) : -len(MANIFEST_SUFFIX)])


def sealed_marker_key(batch_id: str) -> str:
    return f"{SEALED_PREFIX}{check_batch_id(batch_id)}"


def batch_id_from_sealed_marker_key(key: str) -> str:
    if not key.startswith(SEALED_PREFIX):
        raise LayoutError(f"not a sealed marker key: {key!r}")
    return check_batch_id(key[len(SEALED_PREFIX) :])


def batch_id_from_prefix(prefix: str) -> str:
    """``batches/<batch-id>/`` (a listing's common prefix) to its batch id."""
    if not prefix.startswith(BATCHES_PREFIX) or not prefix.endswith("/"):
        raise LayoutError(f"not a batch prefix: {prefix!r}")
    return check_batch_id(prefix[len(BATCHES_PREFIX) : -1])


def parse_object_key(key: str) -> ObjectKey:
    """Split ``batches/<batch>/<study>/<series>/<sop>.dcm``, checking every component."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != BATCHES_PREFIX.rstrip("/") or not parts[4].endswith(OBJECT_SUFFIX):
        raise LayoutError(f"not a batch object key: {key!r}")
    batch_id, study, series, sop = parts[1], parts[2], parts[3], parts[4][: -len(OBJECT_SUFFIX)]
    check_batch_id(batch_id)
    for uid in (study, series, sop):
        if not _UID.fullmatch(uid):
            raise LayoutError(f"not a UID in key {key!r}: {uid!r}")
    return ObjectKey(batch_id, study, series, sop)


def object_key(batch_id: str, study: str, series: str, sop: str) -> str:
    """The key of one object; every component is checked, so no received value becomes a key unvalidated."""
    key = f"{batch_prefix(batch_id)}{study}/{series}/{sop}{OBJECT_SUFFIX}"
    parse_object_key(key)
    return key


def results_prefix(batch_id: str) -> str:
    """Where the import job of a batch writes its output: ``jobs/<batch-id>/`` in the results bucket."""
    return f"{RESULTS_PREFIX}{check_batch_id(batch_id)}/"


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise LayoutError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key
