"""The forwarder's decisions, with a scripted StoreDICOM: splitting an unexplained refusal, the deadline, and
refusals about the caller that must not fail any instance."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scp.forwarding.forwarder import Forwarder, Limits
from scp.forwarding.results import Results, study_rows
from scp.forwarding.stow import Answer, Body, Outcome, StowError
from scp.instances import ReceivedInstance
from scp.metrics import Metrics
from tests.support.waits import wait_for

STUDY = "1.2.3"


class ScriptedStow:
    """Answers each request with ``answer(uids in the request)``; records what it was sent."""

    def __init__(self, answer: Callable[[list[str]], Answer]) -> None:
        self.answer = answer
        self.requests: list[list[str]] = []

    def store(self, body: Body) -> Answer:
        uids = [path.stem for path in body.paths]
        self.requests.append(uids)
        return self.answer(uids)

    def close(self) -> None:
        pass


def stored(uids: list[str]) -> Answer:
    return Answer(200, {uid: Outcome(stored=True, code=None, reason=None) for uid in uids}, "")


def enqueue(results: Results, tmp_path: Path, uid: str) -> Path:
    """One received CT instance of the study, due to be sent; its file holds a few bytes naming it."""
    path = tmp_path / f"{uid}.dcm"
    path.write_bytes(b"DICM" + uid.encode())
    received = ReceivedInstance(
        "1.2.840.10008.5.1.4.1.1.2", uid, STUDY, "1.2.3.4", "1.2.840.10008.1.2.1", "CT01", 10, datetime.now(UTC)
    )
    results.enqueue(received, path, now=time.time())
    return path


def run(tmp_path: Path, stow: ScriptedStow, uids: list[str], limits: Limits) -> Results:
    results = Results(tmp_path / "db.sqlite")
    for uid in uids:
        enqueue(results, tmp_path, uid)
    forwarder = Forwarder(results, lambda: stow, Metrics(write=lambda line: None), limits)  # type: ignore[arg-type,return-value]
    forwarder.start()
    try:
        wait_for(lambda: results.backlog() == 0, 20, "every instance in an end state")
    finally:
        forwarder.stop(5)
    return results


FAST = Limits(requests_per_second=1000, burst=1000, workers=1, first_backoff_seconds=0.01)


def states(tmp_path: Path) -> dict[str, tuple[str, str | None]]:
    return {row.sop_instance_uid: (row.status, row.reason) for row in study_rows(tmp_path / "db.sqlite", STUDY)}


def test_an_unexplained_refusal_of_several_is_asked_again_one_by_one(tmp_path: Path) -> None:
    def answer(uids: list[str]) -> Answer:
        if "1.2" in uids:
            return Answer(400, {}, "ValidationException: bad instance")
        return stored(uids)

    stow = ScriptedStow(answer)
    # Enqueued before the forwarder starts, so the first request carries all three.
    run(tmp_path, stow, ["1.1", "1.2", "1.3"], FAST)
    assert stow.requests[0] == ["1.1", "1.2", "1.3"]
    assert sorted(stow.requests[1:]) == [["1.1"], ["1.2"], ["1.3"]]
    found = states(tmp_path)
    assert found["1.1"] == ("imported", None) and found["1.3"] == ("imported", None)
    assert found["1.2"] == ("failed", "StoreDICOM refused it: HTTP 400 ValidationException: bad instance")


def test_an_instance_still_not_stored_at_the_deadline_is_failed_with_the_last_error(tmp_path: Path) -> None:
    def answer(uids: list[str]) -> Answer:
        raise StowError("StoreDICOM did not answer in time")

    run(tmp_path, ScriptedStow(answer), ["1.1"], replace(FAST, deadline_seconds=0.2))
    status, reason = states(tmp_path)["1.1"]
    assert status == "failed"
    assert reason == "not stored in HealthImaging within 0.2 s; last error: StoreDICOM did not answer in time"


def test_refused_credentials_fail_nothing_before_the_deadline_and_say_what_to_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def answer(uids: list[str]) -> Answer:
        nonlocal calls
        calls += 1
        return Answer(403, {}, "AccessDeniedException") if calls <= 2 else stored(uids)

    with caplog.at_level(logging.ERROR, logger="scp.forwarding.forwarder"):
        run(tmp_path, ScriptedStow(answer), ["1.1"], FAST)
    assert states(tmp_path)["1.1"] == ("imported", None)
    assert any("medical-imaging:StoreDICOM" in record.getMessage() for record in caplog.records)


def test_withdrawn_instances_are_never_sent_again_and_requests_under_way_are_waited_for(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    def answer(uids: list[str]) -> Answer:
        if "1.1" in uids:
            release.wait(10)  # the first request is under way until the test lets it answer
            return stored(uids)
        return Answer(503, {}, "stand-in unavailable")

    stow = ScriptedStow(answer)
    results = Results(tmp_path / "db.sqlite")
    rows = []
    for uid in ("1.1", "1.2"):
        rows.append((uid, enqueue(results, tmp_path, uid)))
        if uid == "1.1":
            two_workers = replace(FAST, workers=2)
            forwarder = Forwarder(results, lambda: stow, Metrics(write=lambda line: None), two_workers)  # type: ignore[arg-type,return-value]
            forwarder.start()
            wait_for(lambda: stow.requests, 10, "the first request under way")
    wait_for(lambda: len(stow.requests) >= 2, 10, "the second instance refused with 503 at least once")
    try:
        assert forwarder.withdraw(rows, 0.2) == {"1.1"}, "still under way at the deadline"
        release.set()
        assert forwarder.withdraw(rows, 10) == set()
        outcomes = results.outcomes(rows)
        assert outcomes["1.1"][0] == "imported" and outcomes["1.2"][0] == "withdrawn"
        sent = len(stow.requests)
        enqueue(results, tmp_path, "1.1")  # a new receipt is still sent: only the withdrawn ones are not
        forwarder.wake()
        wait_for(lambda: results.backlog() == 0, 10, "the new receipt stored")
        assert stow.requests[sent:] == [["1.1"]], "1.2 was withdrawn and never sent again"
    finally:
        release.set()
        forwarder.stop(5)


def test_instances_waiting_out_a_pause_are_not_under_way_and_a_withdrawal_takes_them(tmp_path: Path) -> None:
    """A closing batch waits only for requests really under way: an instance that would be sent once the pause
    after a 503 ends is withdrawn at once, and never sent (its batch's import job takes it)."""
    stow = ScriptedStow(lambda uids: Answer(503, {}, "stand-in unavailable"))
    results = Results(tmp_path / "db.sqlite")
    rows = []
    paused = Limits(requests_per_second=1000, burst=1000, workers=1, first_backoff_seconds=2.0)  # 1 to 4 s
    forwarder = Forwarder(results, lambda: stow, Metrics(write=lambda line: None), paused)  # type: ignore[arg-type,return-value]
    try:
        for uid in ("1.1", "1.2"):
            rows.append((uid, enqueue(results, tmp_path, uid)))
            if uid == "1.1":
                forwarder.start()
                wait_for(lambda: stow.requests, 10, "the first request answered 503: the forwarder pauses")
        forwarder.wake()
        time.sleep(0.2)  # the worker takes up 1.2, due now, and waits for the pause to end
        started = time.monotonic()
        assert forwarder.withdraw(rows, 0.5) == set(), "nothing is under way while the forwarder pauses"
        assert time.monotonic() - started < 0.4
        time.sleep(4.5)  # past the longest pause
        assert stow.requests == [["1.1"]], "the withdrawn instances were never sent"
    finally:
        forwarder.stop(5)
