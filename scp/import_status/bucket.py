"""Reading the S3 batches (docs/s3-layout.rst) for what the table does not hold yet: open or unregistered batches.

A closed batch's manifest is read as well: what StoreDICOM stored is in HealthImaging already, and its manifest says
so (with the image set id) before the workflow has recorded it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from batch_contract.layout import (
    BATCHES_PREFIX,
    MANIFESTS_PREFIX,
    LayoutError,
    ObjectKey,
    batch_id_from_manifest_key,
    batch_id_from_prefix,
    batch_id_time_part,
    batch_prefix,
    manifest_key,
    parse_object_key,
)
from batch_contract.manifest import StoredByStoreDICOM, parse_manifest
from batch_contract.table import STORED_BY_STOREDICOM
from batch_contract.timestamps import iso_millis
from scp.import_status import table as records
from scp.import_status.report import BATCHED, IMPORTED, OPEN, Instance, batch_time
from scp.part10 import source_ae_title

# The daemon's Part-10 header (preamble, DICM, file meta) is a few hundred bytes; its calling AE title is there.
_HEADER_BYTES = 2048
_PARALLEL_READS = 16


@dataclass(frozen=True)
class Unregistered:
    """A batch the table does not hold: still open, or closed (manifest written) but not registered yet."""

    batch_id: str
    closed: bool
    # A closed batch StoreDICOM stored: its manifest's answer for each object, by key.
    stored: Mapping[str, StoredByStoreDICOM] = field(default_factory=dict)


def _pages(s3: Any, **arguments: Any) -> Iterator[dict[str, Any]]:
    yield from s3.get_paginator("list_objects_v2").paginate(**arguments)


def _recent_batch_ids(s3: Any, bucket: str, start: datetime) -> list[str]:
    after = f"{BATCHES_PREFIX}{batch_id_time_part(start)}"
    ids = []
    for page in _pages(s3, Bucket=bucket, Prefix=BATCHES_PREFIX, Delimiter="/", StartAfter=after):
        for common in page.get("CommonPrefixes", []):
            try:
                ids.append(batch_id_from_prefix(common["Prefix"]))
            except LayoutError:
                continue  # not a batch: nothing the daemon wrote
    return ids


def _closed_batch_ids(s3: Any, bucket: str, start: datetime) -> set[str]:
    after = f"{MANIFESTS_PREFIX}{batch_id_time_part(start)}"
    closed = set()
    for page in _pages(s3, Bucket=bucket, Prefix=MANIFESTS_PREFIX, StartAfter=after):
        for entry in page.get("Contents", []):
            try:
                closed.add(batch_id_from_manifest_key(entry["Key"]))
            except LayoutError:
                continue
    return closed


def unregistered_batches(s3: Any, bucket: str, table: Any, start: datetime) -> list[Unregistered]:
    """Batches opened since ``start`` that the table does not hold."""
    batch_ids = _recent_batch_ids(s3, bucket, start)
    if not batch_ids:
        return []
    closed = _closed_batch_ids(s3, bucket, start)
    known = records.registered(table, batch_ids)
    return [
        Unregistered(b, True, _stored_answers(s3, bucket, b)) if b in closed else Unregistered(b, False)
        for b in batch_ids
        if b not in known
    ]


def _stored_answers(s3: Any, bucket: str, batch_id: str) -> dict[str, StoredByStoreDICOM]:
    """StoreDICOM's answers the batch's manifest carries, by key; none for a batch left to an import job."""
    body = s3.get_object(Bucket=bucket, Key=manifest_key(batch_id))["Body"].read()
    try:
        manifest = parse_manifest(body, batch_id, bucket)
    except ValueError:
        return {}  # the workflow fails such a batch, with the reason, once it reads the manifest
    return {item.key: item.stored_by_storedicom for item in manifest.objects if item.stored_by_storedicom}


def _objects(s3: Any, bucket: str, prefix: str) -> Iterator[tuple[str, ObjectKey, datetime]]:
    """(key, its parts, LastModified) of every object under ``prefix`` that follows the layout."""
    for page in _pages(s3, Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            try:
                yield entry["Key"], parse_object_key(entry["Key"]), entry["LastModified"]
            except LayoutError:
                continue


def _instance(key: str, parsed: ObjectKey, modified: datetime, batch: Unregistered, calling: str | None) -> Instance:
    instance = Instance(
        sop_instance_uid=parsed.sop_instance_uid,
        study_instance_uid=parsed.study_instance_uid,
        series_instance_uid=parsed.series_instance_uid,
        state=BATCHED if batch.closed else OPEN,
        batch_id=batch.batch_id,
        received_at=iso_millis(modified.astimezone(UTC)),
        calling_ae_title=calling,
    )
    stored = batch.stored.get(key)
    if stored is None:
        return instance
    # In HealthImaging already, as registration will record it; no import job starts for this batch.
    return replace(instance, state=IMPORTED, image_set_id=stored.image_set_id, reason=stored.warning,
                   stored_by=STORED_BY_STOREDICOM)  # fmt: skip


def study_in_s3(s3: Any, bucket: str, batches: list[Unregistered], study_uid: str) -> list[Instance]:
    found = []
    for batch in batches:
        for key, parsed, modified in _objects(s3, bucket, f"{batch_prefix(batch.batch_id)}{study_uid}/"):
            found.append(_instance(key, parsed, modified, batch, None))
    return found


def calling_ae_in_s3(
    s3: Any, bucket: str, batches: list[Unregistered], calling_ae_title: str, since: datetime, until: datetime
) -> list[Instance]:
    """Objects from ``calling_ae_title`` received in the range; the key does not name the sender, the file does."""
    candidates = [
        (key, parsed, modified, batch)
        for batch in batches
        if batch_time(batch.batch_id) <= iso_millis(until)
        for key, parsed, modified in _objects(s3, bucket, batch_prefix(batch.batch_id))
        if since <= modified <= until
    ]
    with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
        senders = list(pool.map(lambda candidate: _sender(s3, bucket, candidate[0]), candidates))
    return [
        _instance(key, parsed, modified, batch, sender)
        for (key, parsed, modified, batch), sender in zip(candidates, senders, strict=True)
        if sender == calling_ae_title
    ]


def _sender(s3: Any, bucket: str, key: str) -> str | None:
    """The Source Application Entity Title the daemon wrote into the object's file meta."""
    head = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{_HEADER_BYTES - 1}")["Body"].read()
    return source_ae_title(head)
