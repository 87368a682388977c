"""The daemon's batch bookkeeping: which batch an object joins."""

from __future__ import annotations

import time

import pytest

from scp.batches import Batches, BatchLimits
from scp.metrics import Metrics


def test_a_batch_quiet_for_its_window_takes_no_new_object_even_while_an_upload_is_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    batches = Batches(BatchLimits(max_files=100, max_bytes=10**9, window_seconds=60), lambda _: None, Metrics())
    first = batches.join(10)  # still uploading: the closer may not close it yet
    clock[0] += 59
    assert batches.join(10) is first
    batches.leave(first, 10)
    clock[0] += 60
    second = batches.join(10)
    assert second is not first
    assert first.closed_by == "window", "the sweeper judges a batch by its quiet time: it must not grow after it"
