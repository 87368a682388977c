"""Bounds on what a peer can make the daemon read: a PDU size cap and a whole-PDU deadline.

pynetdicom 3.0 reads a PDU of any declared length (up to 4 GiB) into memory, and its reads block without a
deadline, so a peer that trickles bytes, or stops half-way through a PDU, holds a thread and an association
slot for ever. This module replaces the one method that reads PDUs (``DULServiceProvider._read_pdu_data``)
in a subclass that every association of the process uses once :func:`install` has run.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any

from pynetdicom import association
from pynetdicom.dul import DULServiceProvider

LOG = logging.getLogger(__name__)

HEADER_LENGTH = 6  # PS3.8 9.3.1: type (1), reserved (1), length (4, big endian)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07

# A-ASSOCIATE-RQ/AC have no negotiated maximum. The largest a real peer sends: 128 presentation contexts (the
# 8-bit odd context IDs allow no more) each proposing every one of the 34 importable transfer syntaxes is
# about 128 KiB; a user identity sub-item (a SAML assertion, a JWT) adds at most 64 KiB (16-bit length).
ASSOCIATION_PDU_MAX = 256 * 1024
# PS3.8 9.3.4 and 9.3.6-9.3.8: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a fixed length of 4.
_FIXED_PDU_LENGTH = 4
# DICOM's "0 = no maximum" advertised by a local AE still gets a ceiling: the largest PDU size settings allow.
UNLIMITED_PDU_CEILING = 4 * 1024 * 1024

_DISCARD_READS = 16
# Decoded DIMSE messages waiting for the association's thread; a modality waits for each C-STORE response (or
# keeps a small asynchronous window), so more than a few means a peer flooding requests.
MESSAGE_BACKLOG_MAX = 8

_PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# State machine events (PS3.8 9.2): pynetdicom's names for "transport closed" and "invalid PDU received".
# On the invalid-PDU event the state machine sends an A-ABORT and closes (AA-1 or AA-8).
_TRANSPORT_CLOSED = "Evt17"
_INVALID_PDU = "Evt19"


class _PeerClosed(Exception):
    """The peer closed the connection before the bytes asked for arrived."""


class _TooSlow(Exception):
    """The deadline for the whole PDU passed before its last byte arrived."""


def pdu_length_limit(pdu_type: int, maximum_length: int) -> int:
    """The largest PDU length field accepted for ``pdu_type`` given the local maximum receive length.

    PS3.8 D.1: the maximum length a receiver advertises bounds the variable field of P-DATA-TF, which is what
    the PDU length field counts; a PDU is therefore at most that plus the 6-byte header.
    """
    if pdu_type == P_DATA_TF:
        return maximum_length or UNLIMITED_PDU_CEILING
    if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        return ASSOCIATION_PDU_MAX
    return _FIXED_PDU_LENGTH


class GuardedDULServiceProvider(DULServiceProvider):
    """pynetdicom's DUL with a bounded PDU read: size-capped, deadline-bound, one allocation per PDU."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._refused = False

    def _read_pdu_data(self) -> None:
        """Read one PDU and queue its state machine event (PS3.8 9.2: Evt3/4/6/10/12/13/16, 17 or 19).

        Called by the DUL reactor when the socket is readable. Every read of the PDU shares one deadline of
        ``network_timeout`` seconds from its first byte, and the declared length is checked against the limit
        before any memory is allocated for the body.
        """
        assert self.socket is not None and self.socket.socket is not None
        if self.assoc.dimse.msg_queue.qsize() >= MESSAGE_BACKLOG_MAX:
            # pynetdicom queues every decoded DIMSE message without bound; a peer that pipelines requests (and
            # maybe never reads the answers) would grow it by kilobytes per 80-byte request. Leaving the bytes in
            # the socket pushes back through TCP instead.
            return
        raw = self.socket.socket
        if self._refused:
            # What follows a refused PDU is never read as PDUs. Hang up only once the state machine has sent the
            # A-ABORT (Sta13); it may still have earlier events queued ahead of the refusal.
            if self.state_machine.current_state == "Sta13":
                _discard_pending(raw)
                self.socket.close()
            return
        timeout = self.network_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        header = bytearray(HEADER_LENGTH)
        try:
            _receive_into(raw, memoryview(header), deadline, already=0)
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_NAMES:
                self._refuse("not a DICOM PDU", pdu_type=f"0x{pdu_type:02X}", first_bytes=bytes(header).hex())
                return
            limit = pdu_length_limit(pdu_type, self._local_maximum_length())
            if pdu_length > limit:
                name = _PDU_NAMES[pdu_type]
                self._refuse("PDU too large", pdu_type=name, declared_length=pdu_length, limit=limit)
                return
            pdu = bytearray(HEADER_LENGTH + pdu_length)
            pdu[:HEADER_LENGTH] = header
            _receive_into(raw, memoryview(pdu)[HEADER_LENGTH:], deadline, already=HEADER_LENGTH)
        except _PeerClosed as closed:
            if closed.args[0]:
                received = {"received": closed.args[0]}
                LOG.warning("connection closed in the middle of a PDU", extra={**self._peer(), **received})
            self.event_queue.put(_TRANSPORT_CLOSED)
            return
        except _TooSlow as late:
            self._refuse(f"PDU not received within {timeout:g} seconds", received=late.args[0])
            return
        except OSError as error:
            LOG.warning("connection failed", extra={**self._peer(), "error": str(error)})
            self.event_queue.put(_TRANSPORT_CLOSED)
            return
        finally:
            if timeout is not None and self.socket.socket is not None:
                # Sends (C-STORE responses) get a bound too: a peer that never reads is dropped.
                self.socket.socket.settimeout(timeout)
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as error:  # noqa: BLE001 - any decoding failure means an invalid PDU (PS3.8 Evt19)
            self._refuse("PDU cannot be decoded", pdu_type=_PDU_NAMES[pdu_type], error=type(error).__name__)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _local_maximum_length(self) -> int:
        local = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
        return int(local.maximum_length or 0)

    def _peer(self) -> dict[str, str]:
        remote = self.assoc.requestor if self.assoc.is_acceptor else self.assoc.acceptor
        return {"peer": f"{remote.address}:{remote.port}"}

    def _refuse(self, reason: str, **details: object) -> None:
        LOG.warning(f"association aborted: {reason}", extra={**self._peer(), **details})
        self._refused = True
        self.event_queue.put(_INVALID_PDU)


def _receive_into(raw: socket.socket, buffer: memoryview, deadline: float | None, already: int) -> None:
    """Fill ``buffer`` from ``raw`` before ``deadline``, straight into place (no 4 KiB chunks to join).

    Raises _PeerClosed or _TooSlow carrying how many bytes of the PDU had arrived, counting ``already``.
    """
    received = 0
    total = len(buffer)
    while received < total:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TooSlow(already + received)
            raw.settimeout(remaining)
        try:
            count = raw.recv_into(buffer[received:])
        except TimeoutError:
            raise _TooSlow(already + received) from None
        if count == 0:
            raise _PeerClosed(already + received)
        received += count


def _discard_pending(raw: socket.socket) -> None:
    """Drop what is already buffered (a bounded amount), so closing sends FIN after the A-ABORT, not RST."""
    raw.setblocking(False)  # with a timeout set, Python would first wait for readability
    for _ in range(_DISCARD_READS):
        try:
            if not raw.recv(65536):
                return
        except OSError:
            return


def install() -> None:
    """Make every association created from now on in this process read PDUs through the guard."""
    association.DULServiceProvider = GuardedDULServiceProvider  # type: ignore[attr-defined]
