"""Import batches: groups of stored objects sized for one AWS HealthImaging import job, and their manifests.

A batch is open while objects are added, closes on its file or byte limit, after a quiet window, or at
shutdown, and is finished (its manifest written) once every upload that joined it has ended. The layout and the
manifest format are documented in docs/s3-layout.rst.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scp.instances import ReceivedInstance
from scp.metrics import Metrics

LOG = logging.getLogger(__name__)

BATCHES_PREFIX = "batches/"
MANIFESTS_PREFIX = "manifests/"
MANIFEST_VERSION = 1


def new_batch_id(now: float | None = None) -> str:
    """``<UTC open time>-<16 random hex digits>``: sortable by age, unique across every daemon."""
    opened = time.gmtime(time.time() if now is None else now)
    return f"{time.strftime('%Y%m%dT%H%M%SZ', opened)}-{os.urandom(8).hex()}"


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class Batch:
    batch_id: str
    reserved_files: int = 0
    reserved_bytes: int = 0
    in_flight: int = 0
    last_joined: float = field(default_factory=time.monotonic)
    closed_by: str | None = None
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{BATCHES_PREFIX}{self.batch_id}/"

    @property
    def manifest_key(self) -> str:
        return f"{MANIFESTS_PREFIX}{self.batch_id}.json"

    def key_for(self, instance: ReceivedInstance) -> str:
        # The UIDs were validated (digits and dots) before they reach a key; see scp/uids.py.
        return (
            f"{self.prefix}{instance.study_instance_uid}/{instance.series_instance_uid}/{instance.sop_instance_uid}.dcm"
        )

    def manifest(self, bucket: str, closed_at: datetime) -> dict[str, Any]:
        objects = sorted(self.objects.values(), key=lambda record: str(record["key"]))
        received = sorted(str(record["receivedAt"]) for record in objects)
        return {
            "manifestVersion": MANIFEST_VERSION,
            "batchId": self.batch_id,
            "bucket": bucket,
            "prefix": self.prefix,
            "closedBy": self.closed_by,
            "closedAt": iso(closed_at),
            "firstReceivedAt": received[0],
            "lastReceivedAt": received[-1],
            "objectCount": len(objects),
            "byteCount": sum(int(record["bytes"]) for record in objects),
            "callingAETitles": sorted({str(record["callingAETitle"]) for record in objects}),
            "objects": objects,
        }


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
                self._close(batch, "bytes")
                batch = None
            if batch is None:
                batch = self._open = Batch(new_batch_id())
            batch.reserved_files += 1
            batch.reserved_bytes += size
            batch.in_flight += 1
            batch.last_joined = time.monotonic()
            if batch.reserved_files >= self._limits.max_files:
                self._close(batch, "files")
            return batch

    def complete(self, batch: Batch, key: str, instance: ReceivedInstance, size: int) -> bool:
        """Record a stored object; returns True if it replaced one already in this batch."""
        record = {
            "key": key,
            "sopInstanceUid": instance.sop_instance_uid,
            "sopClassUid": instance.sop_class_uid,
            "studyInstanceUid": instance.study_instance_uid,
            "seriesInstanceUid": instance.series_instance_uid,
            "bytes": size,
            "callingAETitle": instance.calling_ae_title,
            "receivedAt": iso(instance.received_at),
        }
        with self._lock:
            replaced = key in batch.objects
            batch.objects[key] = record
            self._leave(batch)
        return replaced

    def leave(self, batch: Batch, size: int) -> None:
        """An object that joined ``batch`` was not stored after all."""
        with self._lock:
            batch.reserved_files -= 1
            batch.reserved_bytes -= size
            self._leave(batch)

    # -- closing -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name="batch-closer", daemon=True)
        self._worker.start()

    def close_all(self, timeout: float) -> list[str]:
        """At shutdown: close the open batch and write every pending manifest; returns the batch ids left open."""
        with self._lock:
            self._stopped = True
            if self._open is not None:
                self._close(self._open, "shutdown")
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout)
        with self._lock:
            return [batch.batch_id for batch in self._closing]

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
                self._close(batch, "window")
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
        if batch.objects:
            try:
                self._write_manifest(batch)
            except Exception as error:  # noqa: BLE001 - retried; the sweeper closes the batch if we never can
                LOG.error(
                    "batch manifest not written, will retry",
                    extra={"batch_id": batch.batch_id, "error": f"{type(error).__name__}: {error}"},
                )
                return False
            self._metrics.batch_closed()
            LOG.info(
                "batch closed",
                extra={
                    "batch_id": batch.batch_id,
                    "closed_by": batch.closed_by,
                    "objects": len(batch.objects),
                    "bytes": sum(int(r["bytes"]) for r in batch.objects.values()),
                },
            )
        with self._lock:
            self._closing.remove(batch)
        return True


def manifest_body(batch: Batch, bucket: str) -> bytes:
    return json.dumps(batch.manifest(bucket, datetime.now(UTC)), indent=1).encode()
