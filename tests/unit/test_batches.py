"""The daemon's batch bookkeeping: which batch an object joins, and what a shutdown leaves without a manifest."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from batch_contract.layout import late_batch_id
from scp.batches import Batch, Batches, BatchLimits
from scp.instances import ReceivedInstance
from scp.metrics import Metrics

INSTANCE = ReceivedInstance(
    "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT1", 10, datetime.now(UTC)
)


def test_a_batch_quiet_for_its_window_takes_no_new_object_even_while_an_upload_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    batches = Batches(BatchLimits(max_files=100, max_bytes=10**9, window_seconds=60), lambda _: None, Metrics())
    first = batches.join(10)  # still uploading: the closer may not close it yet
    clock[0] += 59
    assert batches.join(10) is first
    batches.leave(first, 10, "batches/x")
    clock[0] += 60
    second = batches.join(10)
    assert second is not first
    assert first.closed_by == "window", "the sweeper judges a batch by its quiet time: it must not grow after it"


@dataclass
class Closed:
    batches: Batches
    batch: Batch


def closed_batch(write_manifest: Callable[[Batch], None]) -> Closed:
    """One object in a batch that its file count closes at once, with the closer running."""
    batches = Batches(BatchLimits(max_files=1, max_bytes=10**9, window_seconds=60), write_manifest, Metrics())
    batches.start()
    batch = batches.join(10)
    batches.complete(batch, batch.key_for(INSTANCE), INSTANCE, 10)
    return Closed(batches, batch)


def test_late_objects_not_copied_by_shutdown_are_named_and_left_to_the_sweeper_in_their_derived_late_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempted, copying = threading.Event(), threading.Event()  # copying set: S3 takes the copies again

    def write_manifest(batch: Batch) -> None:
        # Another writer sealed the batch listing none of its objects; the copies into the late batch fail.
        late = batch.late_batch(set())
        assert late is not None
        attempted.set()
        if not copying.is_set():
            raise OSError("copy failed")

    sealed = closed_batch(write_manifest)
    try:
        assert attempted.wait(10), "the closer never tried"
        assert sealed.batches.close_all(timeout=0.1) == []  # nothing for the sweeper: this batch has a manifest
    finally:
        copying.set()  # lets the closer finish
    (logged,) = [r for r in caplog.records if r.getMessage().startswith("late objects of a batch sealed elsewhere")]
    assert logged.levelname == "WARNING"
    batch = sealed.batch
    assert (logged.batch_id, logged.instances, logged.sop_instance_uids) == (batch.batch_id, 1, ["1.2.3.4"])
    # The batch the sweeper puts them into, should the copies never be made here.
    assert batch.successor is not None and logged.late_batch_id == batch.successor.batch_id
    assert batch.successor.batch_id == late_batch_id(batch.batch_id)


def test_a_batch_without_a_manifest_at_shutdown_is_left_to_the_sweeper() -> None:
    attempted, writing = threading.Event(), threading.Event()

    def write_manifest(batch: Batch) -> None:
        attempted.set()
        if not writing.is_set():
            raise OSError("S3 unreachable")

    closed = closed_batch(write_manifest)
    try:
        assert attempted.wait(10), "the closer never tried"
        assert closed.batches.close_all(timeout=0.1) == [closed.batch.batch_id]
    finally:
        writing.set()
