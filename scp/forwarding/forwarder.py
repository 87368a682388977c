"""The forwarder: worker threads that send what the outbox holds to StoreDICOM and record each answer.

Nothing here is on the receive path: a C-STORE only adds a row and wakes a worker. Throttling (HTTP 429), server
errors and lost connections pause every worker with exponential backoff and full jitter, and the instances are
sent again later; an instance HealthImaging refuses, or one still not stored after ``DEADLINE_SECONDS``, is
recorded failed with its reason.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.timestamps import iso_millis
from scp.forwarding.results import FAILED, IMPORTED, WARNING, Pending, Results
from scp.forwarding.stow import MAXIMUM_REQUEST_BYTES, Answer, Body, StowClient, StowError
from scp.metrics import Metrics

LOG = logging.getLogger(__name__)

# The guide's throttling table (throttling-limits.html) lists 50 tps, burst 100, for the DICOMweb retrieve
# representations and, in the copies published so far, no row for StoreDICOM; the forwarder stays well below
# that and slows down further whenever HealthImaging answers 429. Several instances share one request (the
# guide allows 1 GB per request), so the request rate, not the instance rate, is what the throttle meters.
REQUESTS_PER_SECOND = 20.0
REQUEST_BURST = 20
WORKERS = 4
INSTANCES_PER_REQUEST = 32
BYTES_PER_REQUEST = 128 * 1024 * 1024
# An instance not stored within a day of its receipt is recorded failed with the last error seen: a day covers
# any outage HealthImaging has had, and the status command must not say "on its way" forever.
DEADLINE_SECONDS = 24 * 3600.0
FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 15.0
_IDLE_WAIT_SECONDS = 1.0
_MINIMUM_WAIT_SECONDS = 0.01
_SUMMARY_SECONDS = 60.0
# How old the newest rows may be when a power loss takes them (docs/forwarding.rst, "Crashes and restarts").
CHECKPOINT_SECONDS = 1.0
# HTTP answers that say "not now" rather than "never": throttled, timed out, or HealthImaging's own fault.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Answers about the caller, not the instance: credentials, permissions, a data store that does not exist. They
# apply to every instance alike, so nothing is failed for them before the deadline; they are logged as errors.
_CONFIGURATION_STATUSES = frozenset({401, 403, 404})


@dataclass(frozen=True)
class Limits:
    requests_per_second: float = REQUESTS_PER_SECOND
    burst: int = REQUEST_BURST
    workers: int = WORKERS
    instances_per_request: int = INSTANCES_PER_REQUEST
    bytes_per_request: int = BYTES_PER_REQUEST
    deadline_seconds: float = DEADLINE_SECONDS
    first_backoff_seconds: float = FIRST_BACKOFF_SECONDS


class Forwarder:
    def __init__(
        self,
        results: Results,
        new_client: Callable[[], StowClient],
        metrics: Metrics,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._results = results
        self._new_client = new_client
        self._metrics = metrics
        self._limits = limits
        self._clock = clock
        # Woken by every stored object: one idle worker at most, and a flag, so a wake while every worker is busy
        # is not lost and costs the receive path nothing more.
        self._work = threading.Condition()
        self._new_work = False
        self._idle_workers = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        # Notified whenever requests end, for ``withdraw``.
        self._requests_ended = threading.Condition(self._lock)
        self._tokens = float(limits.burst)
        self._tokens_at = time.monotonic()
        self._paused_until = 0.0
        self._failures_in_a_row = 0
        self._failing_since: float | None = None
        self._last_summary = 0.0
        self._retried_since_summary = 0
        self._threads: list[threading.Thread] = []
        # S3 mode: told of each instance StoreDICOM stored, to note it on its S3 object (scp/forwarding/s3_batches.py).
        self.on_stored: Callable[[Pending, StoredByStoreDICOM], None] | None = None

    def start(self) -> None:
        backlog = self._results.backlog()
        self._metrics.forward_backlog(backlog)
        if backlog:
            LOG.info("StoreDICOM forwarding resumes", extra={"instances": backlog})
        for number in range(self._limits.workers):
            thread = threading.Thread(target=self._run, name=f"forward-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        durability = threading.Thread(target=self._checkpoints, name="forward-checkpoint", daemon=True)
        durability.start()
        self._threads.append(durability)

    def wake(self) -> None:
        with self._work:
            self._new_work = True
            if self._idle_workers:
                self._work.notify()

    def stop(self, timeout: float) -> None:
        """Stop taking work; requests in flight get ``timeout`` to finish, the rest resume after a restart."""
        self._stopping.set()
        with self._work:
            self._work.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = self._results.backlog()
        LOG.info("StoreDICOM forwarding stopped", extra={"instances_waiting": left})

    def withdraw(self, rows: Sequence[tuple[str, Path]], timeout: float) -> set[str]:
        """Take (SOP Instance UID, location) rows out of forwarding: none is sent again, and the requests under way
        that carry one get ``timeout`` seconds to end. Returns the SOP Instance UIDs still being sent then."""
        deadline = time.monotonic() + timeout
        wanted = {uid for uid, _ in rows}
        with self._requests_ended:
            # Under the lock that claims work: a row is either in flight already, or never claimed again.
            self._results.withdraw(rows)
            while True:
                sending = wanted & self._in_flight
                remaining = deadline - time.monotonic()
                if not sending or remaining <= 0:
                    return sending
                self._requests_ended.wait(remaining)

    # -- the workers -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        client = self._new_client()
        try:
            while not self._stopping.is_set():
                batch = self._claim()
                if not batch:
                    self._idle()
                    continue
                try:
                    self._send(client, batch)
                except Exception:  # a worker must outlive any one request; the rows stay due
                    LOG.exception("StoreDICOM request failed unexpectedly")
                    self._retry(batch, "unexpected error in the forwarder", pause=True, answered=False)
                finally:
                    with self._lock:
                        self._in_flight.difference_update(p.sop_instance_uid for p in batch)
                        self._requests_ended.notify_all()
        finally:
            client.close()

    def _checkpoints(self) -> None:
        while not self._stopping.wait(CHECKPOINT_SECONDS):
            try:
                self._results.checkpoint(self._clock())
            except sqlite3.Error as error:
                LOG.error("forwarding database checkpoint failed", extra={"error": str(error)})

    def _idle(self) -> None:
        """Wait until an instance not being sent is due, or a new one is stored (``wake``)."""
        with self._work:
            if self._new_work:
                self._new_work = False
                return
        with self._lock:
            upcoming = self._results.due(float("inf"), 1, self._in_flight)
        wait = _IDLE_WAIT_SECONDS
        if upcoming:
            wait = min(wait, max(upcoming[0].next_attempt_at - self._clock(), _MINIMUM_WAIT_SECONDS))
        with self._work:
            if self._new_work or self._stopping.is_set():
                self._new_work = False
                return
            self._idle_workers += 1
            self._work.wait(wait)
            self._idle_workers -= 1
            self._new_work = False

    def _claim(self) -> list[Pending]:
        """Wait for a request token, then take what is due (and not being sent). In that order: instances claimed
        while a pause runs would count as under way, so a closing batch would wait for them, give up and leave them
        to its import job, and the request sent after the pause would store them a second time."""
        if not self._wait_for_turn():
            return []
        with self._lock:
            due = self._results.due(self._clock(), self._limits.instances_per_request, self._in_flight)
            batch: list[Pending] = []
            size = 0
            for pending in due:
                if batch and size + pending.size > self._limits.bytes_per_request:
                    break
                batch.append(pending)
                size += pending.size
            self._in_flight.update(p.sop_instance_uid for p in batch)
            if not batch:
                self._tokens = min(float(self._limits.burst), self._tokens + 1)  # nothing due: the token goes back
        return batch

    def _wait_for_turn(self) -> bool:
        """Take one request token (and respect a pause); False if stopping."""
        while not self._stopping.is_set():
            with self._lock:
                now = time.monotonic()
                self._tokens = min(
                    float(self._limits.burst),
                    self._tokens + (now - self._tokens_at) * self._limits.requests_per_second,
                )
                self._tokens_at = now
                wait = max(self._paused_until - now, 0.0)
                if not wait and self._tokens >= 1:
                    self._tokens -= 1
                    return True
                wait = wait or (1 - self._tokens) / self._limits.requests_per_second
            self._stopping.wait(wait)
        return False

    # -- one request -------------------------------------------------------------------------------------------

    def _send(self, client: StowClient, batch: Sequence[Pending]) -> None:
        sendable = []
        for pending in batch:
            if pending.size > MAXIMUM_REQUEST_BYTES:
                self._fail(
                    pending, f"larger than StoreDICOM's {MAXIMUM_REQUEST_BYTES:,} bytes per request", answered=False
                )
            elif not pending.location.is_file():
                self._fail(pending, "the stored file is no longer in the local store", answered=False)
            else:
                sendable.append(pending)
        if not sendable:
            return
        try:
            with Body([p.location for p in sendable]) as body:
                self._results.sending(sendable)
                answer = client.store(body)
        except StowError as error:
            self._retry(sendable, str(error), pause=True, answered=False)
            return
        except OSError as error:
            reason = f"reading the stored file failed: {error.strerror or error}"
            self._retry(sendable, reason, pause=False, answered=False)
            return
        self._apply(client, sendable, answer)

    def _apply(self, client: StowClient, batch: Sequence[Pending], answer: Answer) -> None:
        if answer.status in _RETRY_STATUSES:
            # A throttled request was not processed; after a server error or a timeout it may have been.
            error = f"StoreDICOM answered HTTP {answer.status}"
            self._retry(batch, error, pause=True, answered=answer.status == 429)
            return
        if answer.status in _CONFIGURATION_STATUSES:
            LOG.error(
                "StoreDICOM refused the request: check the credentials, their medical-imaging:StoreDICOM "
                "permission and DATASTORE_ID",
                extra={"http_status": answer.status, "answer": answer.message},
            )
            self._retry(batch, f"StoreDICOM answered HTTP {answer.status}: {answer.message}", pause=True, answered=True)
            return
        if not answer.outcomes and 400 <= answer.status < 500:
            if len(batch) > 1:
                # The answer does not say which instance it is about: ask for each on its own.
                self._results.refused(batch)
                for pending in batch:
                    if not self._wait_for_turn():
                        return  # stopping: the rest stay due
                    self._send(client, [pending])
                return
            self._fail(
                batch[0], f"StoreDICOM refused it: HTTP {answer.status} {answer.message}".rstrip(), answered=True
            )
            return
        if not answer.outcomes and 200 <= answer.status < 300:
            # PS3.18 10.5.3: 200 means every instance was stored, even if the answer lists none of them.
            for pending in batch:
                self._stored(pending, IMPORTED, None, None)
            self._recovered()
            return
        if not answer.outcomes:
            self._retry(batch, f"StoreDICOM answered HTTP {answer.status}: {answer.message}", pause=True, answered=True)
            return
        for pending in batch:
            outcome = answer.outcomes.get(pending.sop_instance_uid)
            if outcome is None:
                # Not named is not "not stored": the request counts as one whose answer about it was lost.
                self._retry([pending], "StoreDICOM's answer did not name the instance", pause=False, answered=False)
            elif outcome.stored:
                self._stored(pending, WARNING if outcome.code else IMPORTED, outcome.image_set_id, outcome.reason)
            elif outcome.retryable:
                self._retry([pending], outcome.reason or "StoreDICOM out of resources", pause=True, answered=True)
            else:
                self._fail(pending, outcome.reason or "StoreDICOM failure", answered=True)
        self._recovered()

    # -- outcomes ----------------------------------------------------------------------------------------------

    def _stored(self, pending: Pending, status: str, image_set_id: str | None, reason: str | None) -> None:
        now = self._clock()
        duplicates = self._results.stored(pending, status, image_set_id, reason, now)
        self._metrics.forward_stored(round((now - pending.enqueued_at) * 1000, 1), duplicates)
        if self.on_stored is not None:
            stored_at = iso_millis(datetime.fromtimestamp(now, UTC))
            self.on_stored(pending, StoredByStoreDICOM(stored_at, image_set_id, reason if status == WARNING else None))
        if status == WARNING:
            LOG.warning(
                "stored in HealthImaging with a warning",
                extra={"sop_instance_uid": pending.sop_instance_uid, "reason": reason},
            )

    def _fail(self, pending: Pending, reason: str, answered: bool) -> None:
        self._results.failed(pending, reason, self._clock(), answered)
        self._metrics.forward_failed()
        LOG.warning(
            "not stored in HealthImaging",
            extra={"sop_instance_uid": pending.sop_instance_uid, "status": FAILED, "reason": reason},
        )

    def _retry(self, batch: Sequence[Pending], error: str, pause: bool, answered: bool) -> None:
        now = self._clock()
        for pending in batch:
            if now - pending.enqueued_at >= self._limits.deadline_seconds:
                within = _span(self._limits.deadline_seconds)
                self._fail(pending, f"not stored in HealthImaging within {within}; last error: {error}", answered)
                continue
            self._results.retry_later(pending, error, now + self._backoff(pending.attempts + 1), answered)
            self._metrics.forward_retried()
        with self._lock:
            self._retried_since_summary += len(batch)
            if pause:
                self._failures_in_a_row += 1
                self._paused_until = max(self._paused_until, time.monotonic() + self._backoff(self._failures_in_a_row))
                if self._failing_since is None:
                    self._failing_since = now
            summary_due = time.monotonic() - self._last_summary >= _SUMMARY_SECONDS
            if summary_due:
                self._last_summary = time.monotonic()
                retried, self._retried_since_summary = self._retried_since_summary, 0
        if summary_due:
            # One line per interval, however many instances wait: a long outage must not flood the log.
            backlog = self._results.backlog()
            self._metrics.forward_backlog(backlog)
            LOG.warning(
                "StoreDICOM failing; instances wait in the local store and are sent again",
                extra={"error": error, "instances_retried": retried, "instances_waiting": backlog},
            )

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
        first = self._limits.first_backoff_seconds
        ceiling = min(_MAX_BACKOFF_SECONDS, first * 2 ** min(attempt, 16))
        return random.uniform(first / 2, ceiling)  # noqa: S311 - spreading retries, not security

    def _recovered(self) -> None:
        with self._lock:
            self._failures_in_a_row = 0
            was_failing, self._failing_since = self._failing_since, None
        self._metrics.forward_backlog(self._results.backlog())
        if was_failing is not None:
            LOG.info("StoreDICOM answering again", extra={"failing_seconds": round(self._clock() - was_failing, 1)})


def _span(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
