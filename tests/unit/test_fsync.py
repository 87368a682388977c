"""Directory fsyncs shared by concurrent callers: each answered by an fsync that began after it called, or failed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from scp.fsync import DirectorySyncs, fsync_directory


class GatedFlush:
    """A directory flush that records when each one begins and ends, and holds the first until released."""

    def __init__(self, failing: bool = False) -> None:
        self.begun: list[float] = []
        self.ended: list[float] = []
        self.first_running = threading.Event()
        self.release_first = threading.Event()
        self.failing = failing

    def __call__(self, directory: Path) -> None:
        self.begun.append(time.monotonic())
        if len(self.begun) == 1:
            self.first_running.set()
            assert self.release_first.wait(10)
        fsync_directory(directory)
        self.ended.append(time.monotonic())
        if self.failing and len(self.begun) == 2:
            raise OSError(5, "Input/output error")


def call_during_the_first_flush(syncs: DirectorySyncs, flush: GatedFlush, directory: Path, callers: int) -> list:
    """One caller starts a flush and is held in it; ``callers`` more call meanwhile. Returns each one's outcome
    (None or its error) and the time it called."""
    outcomes: list = []

    def call() -> None:
        called = time.monotonic()
        try:
            syncs.sync(directory)
            outcomes.append((called, None))
        except OSError as error:
            outcomes.append((called, error))

    first = threading.Thread(target=call)
    first.start()
    assert flush.first_running.wait(10)
    others = [threading.Thread(target=call) for _ in range(callers)]
    for thread in others:
        thread.start()
    time.sleep(0.3)  # all of them waiting for the running flush
    flush.release_first.set()
    for thread in [first, *others]:
        thread.join(10)
    return outcomes


def test_callers_arriving_during_a_flush_share_the_next_one_which_begins_after_they_called(tmp_path: Path) -> None:
    flush = GatedFlush()
    syncs = DirectorySyncs(flush)
    outcomes = call_during_the_first_flush(syncs, flush, tmp_path, callers=7)
    assert len(outcomes) == 8 and all(error is None for _, error in outcomes)
    assert len(flush.begun) == 2, "the seven callers that waited shared one flush"
    # The held flush began before they called: the shared one, which answers them, began after every one of them.
    latest_call = max(called for called, _ in outcomes)
    assert flush.begun[1] >= latest_call
    syncs.sync(tmp_path)  # nothing running: a caller alone runs its own at once
    assert len(flush.begun) == 3


def test_a_failed_shared_flush_fails_every_caller_it_was_for(tmp_path: Path) -> None:
    flush = GatedFlush(failing=True)
    syncs = DirectorySyncs(flush)
    outcomes = call_during_the_first_flush(syncs, flush, tmp_path, callers=5)
    errors = [error for _, error in outcomes]
    assert errors.count(None) == 1, "only the caller of the first flush, which succeeded"
    assert all(error.errno == 5 for error in errors if error is not None)
    syncs.sync(tmp_path)  # the next flush succeeds: it is not answered by the failed one


def test_a_real_directory_flush(tmp_path: Path) -> None:
    DirectorySyncs().sync(tmp_path)
    with pytest.raises(FileNotFoundError):
        DirectorySyncs().sync(tmp_path / "missing")
