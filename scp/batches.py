"""Import batches: groups of stored objects sized for one AWS HealthImaging import job, and their manifests.

A batch is open while objects are added, closes on its file or byte limit, after a quiet window, or at
shutdown, and is finished (its manifest written) once every upload that joined it has ended. The layout and the
manifest format are documented in docs/s3-layout.rst.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from batch_contract.layout import batch_prefix, late_batch_id, manifest_key, new_batch_id, object_key
from batch_contract.manifest import (
    CLOSED_BY_BYTES,
    CLOSED_BY_FILES,
    CLOSED_BY_LATE,
    CLOSED_BY_SHUTDOWN,
    CLOSED_BY_WINDOW,
    Manifest,
    ManifestObject,
    StoredByStoreDICOM,
    encode_manifest,
)
from batch_contract.timestamps import iso_millis
from scp.instances import ReceivedInstance
from scp.metrics import Metrics

LOG = logging.getLogger(__name__)


@dataclass
class Batch:
    batch_id: str
    reserved_files: int = 0
    reserved_bytes: int = 0
    in_flight: int = 0
    last_joined: float = field(default_factory=time.monotonic)
    closed_by: str | None = None
    objects: dict[str, ManifestObject] = field(default_factory=dict)
    # For a batch of late objects: the batch they were stored into first (see ``late_batch``).
    late_from: str | None = None
    # The batch that took this one's late objects, fixed once so that a retried close copies into the same one.
    successor: Batch | None = None
    # StoreDICOM forwarding: whether the batch was split by what StoreDICOM stored (see ``split``), the fallback
    # batch that took the objects it did not store, and, for a fallback batch, the batch they were copied from.
    split_done: bool = False
    fallback: Batch | None = None
    fallback_from: str | None = None
    # Keys whose upload failed without a clear answer (a timeout): S3 may hold the object all the same, and an
    # import job takes everything under the prefix, so the store removes them before the manifest is written.
    unsettled: set[str] = field(default_factory=set)

    @property
    def prefix(self) -> str:
        return batch_prefix(self.batch_id)

    @property
    def manifest_key(self) -> str:
        return manifest_key(self.batch_id)

    def key_for(self, instance: ReceivedInstance) -> str:
        # The UIDs were validated (digits and dots) before they reach a key (scp/uids.py); object_key checks again.
        return object_key(
            self.batch_id, instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid
        )

    def manifest(self, bucket: str, closed_at: datetime) -> Manifest:
        objects = tuple(sorted(self.objects.values(), key=lambda item: item.key))
        received = sorted(str(item.received_at) for item in objects)
        assert self.closed_by is not None, "only a closed batch has a manifest"
        return Manifest(
            batch_id=self.batch_id,
            bucket=bucket,
            closed_by=self.closed_by,
            closed_at=iso_millis(closed_at),
            first_received_at=received[0],
            last_received_at=received[-1],
            calling_ae_titles=tuple(sorted({str(item.calling_ae_title) for item in objects})),
            objects=objects,
            late_from=self.late_from,
            fallback_batch_id=None if self.fallback is None else self.fallback.batch_id,
            fallback_from=self.fallback_from,
        )

    def late_batch(self, listed: set[str]) -> Batch | None:
        """The batch for the objects a manifest written by another (the sweeper) does not list; None if none.

        Such objects were stored after the other writer listed the prefix. Each is copied into the late batch under
        its own key there, so that every acknowledged object is listed in exactly one manifest. The late batch's id
        is derived from this one's (``late_batch_id``): the sweeper, should the copies never be made here, puts the
        objects left out into the same batch, and whichever manifest of it is written first is final.
        """
        if self.successor is None:
            late = [item for key, item in sorted(self.objects.items()) if key not in listed]
            if not late:
                return None
            successor = Batch(late_batch_id(self.batch_id), closed_by=CLOSED_BY_LATE, late_from=self.batch_id)
            # A late object StoreDICOM stored keeps its answer when all of them were stored. Late objects of a split
            # batch whose fallback rejoined it (``rejoin_fallback``) may be a mix, and a manifest's objects are all
            # stored or none: then the late batch's import job takes them all (at least once).
            if len({item.stored_by_storedicom is None for item in late}) > 1:
                late = [replace(item, stored_by_storedicom=None) for item in late]
            _move(late, successor)
            self.successor = successor
        return self.successor

    def split(self, stored: Mapping[str, StoredByStoreDICOM], opened: datetime) -> None:
        """Keep here the objects StoreDICOM stored (``stored``, by key), each with its answer; move the others into
        a fallback batch of their own (``fallback``). Done once, so that a retried close writes the same batches.

        None stored: the batch stays as it is, for its import job. All stored: no fallback batch.
        """
        if self.split_done:
            return
        self.split_done = True
        kept = {
            key: replace(item, stored_by_storedicom=stored[key]) for key, item in self.objects.items() if key in stored
        }
        if not kept:
            return
        rest = [item for key, item in sorted(self.objects.items()) if key not in stored]
        if rest:
            self.fallback = Batch(new_batch_id(opened), closed_by=self.closed_by, fallback_from=self.batch_id)
            _move(rest, self.fallback)
        self.objects = kept

    def rejoin_fallback(self) -> None:
        """Undo the split's fallback: its objects are this batch's again, under their keys here (the sweeper sealed
        this batch before its own manifest, so the fallback batch gets none)."""
        assert self.fallback is not None
        for item in self.fallback.objects.values():
            key = object_key(self.batch_id, item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)
            self.objects[key] = replace(item, key=key)
        self.fallback = None

    def copied_from(self, item: ManifestObject) -> str:
        """The key in the batch a late or fallback object was first stored into."""
        source = self.late_from or self.fallback_from
        assert source is not None
        return object_key(source, item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)


def _move(items: list[ManifestObject], into: Batch) -> None:
    """Give each object its key in ``into``; everything else about it stays as it was."""
    for item in items:
        key = object_key(into.batch_id, item.study_instance_uid, item.series_instance_uid, item.sop_instance_uid)
        into.objects[key] = replace(item, key=key)


@dataclass(frozen=True)
class BatchLimits:
    max_files: int
    max_bytes: int
    window_seconds: float


ManifestWriter = Callable[[Batch], None]


class Batches:
    """Thread-safe bookkeeping of the open batch and of closed batches waiting for their manifest."""

    def __init__(self, limits: BatchLimits, write_manifest: ManifestWriter, metrics: Metrics) -> None:
        self._limits = limits
        self._metrics = metrics
        self._write_manifest = write_manifest
        self._lock = threading.Lock()
        self._open: Batch | None = None
        self._closing: list[Batch] = []
        self._wake = threading.Event()
        self._stopped = False
        self._worker: threading.Thread | None = None

    # -- the receive path ------------------------------------------------------------------------------------

    def join(self, size: int) -> Batch:
        """The batch the next object of ``size`` bytes goes into; the caller must ``complete`` or ``leave`` it."""
        with self._lock:
            batch = self._open
            if batch is not None and batch.reserved_files and batch.reserved_bytes + size > self._limits.max_bytes:
                self._close(batch, CLOSED_BY_BYTES)
                batch = None
            if batch is not None and time.monotonic() - batch.last_joined >= self._limits.window_seconds:
                # Quiet for the whole window, so due to close (the closer only waits for its uploads): a batch the
                # sweeper may judge abandoned never takes a new object.
                self._close(batch, CLOSED_BY_WINDOW)
                batch = None
            if batch is None:
                batch = self._open = Batch(new_batch_id(datetime.now(UTC)))
            batch.reserved_files += 1
            batch.reserved_bytes += size
            batch.in_flight += 1
            batch.last_joined = time.monotonic()
            if batch.reserved_files >= self._limits.max_files:
                self._close(batch, CLOSED_BY_FILES)
            return batch

    def complete(self, batch: Batch, key: str, instance: ReceivedInstance, size: int) -> bool:
        """Record a stored object; returns True if it replaced one already in this batch."""
        record = ManifestObject(
            key=key,
            sop_instance_uid=instance.sop_instance_uid,
            study_instance_uid=instance.study_instance_uid,
            series_instance_uid=instance.series_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            size=size,
            calling_ae_title=instance.calling_ae_title,
            received_at=iso_millis(instance.received_at),
        )
        with self._lock:
            replaced = key in batch.objects
            batch.objects[key] = record
            self._leave(batch)
        return replaced

    def leave(self, batch: Batch, size: int, key: str) -> None:
        """An object that joined ``batch`` under ``key`` was not stored after all (S3 may hold it anyway)."""
        with self._lock:
            batch.reserved_files -= 1
            batch.reserved_bytes -= size
            batch.unsettled.add(key)
            self._leave(batch)

    # -- closing -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name="batch-closer", daemon=True)
        self._worker.start()

    def close_all(self, timeout: float) -> list[str]:
        """At shutdown: close the open batch and write every pending manifest; returns the ids of the batches left
        without a manifest, which the sweeper closes."""
        with self._lock:
            self._stopped = True
            if self._open is not None:
                self._close(self._open, CLOSED_BY_SHUTDOWN)
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout)
        with self._lock:
            left = list(self._closing)
        for batch in left:
            if batch.successor is not None:
                # Sealed elsewhere: the sweeper copies the objects its manifest left out into the same late batch
                # once they are older than its minimum age (docs/s3-layout.rst).
                LOG.warning(
                    "late objects of a batch sealed elsewhere not copied: left to the sweeper",
                    extra={
                        "batch_id": batch.batch_id,
                        "late_batch_id": batch.successor.batch_id,
                        "instances": len(batch.successor.objects),
                        # Bounded: a CloudWatch Logs event holds at most 256 KiB.
                        "sop_instance_uids": sorted(i.sop_instance_uid for i in batch.successor.objects.values())[:100],
                    },
                )
        return [batch.batch_id for batch in left if batch.successor is None]

    def _close(self, batch: Batch, reason: str) -> None:
        batch.closed_by = reason
        self._closing.append(batch)
        if self._open is batch:
            self._open = None
        self._wake.set()

    def _leave(self, batch: Batch) -> None:
        batch.in_flight -= 1
        if batch.in_flight == 0 and batch.closed_by:
            self._wake.set()

    def _due(self) -> list[Batch]:
        with self._lock:
            batch = self._open
            quiet = batch is not None and time.monotonic() - batch.last_joined >= self._limits.window_seconds
            if batch is not None and quiet and batch.in_flight == 0:
                self._close(batch, CLOSED_BY_WINDOW)
            return [b for b in self._closing if b.in_flight == 0]

    def _run(self) -> None:
        backoff = 1.0
        while True:
            self._wake.wait(timeout=min(1.0, self._limits.window_seconds))
            self._wake.clear()
            failed = False
            for batch in self._due():
                if not self._finish(batch):
                    failed = True
            with self._lock:
                done = self._stopped and not self._closing
            if done:
                return
            if failed:
                # S3 is refusing; the objects are safe, so wait and try the manifest again.
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            else:
                backoff = 1.0

    def _finish(self, batch: Batch) -> bool:
        if batch.objects or batch.unsettled:
            try:
                self._write_manifest(batch)
            except Exception as error:  # noqa: BLE001 - retried; the sweeper closes the batch if we never can
                LOG.error(
                    "batch manifest not written, will retry",
                    extra={"batch_id": batch.batch_id, "error": f"{type(error).__name__}: {error}"},
                )
                return False
        if batch.objects:
            self._metrics.batch_closed()
            LOG.info(
                "batch closed",
                extra={
                    "batch_id": batch.batch_id,
                    "closed_by": batch.closed_by,
                    "objects": len(batch.objects),
                    "bytes": sum(item.size for item in batch.objects.values()),
                },
            )
        with self._lock:
            self._closing.remove(batch)
        return True


def manifest_body(batch: Batch, bucket: str) -> bytes:
    return encode_manifest(batch.manifest(bucket, datetime.now(UTC)))
