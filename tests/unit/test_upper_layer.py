"""PDU framing over a real socket pair: PDUs arriving in pieces of any size, back to back, read exactly."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from scp.upper_layer import PduReader, PduType, PeerClosed, PeerSilent, pdu, send_within


def _stream(count: int, seed: int, largest: int) -> tuple[list[bytes], bytes]:
    generator = random.Random(seed)
    sizes = [size for size in (0, 1, 5, 6, 7, 4096, 70_000, 200_000) if size <= largest]
    bodies = [generator.randbytes(generator.choice(sizes)) for _ in range(count)]
    return bodies, b"".join(pdu(PduType.P_DATA_TF, body) for body in bodies)


@pytest.mark.parametrize("piece", [1, 5, 6, 7, 1000, 65_536, 1 << 20])
def test_pdus_arriving_in_pieces_of_any_size_are_read_whole_and_in_order(piece: int) -> None:
    # Byte by byte only through small PDUs: a system call per byte is slow.
    bodies, stream = _stream(12, seed=piece, largest=4096 if piece < 100 else 200_000)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = PduReader(ours)

    def send() -> None:
        for start in range(0, len(stream), piece):
            theirs.sendall(stream[start : start + piece])
        theirs.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for body in bodies:
            pdu_type, received = reader.read(10, 10, 1 << 20)
            assert pdu_type == PduType.P_DATA_TF
            assert bytes(received) == body
        with pytest.raises(PeerClosed):
            reader.read(10, 10, 1 << 20)
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_a_pdu_begun_but_not_finished_in_time_is_peer_silent() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = PduReader(ours)
    try:
        theirs.sendall(pdu(PduType.P_DATA_TF, bytes(100))[:50])
        started = time.monotonic()
        with pytest.raises(PeerSilent, match="incomplete"):
            reader.read(5, 0.3, 1 << 20)
        assert 0.3 <= time.monotonic() - started < 2
    finally:
        ours.close()
        theirs.close()


def test_a_blocking_socket_is_refused() -> None:
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(ValueError):
            PduReader(ours)
    finally:
        ours.close()
        theirs.close()


def test_a_send_the_peer_does_not_take_ends_at_its_deadline() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            send_within(ours, bytes(64 << 20), 0.5)  # far more than both socket buffers hold
        assert 0.5 <= time.monotonic() - started < 3
    finally:
        ours.close()
        theirs.close()
