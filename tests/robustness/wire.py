"""Exact bytes on the wire: hand-built PDUs (PS3.8 9.3) and DIMSE command sets, so a test can lie in any field."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07

EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

ECHO_CONTEXT = 1
STORE_CONTEXT = 3
# One context per transfer syntax for CT storage, so a test picks the syntax by context ID.
STORE_CONTEXTS = {
    EXPLICIT_VR_LITTLE_ENDIAN: STORE_CONTEXT,
    IMPLICIT_VR_LITTLE_ENDIAN: 5,
    EXPLICIT_VR_BIG_ENDIAN: 7,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: 9,
}


def uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def item(item_type: int, payload: bytes, declared: int | None = None) -> bytes:
    length = len(payload) if declared is None else declared
    return struct.pack(">BBH", item_type, 0, length) + payload


def pdu(pdu_type: int, payload: bytes, declared: int | None = None) -> bytes:
    length = len(payload) if declared is None else declared
    return struct.pack(">BBL", pdu_type, 0, length) + payload


def presentation_context(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    sub_items = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub_items)


DEFAULT_CONTEXTS = [
    (ECHO_CONTEXT, VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
    *((context_id, CT_IMAGE_STORAGE, [syntax]) for syntax, context_id in STORE_CONTEXTS.items()),
]


def associate_rq(
    called: str = "STORESCP",
    calling: str = "ROBUST",
    contexts: list[tuple[int, str, list[str]]] | None = None,
    maximum_length: int = 16384,
    version: int = 1,
    extra_user_items: bytes = b"",
) -> bytes:
    payload = struct.pack(">HH", version, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    payload += item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts or DEFAULT_CONTEXTS:
        payload += presentation_context(context_id, abstract, syntaxes)
    user = item(0x51, struct.pack(">L", maximum_length)) + item(0x52, b"1.2.826.0.1.3680043.9.7433") + extra_user_items
    return pdu(A_ASSOCIATE_RQ, payload + item(0x50, user))


def p_data(context_id: int, fragment: bytes, command: bool, last: bool = True) -> bytes:
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment
    return pdu(P_DATA_TF, pdv)


RELEASE_RQ = pdu(A_RELEASE_RQ, bytes(4))
ABORT = pdu(A_ABORT, bytes(4))


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (PS3.7 6.3.1: implicit VR little endian) with its group length first."""
    body = b"".join(_implicit(0x0000, tag, value) for tag, value in elements)
    return _implicit(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def echo_rq(message_id: int = 1) -> bytes:
    return command_set([
        (0x0002, uid(VERIFICATION)),
        (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0101)),
    ])


def store_rq(sop_instance_uid: str, sop_class_uid: str = CT_IMAGE_STORAGE, message_id: int = 1) -> bytes:
    return command_set([
        (0x0002, uid(sop_class_uid)),
        (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)),
        (0x1000, uid(sop_instance_uid)),
    ])


def command_status(fragment: bytes) -> int | None:
    """The Status (0000,0900) of a received command set, if it has one."""
    offset = 0
    while offset + 8 <= len(fragment):
        group, element, length = struct.unpack_from("<HHL", fragment, offset)
        if (group, element) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", fragment, offset + 8)[0])
        offset += 8 + length
    return None


@dataclass
class Received:
    pdu_type: int
    payload: bytes


class Peer:
    """A raw TCP peer of the daemon that reads and writes whole PDUs, every wait bounded."""

    def __init__(self, port: int, timeout: float = 10, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, count: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = self.sock.recv(count - len(chunks))
            if not chunk:
                return None
            chunks.extend(chunk)
        return bytes(chunks)

    def receive(self, timeout: float = 10) -> Received | None:
        """The next PDU, or None when the daemon closed the connection."""
        self.sock.settimeout(timeout)
        try:
            header = self._exactly(6)
            if header is None:
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            payload = self._exactly(length)
        except ConnectionResetError:
            return None
        return None if payload is None else Received(pdu_type, payload)

    def associate(self, request: bytes | None = None) -> Received:
        self.send(request or associate_rq())
        answer = self.receive()
        assert answer is not None and answer.pdu_type == A_ASSOCIATE_AC, answer
        return answer

    def echo(self, message_id: int = 1) -> int | None:
        self.send(p_data(ECHO_CONTEXT, echo_rq(message_id), command=True))
        answer = self.receive()
        assert answer is not None and answer.pdu_type == P_DATA_TF, answer
        return command_status(answer.payload[6:])

    def store(self, sop_instance_uid: str, data_set: bytes, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN,
              fragment: int = 65536) -> int | None:
        """One C-STORE of exactly ``data_set``; the response status, or None if the daemon hung up."""
        context_id = STORE_CONTEXTS[syntax]
        self.send(p_data(context_id, store_rq(sop_instance_uid), command=True))
        for start in range(0, max(len(data_set), 1), fragment):
            piece = data_set[start : start + fragment]
            self.send(p_data(context_id, piece, command=False, last=start + fragment >= len(data_set)))
        answer = self.receive(timeout=30)
        if answer is None or answer.pdu_type != P_DATA_TF:
            return None
        return command_status(answer.payload[6:])

    def release(self) -> None:
        self.send(RELEASE_RQ)
        answer = self.receive()
        assert answer is not None and answer.pdu_type == A_RELEASE_RP, answer

    def ending(self, timeout: float) -> tuple[list[int], float]:
        """Read until the daemon closes the connection: the PDU types it sent, and how long that took."""
        started = time.monotonic()
        types: list[int] = []
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the daemon kept the connection open for {timeout}s; it sent {types}"
            try:
                answer = self.receive(timeout=remaining)
            except TimeoutError:
                continue
            if answer is None:
                return types, time.monotonic() - started
            types.append(answer.pdu_type)
