"""One association, from TCP accept to release or abort: negotiation, then C-ECHO and C-STORE served in turn.

Each association runs on its own thread with blocking reads, so an idle association costs no CPU. Received data
set fragments go straight from the PDU buffer to the receive file (behind the Part-10 header written from the
command), so an object is never held in memory and never copied on its way to the store. What a command means
and what it is answered is the handlers' job (scp/handlers.py); this module only reassembles and sends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scp import dimse
from scp.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from scp.commitment.channel import AssociationChannel
from scp.commitment.request import ActionData
from scp.commitment.service import CommitmentService
from scp.config import Settings
from scp.handlers import PendingStore, StoreHandler, handle_echo
from scp.logs import printable
from scp.metrics import Metrics
from scp.negotiation import LOCAL_LIMIT_EXCEEDED, REJECT_REASONS, Policy, Rejected, rejection_pdu
from scp.proxy_protocol import FIXED_LENGTH, ProxyHeaderError, payload_length
from scp.proxy_protocol import parse as parse_proxy_header
from scp.receive_file import ReceiveFile
from scp.upper_layer import (
    AbortReason,
    PduReader,
    PduType,
    PeerClosed,
    PeerSilent,
    ProtocolError,
    abort,
    p_data,
    release_rp,
    send_within,
)

LOG = logging.getLogger("scp.association")

HEALTHCHECK_AE_TITLE = "HEALTHCHECK"
# An A-ASSOCIATE-RQ proposing the maximum 128 contexts with every transfer syntax we know stays far below this.
_MAX_REQUEST_PDU = 256 * 1024
# A command set is a few hundred bytes; more is an attack on memory.
_MAX_COMMAND_SET = 64 * 1024
_COMMAND_FRAGMENT = 0x01
_LAST_FRAGMENT = 0x02
_PROVIDER = 2
# An A-ABORT to a peer whose receive window is full never goes out; the abort waits this long at most, for the
# send lock (another thread may be blocked sending) and for the send itself.
_ABORT_SEND_SECONDS = 1.0


@dataclass
class _Message:
    """A DIMSE message being received."""

    context_id: int
    command_bytes: bytearray
    command: dimse.Command | None = None
    store: PendingStore | None = None
    receive_file: ReceiveFile | None = None  # the store's, held here for the per-fragment write
    action: ActionData | None = None  # an N-ACTION's data set, bounded


class Registry:
    """Live connections (drain aborts what outlives the grace) and, among them, the associations admitted so far,
    whose number MAXIMUM_ASSOCIATIONS bounds. Connections that never send a request do not take a slot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[Association] = set()
        self._admitted: set[Association] = set()

    def add(self, association: Association) -> None:
        with self._lock:
            self._live.add(association)

    def admit(self, association: Association, limit: int) -> bool:
        with self._lock:
            if len(self._admitted) >= limit:
                return False
            self._admitted.add(association)
            return True

    def remove(self, association: Association) -> None:
        with self._lock:
            self._live.discard(association)
            self._admitted.discard(association)

    def snapshot(self) -> list[Association]:
        with self._lock:
            return list(self._live)


class Association:
    def __init__(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        settings: Settings,
        policy: Policy,
        handler: StoreHandler,
        registry: Registry,
        metrics: Metrics,
        on_end: Callable[[], None] = lambda: None,
        commitment: CommitmentService | None = None,
    ) -> None:
        self._socket = sock
        self._peer = f"{address[0]}:{address[1]}"
        self._settings = settings
        self._policy = policy
        self._handler = handler
        self._registry = registry
        self._metrics = metrics
        self._on_end = on_end
        self._commitment = commitment
        self._report_channel: AssociationChannel | None = None
        self._peer_maximum_length = 0
        self._ended = False  # released or aborted: nothing more may be sent from another thread
        sock.setblocking(False)  # reads and sends wait in poll under their own deadlines (scp/upper_layer.py)
        self._reader = PduReader(sock)
        self._send_lock = threading.Lock()
        self._contexts: dict[int, tuple[str, str]] = {}
        self._calling = ""
        self._called = ""
        self._message: _Message | None = None
        self._aborted_by_us = False
        self._requested = False
        self._who_fields: dict[str, Any] | None = None  # once the request has named both AE titles

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve the connection to its end; never raises."""
        self._registry.add(self)
        try:
            self._serve()
        except PeerClosed as closed:
            if self._requested:
                self._log_end(logging.WARNING, "association aborted", reason=f"connection lost: {closed}")
            else:  # port probes and load balancer health checks connect and leave without a word
                self._log_end(logging.DEBUG, "connection closed before an association request")
        except ProxyHeaderError as refused:
            self._log_end(logging.WARNING, "connection refused: no valid PROXY protocol v2 header", reason=str(refused))
        except PeerSilent as silent:
            self._abort(AbortReason.NOT_SPECIFIED)
            self._log_end(logging.WARNING, "association aborted", reason=f"timeout: {silent}")
        except ProtocolError as error:
            self._abort(error.reason)
            self._log_end(logging.WARNING, "association aborted", reason=f"protocol error: {printable(error.detail)}")
        except Exception as error:
            self._abort(AbortReason.NOT_SPECIFIED)
            LOG.exception("association failed", extra={**self._who(), "error": type(error).__name__})
        finally:
            with self._send_lock:
                self._ended = True
            if self._commitment is not None and self._report_channel is not None:
                self._commitment.channel_closed(self._report_channel)
            self._discard_message()
            self._registry.remove(self)
            self._metrics.association_ended(self)
            self._close()
            self._on_end()

    def abort_from_outside(self) -> None:
        """Shutdown: abort this association from another thread within about a second, whatever its peer does;
        its own thread wakes on the shut-down socket, in a read or in a send."""
        self._abort(AbortReason.NOT_SPECIFIED)
        with contextlib.suppress(OSError):  # already closed by its own thread
            self._socket.shutdown(socket.SHUT_RDWR)

    # -- negotiation -------------------------------------------------------------------------------------------

    def _serve(self) -> None:
        # PS3.8 9.1.2: the ARTIM timer bounds the wait for the association request, PROXY header included.
        seconds = self._settings.acse_timeout
        deadline = time.monotonic() + seconds
        if self._settings.proxy_protocol:
            self._read_proxy_header(deadline, f"PROXY protocol header incomplete after {seconds:g} s")
        pdu_type, body = self._reader.read_by(deadline, seconds, _MAX_REQUEST_PDU)
        if pdu_type != PduType.ASSOCIATE_RQ:
            raise ProtocolError(AbortReason.UNEXPECTED_PDU, f"expected an A-ASSOCIATE-RQ, got PDU 0x{pdu_type:02X}")
        self._requested = True
        # The AE title policy reads the fixed fields only: a refused peer costs no decoding and leaves no trace
        # in the remembered negotiations.
        request = self._policy.decode_request(bytes(body))
        self._calling, self._called = request.calling_ae_title, request.called_ae_title
        self._who_fields = self._who()  # every C-STORE's outcome line carries these: built once
        code = self._policy.rejection(request)
        if code is None and not self._registry.admit(self, self._settings.maximum_associations):
            code = LOCAL_LIMIT_EXCEEDED
        accepted = None
        if code is None:
            try:
                accepted = self._policy.accept(request)
            except Rejected as rejected:
                code = rejected.code
        if accepted is None:
            assert code is not None
            self._send(rejection_pdu(code))
            reason = REJECT_REASONS.get(code, "rejected")
            self._metrics.association_rejected(reason)
            LOG.warning("association rejected", extra={**self._who(), "reason": reason, "code": list(code)})
            return
        self._contexts = accepted.contexts
        self._peer_maximum_length = accepted.peer_maximum_length
        self._send(accepted.reply)
        if self._calling != HEALTHCHECK_AE_TITLE:
            self._metrics.association_accepted(self)
        LOG.log(self._level(), "association accepted", extra={**self._who(), "accepted_contexts": len(self._contexts)})
        self._data_phase()

    def _read_proxy_header(self, deadline: float, late: str) -> None:
        """PROXY protocol v2 from the load balancer: the modality's address becomes the logged peer."""
        fixed = self._reader.read_exactly(FIXED_LENGTH, deadline, late)
        length = payload_length(fixed)
        payload = self._reader.read_exactly(length, deadline, late) if length else b""
        source = parse_proxy_header(fixed, payload).source
        if source is not None:  # None: LOCAL, the load balancer's (or the container's) own health check
            self._peer = f"{source[0]}:{source[1]}"

    # -- data transfer -----------------------------------------------------------------------------------------

    def _data_phase(self) -> None:
        # PS3.8 D.1: the maximum we announced bounds the variable field of each P-DATA-TF PDU.
        max_body = self._settings.effective_pdu_size
        while True:
            idle = self._settings.dimse_timeout if self._message else self._settings.network_timeout
            pdu_type, body = self._reader.read(idle, self._settings.network_timeout, max_body)
            if pdu_type == PduType.P_DATA_TF:
                self._p_data(body)
            elif pdu_type == PduType.RELEASE_RQ:
                with self._send_lock:
                    self._ended = True  # a report being decided goes on a new association instead
                self._send(release_rp(), after_end=True)
                self._discard_message()
                self._log_end(self._level(), "association released")
                return
            elif pdu_type == PduType.ABORT:
                self._log_end(logging.WARNING, "association aborted", reason="aborted by the peer")
                return
            else:
                raise ProtocolError(AbortReason.UNEXPECTED_PDU, f"unexpected PDU 0x{pdu_type:02X} after association")

    def _p_data(self, body: memoryview) -> None:
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, "PDV header truncated")
            (length,) = struct.unpack_from(">L", body, offset)
            if length < 2 or length > len(body) - offset - 4:
                raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, f"PDV length {length} does not fit")
            context_id, header = body[offset + 4], body[offset + 5]
            self._fragment(context_id, header, body[offset + 6 : offset + 4 + length])
            offset += 4 + length

    def _fragment(self, context_id: int, header: int, data: memoryview) -> None:
        if context_id not in self._contexts:
            raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, f"PDV on unaccepted context {context_id}")
        message = self._message
        if message is None:
            if not header & _COMMAND_FRAGMENT:
                raise ProtocolError(AbortReason.UNEXPECTED_PDU_PARAMETER, "data set fragment before its command")
            message = self._message = _Message(context_id, bytearray())
        elif context_id != message.context_id:
            raise ProtocolError(AbortReason.UNEXPECTED_PDU_PARAMETER, "fragments of one message on two contexts")
        if header & _COMMAND_FRAGMENT:
            if message.command is not None:
                raise ProtocolError(AbortReason.UNEXPECTED_PDU_PARAMETER, "command fragment inside a data set")
            message.command_bytes += data
            if len(message.command_bytes) > _MAX_COMMAND_SET:
                raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, "command set too large")
            if header & _LAST_FRAGMENT:
                self._command_complete(message)
            return
        if message.command is None or not message.command.has_data_set:
            raise ProtocolError(
                AbortReason.UNEXPECTED_PDU_PARAMETER, "data set fragment without a command expecting it"
            )
        if message.action is not None:
            message.action.append(data)
            if header & _LAST_FRAGMENT:
                self._answer_action(message)
            return
        last = bool(header & _LAST_FRAGMENT)
        if message.receive_file is not None:
            message.receive_file.write(data, last)
        if last:
            self._store(message)

    def _command_complete(self, message: _Message) -> None:
        try:
            command = dimse.parse_command(bytes(message.command_bytes))
        except dimse.MalformedCommand as error:
            raise ProtocolError(AbortReason.INVALID_PDU_PARAMETER_VALUE, str(error)) from None
        message.command = command
        if command.command_field == dimse.C_ECHO_RQ and not command.has_data_set:
            self._respond(message, handle_echo())
            return
        if self._is_commitment(message.context_id):
            self._commitment_command(message, command)
            return
        if command.command_field != dimse.C_STORE_RQ or not command.has_data_set:
            raise ProtocolError(
                AbortReason.UNEXPECTED_PDU_PARAMETER, f"unsupported command 0x{command.command_field:04X}"
            )
        message.store = self._handler.begin(command, self._contexts[message.context_id], self._calling)
        message.receive_file = message.store.receive_file

    # -- Storage Commitment (PS3.4 J) ----------------------------------------------------------------------------

    def _is_commitment(self, context_id: int) -> bool:
        return self._commitment is not None and self._contexts[context_id][0] == STORAGE_COMMITMENT_PUSH_MODEL

    def _commitment_command(self, message: _Message, command: dimse.Command) -> None:
        if command.command_field == dimse.N_ACTION_RQ:
            assert self._commitment is not None
            message.action = self._commitment.new_action() if command.has_data_set else None
            if not command.has_data_set:
                self._answer_action(message)
            return
        if command.command_field == dimse.N_EVENT_REPORT_RSP and not command.has_data_set:
            self._message = None
            assert self._commitment is not None
            channel = self._report_channel
            if channel is None or not self._commitment.report_answered(channel, command.message_id, command.status):
                fields = {**self._who(), "message_id": command.message_id}
                LOG.warning("unexpected N-EVENT-REPORT response", extra=fields)
            return
        raise ProtocolError(
            AbortReason.UNEXPECTED_PDU_PARAMETER, f"unsupported command 0x{command.command_field:04X} for commitment"
        )

    def _answer_action(self, message: _Message) -> None:
        assert message.command is not None and self._commitment is not None
        transfer_syntax = self._contexts[message.context_id][1]
        answer = self._commitment.handle_action(
            message.command, transfer_syntax, message.action, self._calling, self._who()
        )
        self._message = None
        response = dimse.action_response(message.command, answer.status, answer.comment)
        sent = False
        try:
            self._send(p_data(message.context_id, _COMMAND_FRAGMENT | _LAST_FRAGMENT, response))
            sent = True
        finally:
            if answer.transaction_uid is not None:
                if sent and self._report_channel is None:
                    # PS3.8 D.1: the requestor's maximum bounds our PDUs; 0 means it set none.
                    largest = self._peer_maximum_length or self._settings.effective_pdu_size
                    self._report_channel = AssociationChannel(
                        self._send_message, message.context_id, transfer_syntax, largest
                    )
                self._commitment.responded(answer.transaction_uid, self._report_channel if sent else None)

    def _send_message(self, pdus: list[bytes]) -> None:
        """Send one DIMSE message of ours from another thread (a commitment report)."""
        with self._send_lock:
            # One message's fragments are never interleaved with another message of ours (PS3.7 8.1).
            if self._ended or self._aborted_by_us:
                raise PeerClosed("association ended")
            try:
                for pdu in pdus:
                    send_within(self._socket, pdu, self._settings.network_timeout)
            except OSError as error:
                raise PeerClosed(str(error)) from None

    def _store(self, message: _Message) -> None:
        assert message.store is not None
        status, comment = self._handler.end(message.store, self._who())
        self._respond(message, status, comment)

    def _respond(self, message: _Message, status: int, comment: str | None = None) -> None:
        assert message.command is not None
        response = dimse.response(message.command, status, comment)
        self._message = None
        self._send(p_data(message.context_id, _COMMAND_FRAGMENT | _LAST_FRAGMENT, response))

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _discard_message(self) -> None:
        message, self._message = self._message, None
        if message is not None and message.action is not None:
            message.action.release()  # an N-ACTION cut short: its bytes go back to the shared budget
        if message is None or message.store is None:
            return
        if message.receive_file is not None:
            LOG.warning("incomplete objects discarded", extra={**self._who(), "objects": 1})
        message.store.discard()

    def _send(self, data: bytes, after_end: bool = False) -> None:
        # The deadline of the whole send, not of each partial write: a peer that stops reading holds this thread
        # NETWORK_TIMEOUT at most.
        seconds = self._settings.network_timeout
        with self._send_lock:
            if self._aborted_by_us or (self._ended and not after_end):
                raise PeerClosed("association aborted")
            try:
                send_within(self._socket, data, seconds)
            except TimeoutError:
                raise PeerSilent(f"peer did not take our answer within {seconds:g} s") from None
            except OSError as error:
                raise PeerClosed(str(error)) from None

    def _abort(self, reason: AbortReason) -> None:
        # A thread blocked sending to a peer that stopped reading holds the lock until its send deadline; the
        # abort does not wait for that: it gives up on the A-ABORT, and the socket's shutdown ends that send.
        if not self._send_lock.acquire(timeout=_ABORT_SEND_SECONDS):
            self._aborted_by_us = True
            return
        try:
            if self._aborted_by_us:
                return
            self._aborted_by_us = True
            send_within(self._socket, abort(_PROVIDER, int(reason)), _ABORT_SEND_SECONDS)
        except OSError:
            pass  # the peer is gone already, or not reading; closing is all that is left
        finally:
            self._send_lock.release()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.close()

    def _who(self) -> dict[str, Any]:
        """The association's log fields (the caller copies them to add its own)."""
        if self._who_fields is not None:
            return self._who_fields
        return {"peer": self._peer, "calling_ae": printable(self._calling), "called_ae": printable(self._called)}

    def _level(self) -> int:
        # Health checks run every few seconds; they would drown the log at INFO.
        return logging.DEBUG if self._calling == HEALTHCHECK_AE_TITLE else logging.INFO

    def _log_end(self, level: int, message: str, **fields: Any) -> None:
        LOG.log(level, message, extra={**self._who(), **fields})
