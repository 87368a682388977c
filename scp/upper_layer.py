"""DICOM Upper Layer framing (PS3.8 9.3): reading whole PDUs under a deadline, and the small PDUs we send.

Every PDU is read with two limits: its declared length may not exceed what was negotiated (so a peer cannot make
us allocate gigabytes), and the whole PDU must arrive within one timeout (so a peer trickling a byte at a time is
dropped instead of holding a thread forever). The buffer grows with the bytes that arrive, not with the length a
peer declares, so a thousand connections each declaring a megabyte and sending nothing cost no memory.

The descriptor is non-blocking and every wait is a poll of ours under its deadline: a read costs one system call
while data is there (Python's socket timeouts add a poll before every read and an ioctl with every change of
timeout), and each body read also takes in the start of the next PDU, so a PDU whose bytes are all there is read
in one call.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import time
from enum import IntEnum

HEADER_LENGTH = 6
# The body buffer starts at this size and doubles as bytes arrive, up to the largest PDU an association has sent.
_FIRST_BODY_BUFFER = 64 * 1024


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


_KNOWN_TYPES = frozenset(int(member) for member in PduType)


class AbortReason(IntEnum):
    """A-ABORT reasons when the service provider (source 2) aborts, PS3.8 Table 9-26."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class PeerClosed(Exception):
    """The peer closed the connection (or reset it)."""


class PeerSilent(Exception):
    """No PDU, or not all of one, arrived within the allowed time."""


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted with ``reason``."""

    def __init__(self, reason: AbortReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PduReader:
    """Reads PDUs from one connection into a buffer that grows to the largest PDU received, never past the cap.

    The socket must be non-blocking (``setblocking(False)``, or a timeout): the reader waits in poll itself.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.gettimeout() is None:
            raise ValueError("PduReader needs a non-blocking socket")
        self._descriptor = sock.fileno()
        self._poll = select.poll()  # used by the reading thread alone
        self._poll.register(self._descriptor, select.POLLIN)
        self._header = bytearray(HEADER_LENGTH)
        self._ahead = 0  # bytes of the next header that arrived with the previous body
        self._body = bytearray(0)
        self._wait_first = False  # the last read took all that was there: the next one polls before reading

    def read(self, idle_seconds: float, pdu_seconds: float, max_body: int) -> tuple[int, memoryview]:
        """(PDU type, body) of the next PDU.

        Waits up to ``idle_seconds`` for it to begin; once begun, all of it must arrive within ``pdu_seconds``.
        The body view is valid until the next call.
        """
        self._fill_header(time.monotonic() + idle_seconds, f"no PDU within {idle_seconds:g} s")
        return self._body_after_header(time.monotonic() + pdu_seconds, f"after {pdu_seconds:g} s", max_body)

    def read_by(self, deadline: float, seconds: float, max_body: int) -> tuple[int, memoryview]:
        """(PDU type, body) of a PDU that must arrive whole by ``deadline``, ``seconds`` after it was set (the
        ARTIM timer, running since the connection). The body view is valid until the next call."""
        self._fill_header(deadline, f"no PDU within {seconds:g} s")
        return self._body_after_header(deadline, f"after {seconds:g} s", max_body)

    def read_exactly(self, count: int, deadline: float, late: str) -> bytes:
        """``count`` bytes that are not a PDU (a PROXY protocol header), all by ``deadline``; only before the
        first PDU, which nothing has read ahead of yet."""
        assert self._ahead == 0
        data = bytearray(count)
        view = memoryview(data)
        received = 0
        while received < count:
            received += self._read_into([view[received:]], deadline, late)
        return bytes(data)

    def _fill_header(self, deadline: float, late: str) -> None:
        header = memoryview(self._header)
        while self._ahead < HEADER_LENGTH:
            self._ahead += self._read_into([header[self._ahead :]], deadline, late)
        self._ahead = 0

    def _body_after_header(self, deadline: float, allowed: str, max_body: int) -> tuple[int, memoryview]:
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        if pdu_type not in _KNOWN_TYPES:
            raise ProtocolError(AbortReason.UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
        if length > max_body:
            raise ProtocolError(
                AbortReason.INVALID_PDU_PARAMETER_VALUE, f"PDU of {length} bytes exceeds the limit of {max_body}"
            )
        late = f"PDU of {length} bytes incomplete {allowed}"
        received = 0
        header = memoryview(self._header)
        while received < length:
            if len(self._body) <= received:
                # Full: twice what has arrived, at most the declared length. A new buffer rather than a resize,
                # since the caller may still hold a view of the previous PDU.
                grown = bytearray(min(length, max(_FIRST_BODY_BUFFER, 2 * received)))
                grown[:received] = memoryview(self._body)[:received]
                self._body = grown
            window = memoryview(self._body)[received : min(length, len(self._body))]
            # The header was parsed above, so its buffer is free to take the start of the next PDU.
            count = self._read_into([window, header] if len(window) == length - received else [window], deadline, late)
            received += min(count, len(window))
            self._ahead = max(0, count - len(window))
        return pdu_type, memoryview(self._body)[:length]

    def _read_into(self, buffers: list[memoryview], deadline: float, late: str) -> int:
        """Read at least one byte into ``buffers`` (in order), waiting for it until ``deadline``."""
        while True:
            if self._wait_first:
                self._wait(deadline, late)
            try:
                count = os.readv(self._descriptor, buffers)
            except BlockingIOError:
                self._wait_first = True
                continue
            except OSError as error:
                raise PeerClosed(str(error)) from None
            if count == 0:
                raise PeerClosed("connection closed by the peer")
            self._wait_first = count < sum(len(buffer) for buffer in buffers)
            return count

    def _wait(self, deadline: float, late: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerSilent(late)
        self._poll.poll(math.ceil(remaining * 1000))  # readable, closed or timed out: the read that follows tells


def send_within(sock: socket.socket, data: bytes, seconds: float) -> None:
    """Send all of ``data`` on a non-blocking socket within ``seconds`` in all, however slowly the peer reads.

    Raises ``TimeoutError`` when the peer did not take it in time, ``OSError`` when the connection failed.
    """
    deadline = time.monotonic() + seconds
    view = memoryview(data)
    poll = select.poll()  # per call: the sending thread is not always the same one
    poll.register(sock.fileno(), select.POLLOUT)
    while view:
        try:
            view = view[sock.send(view) :]
            continue
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"send incomplete after {seconds:g} s")
        poll.poll(math.ceil(remaining * 1000))


def pdu(pdu_type: PduType, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def release_rp() -> bytes:
    return pdu(PduType.RELEASE_RP, b"\x00\x00\x00\x00")


def abort(source: int, reason: int) -> bytes:
    return pdu(PduType.ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def p_data(context_id: int, message_header: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5)."""
    item = struct.pack(">LBB", len(data) + 2, context_id, message_header) + data
    return pdu(PduType.P_DATA_TF, item)
