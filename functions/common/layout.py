"""The S3 key layout shared with the daemon (docs/s3-layout.rst) and the results layout of import jobs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

BATCH_ID_PATTERN = r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}"
UID_PATTERN = r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*"
BATCHES_PREFIX = "batches/"
MANIFESTS_PREFIX = "manifests/"
RESULTS_PREFIX = "jobs/"
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


def check_batch_id(batch_id: str) -> str:
    if not _BATCH_ID.fullmatch(batch_id):
        raise LayoutError(f"not a batch id: {batch_id!r}")
    return batch_id


def batch_prefix(batch_id: str) -> str:
    return f"{BATCHES_PREFIX}{check_batch_id(batch_id)}/"


def manifest_key(batch_id: str) -> str:
    return f"{MANIFESTS_PREFIX}{check_batch_id(batch_id)}.json"


def batch_id_from_manifest_key(key: str) -> str:
    if not key.startswith(MANIFESTS_PREFIX) or not key.endswith(".json"):
        raise LayoutError(f"not a manifest key: {key!r}")
    return check_batch_id(key[len(MANIFESTS_PREFIX) : -len(".json")])


def batch_opened_at(batch_id: str) -> datetime:
    """The UTC time encoded in the batch id (when its first object arrived)."""
    return datetime.strptime(check_batch_id(batch_id)[:16], _BATCH_TIME_FORMAT).replace(tzinfo=UTC)


def batch_id_time_part(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_BATCH_TIME_FORMAT)


def parse_object_key(key: str) -> ObjectKey:
    """Split ``batches/<batch>/<study>/<series>/<sop>.dcm``, checking every component."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != BATCHES_PREFIX.rstrip("/") or not parts[4].endswith(".dcm"):
        raise LayoutError(f"not a batch object key: {key!r}")
    batch_id, study, series, sop = parts[1], parts[2], parts[3], parts[4][: -len(".dcm")]
    check_batch_id(batch_id)
    for uid in (study, series, sop):
        if not _UID.fullmatch(uid):
            raise LayoutError(f"not a UID in key {key!r}: {uid!r}")
    return ObjectKey(batch_id, study, series, sop)


def object_key(batch_id: str, study: str, series: str, sop: str) -> str:
    key = f"{batch_prefix(batch_id)}{study}/{series}/{sop}.dcm"
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
