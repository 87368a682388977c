"""The Storage Commitment SCP at work: takes N-ACTION requests, judges their instances until each is decided or
the deadline passes, and delivers the report on the request's own association while it is open, otherwise on a
new association to the AE named in COMMITMENT_PEERS, retrying until one answers."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from scp import dimse
from scp.commitment.committer import Evidence, at_deadline
from scp.commitment.pending import Added, PendingRequest, PendingRequests
from scp.commitment.report import Report, build_report
from scp.commitment.request import ActionBudget, ActionData, Refused, check_command, parse_request
from scp.commitment.sender import DeliveryFailed, ReportSender
from scp.config import CommitmentPeer
from scp.logs import printable
from scp.status import Status

LOG = logging.getLogger(__name__)

# How often awaited instances are looked for: every second while a study is likely still arriving, then less
# often, so that requests waiting out a long COMMITMENT_TIMEOUT cost little.
_RECHECK_SECONDS = 1.0
_RECHECK_LATE_SECONDS = 10.0
_ARRIVING_SECONDS = 60.0
_PASS_GAP_SECONDS = 0.2  # responses and ended associations wake the loop; at most five passes a second
_RETRY_FIRST_SECONDS = 10.0
_RETRY_MAX_SECONDS = 600.0
_DELIVERY_THREADS = 4


class ChannelClosed(Exception):
    """The request's association has ended; the report goes on a new association."""


class ReportChannel(Protocol):
    """The association an N-ACTION came on, while it is open."""

    def next_message_id(self) -> int:
        """A Message ID for a request of ours on this association."""

    def send_event_report(self, report: Report, message_id: int) -> None:
        """Send the N-EVENT-REPORT-RQ. Raises ``ChannelClosed``."""


@dataclass(frozen=True)
class ActionAnswer:
    """The N-ACTION-RSP status; an accepted request's Transaction UID, for :meth:`CommitmentService.responded`."""

    status: int
    comment: str | None = None
    transaction_uid: str | None = None


@dataclass(frozen=True)
class _InFlight:
    channel: ReportChannel
    message_id: int
    report: Report


class CommitmentService:
    def __init__(
        self,
        pending: PendingRequests,
        evidence: Evidence,
        sender: ReportSender,
        peers: tuple[CommitmentPeer, ...],
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pending = pending
        self._evidence = evidence
        self._sender = sender
        self._peers = {peer.ae_title: peer for peer in peers}
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        # One request decoded at a time: 10,000 references take about 26 MiB and a second of CPU to decode, and
        # the GIL runs one decode at a time anyway, so associations decoding at once would only add up the memory.
        self._decoding = threading.Lock()
        self._budget = ActionBudget()
        self._held: set[str] = set()  # accepted, N-ACTION-RSP not yet sent: no report may overtake it
        self._channels: dict[str, ReportChannel] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._delivering: set[str] = set()  # on a delivery thread now
        self._deliveries = ThreadPoolExecutor(_DELIVERY_THREADS, thread_name_prefix="commitment-delivery")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)

    # -- the association's side ------------------------------------------------------------------------------

    def new_action(self) -> ActionData:
        """Where an N-ACTION's data set is held as it arrives, within what all associations may hold together."""
        return ActionData(self._budget)

    def handle_action(
        self, command: dimse.Command, transfer_syntax: str, action: ActionData | None, calling_ae_title: str,
        log_fields: Mapping[str, Any],
    ) -> ActionAnswer:  # fmt: skip
        """PS3.4 J.3.2.1.3: answer at once; Success means the request is durably pending, not yet committed."""
        try:
            check_command(command)
            with self._decoding:
                request = parse_request(action, transfer_syntax)
        except Refused as refused:
            return self._refuse(refused.status, refused.reason, log_fields)
        finally:
            if action is not None:
                action.release()
        now = self._clock()
        try:
            added = self._pending.add(request, calling_ae_title, now, now + self._timeout)
        except sqlite3.Error as error:
            LOG.error("commitment request not recorded", extra={**log_fields, "error": str(error)})
            return ActionAnswer(Status.PROCESSING_FAILURE, "commitment requests cannot be recorded")
        if added is Added.FULL:
            return self._refuse(
                Status.RESOURCE_LIMITATION, "too many instances awaiting commitment; retry later", log_fields,
                request.transaction_uid,
            )  # fmt: skip
        if added is Added.REUSED:
            return self._refuse(
                Status.INVALID_ARGUMENT_VALUE, "Transaction UID already used for another request", log_fields,
                request.transaction_uid,
            )  # fmt: skip
        with self._lock:
            self._held.add(request.transaction_uid)
        LOG.info(
            "commitment requested",
            extra={
                **log_fields,
                "transaction_uid": request.transaction_uid,
                "instances": len(request.references),
                "repeated": added is Added.REPEATED,
            },
        )
        return ActionAnswer(Status.SUCCESS, None, request.transaction_uid)

    def responded(self, transaction_uid: str, channel: ReportChannel | None) -> None:
        """The N-ACTION-RSP has been sent (``channel`` None if sending it failed): the report may follow."""
        with self._lock:
            self._held.discard(transaction_uid)
            if channel is not None:
                self._channels[transaction_uid] = channel
        self._wake.set()

    def report_answered(self, channel: ReportChannel, message_id: int, status: int | None) -> bool:
        """An N-EVENT-REPORT-RSP arrived on ``channel``; False if it answers nothing we sent."""
        key = (channel, message_id)
        with self._lock:
            answered = (uid for uid, sent in self._in_flight.items() if (sent.channel, sent.message_id) == key)
            found = next(answered, None)
            sent = self._in_flight.pop(found) if found is not None else None
            if found is not None:
                self._channels.pop(found, None)
        if found is None or sent is None:
            return False
        self._finish(sent.report, status, "same association", self._clock())
        return True

    def channel_closed(self, channel: ReportChannel) -> None:
        """The association ended: what was to be reported on it goes on a new association."""
        with self._lock:
            for uid in [uid for uid, known in self._channels.items() if known is channel]:
                del self._channels[uid]
            unanswered = [uid for uid, sent in self._in_flight.items() if sent.channel is channel]
            for uid in unanswered:
                del self._in_flight[uid]
        now = self._clock()
        for uid in unanswered:
            self._pending.wait_until(uid, now)
        if unanswered:
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Pending requests stay in the database and are answered after the next start."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        self._deliveries.shutdown(wait=False, cancel_futures=True)
        while time.monotonic() < deadline:
            with self._lock:
                if not self._delivering:
                    break
            time.sleep(0.05)
        with self._lock:
            delivering = bool(self._delivering)
        if delivering:
            # Cut short by the exit: the request is still pending on disk and is reported again after the restart.
            LOG.warning("commitment delivery still running at exit", extra={"deliveries": len(self._delivering)})
            return
        self._pending.close()

    # -- the loop ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(_RECHECK_SECONDS)
            self._wake.clear()
            try:
                self.process_due()
            except Exception as error:
                LOG.exception("commitment processing failed", extra={"error": type(error).__name__})
            self._stopping.wait(_PASS_GAP_SECONDS)

    def process_due(self) -> None:
        """Judge and, where decided, report every request that is due; one pass."""
        now = self._clock()
        with self._lock:
            busy = self._held | set(self._in_flight) | self._delivering
        for request in self._pending.due(now, exclude=busy):
            if self._stopping.is_set():
                return
            report = self._decide(request, now)
            if report is not None:
                self._deliver(request, report, now)

    def _decide(self, request: PendingRequest, now: float) -> Report | None:
        # Decided references are not judged again, so a request of 10,000 instances costs little per recheck.
        undecided = self._pending.references(request.transaction_uid, undecided_only=True)
        if undecided:
            verdicts = self._evidence.judge([state.reference for state in undecided])
            expired = now >= request.deadline
            decided = [
                (state.position, at_deadline(verdict) if expired else verdict.outcome)
                for state, verdict in zip(undecided, verdicts, strict=True)
                if expired or verdict.outcome is not None
            ]
            self._pending.resolve(request.transaction_uid, [(p, o) for p, o in decided if o is not None])
            if len(decided) < len(undecided):
                arriving = now - request.received_at < _ARRIVING_SECONDS
                recheck = now + (_RECHECK_SECONDS if arriving else _RECHECK_LATE_SECONDS)
                self._pending.wait_until(request.transaction_uid, min(request.deadline, recheck))
                return None
        states = self._pending.references(request.transaction_uid)
        outcomes = [(state.reference, state.outcome) for state in states if state.outcome is not None]
        return build_report(request.transaction_uid, outcomes)

    def _deliver(self, request: PendingRequest, report: Report, now: float) -> None:
        uid = request.transaction_uid
        with self._lock:
            channel = self._channels.get(uid)
        if channel is not None:
            message_id = channel.next_message_id()
            with self._lock:  # before sending: the response may arrive before send returns
                self._in_flight[uid] = _InFlight(channel, message_id, report)
            try:
                channel.send_event_report(report, message_id)
            except ChannelClosed:
                with self._lock:
                    self._channels.pop(uid, None)
                    self._in_flight.pop(uid, None)
            else:
                return
        peer = self._peers.get(request.calling_ae_title)
        if peer is None:
            retry = now + _RETRY_MAX_SECONDS
            self._pending.retry_later(uid, retry, "no COMMITMENT_PEERS entry for the requesting AE")
            LOG.warning(
                "commitment report waits: no address for the requesting AE",
                extra={"transaction_uid": uid, "calling_ae": printable(request.calling_ae_title),
                       "setting": "COMMITMENT_PEERS", "retry_in_seconds": _RETRY_MAX_SECONDS},
            )  # fmt: skip
            return
        with self._lock:
            self._delivering.add(uid)
        self._deliveries.submit(self._deliver_to_peer, request, peer, report)

    def _deliver_to_peer(self, request: PendingRequest, peer: CommitmentPeer, report: Report) -> None:
        """On a delivery thread: a peer that does not answer holds up only its own reports."""
        uid = request.transaction_uid
        try:
            status = self._sender.deliver(peer, report)
        except (DeliveryFailed, OSError, RuntimeError) as error:
            delay = min(_RETRY_MAX_SECONDS, _RETRY_FIRST_SECONDS * 2**request.attempts)
            self._pending.retry_later(uid, self._clock() + delay, str(error))
            LOG.warning(
                "commitment report not delivered",
                extra={"transaction_uid": uid, "peer": f"{peer.ae_title}@{peer.host}:{peer.port}",
                       "error": printable(error), "retry_in_seconds": delay},
            )  # fmt: skip
        except Exception as error:
            LOG.exception("commitment delivery failed", extra={"transaction_uid": uid, "error": type(error).__name__})
        else:
            self._finish(report, status, f"new association to {peer.ae_title}@{peer.host}:{peer.port}", self._clock())
        finally:
            with self._lock:
                self._delivering.discard(uid)

    def _finish(self, report: Report, status: int | None, via: str, now: float) -> None:
        self._pending.reported(report.transaction_uid, report.event_type, now)
        fields = {
            "transaction_uid": report.transaction_uid,
            "event_type": report.event_type,
            "committed": report.committed,
            "failed": report.failed,
            "via": via,
            "response_status": None if status is None else f"0x{status:04X}",
        }
        # A modality that answers the report with a failure has still received it; it is not sent again.
        LOG.log(logging.INFO if status == Status.SUCCESS else logging.WARNING, "commitment reported", extra=fields)

    def _refuse(
        self, status: int, reason: str, log_fields: Mapping[str, Any], transaction_uid: str | None = None
    ) -> ActionAnswer:
        LOG.warning(
            "commitment request refused",
            extra={**log_fields, "status": f"0x{status:04X}", "reason": reason, "transaction_uid": transaction_uid},
        )
        return ActionAnswer(status, reason)
