"""Micro-benchmark of reading one PDU body: pynetdicom's own 4 KiB recv loop versus the guard's recv_into in place.

Both read the same 1 MiB P-DATA bodies from a loopback TCP connection fed by a writer thread; the figure is the
reading thread's own CPU time (``time.thread_time``), so the writer does not count.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

from pynetdicom.transport import AssociationSocket

from scp import pdu_guard

PDU_BYTES = 1 << 20
PDUS = 400
REPEATS = 5


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        writer = socket.create_connection(server.getsockname())
        reader, _ = server.accept()
    return reader, writer


def _pynetdicom(reader: socket.socket, length: int) -> None:
    body = AssociationSocket.recv(SimpleNamespace(socket=reader), length)  # type: ignore[arg-type]
    assert len(body) == length


def _guard(reader: socket.socket, length: int) -> None:
    body = bytearray(length)
    pdu_guard._receive_into(reader, memoryview(body), time.monotonic() + 60, already=0)


def _cpu_per_pdu(read: Callable[[socket.socket, int], None]) -> float:
    reader, writer = _connected_pair()
    payload = bytes(PDU_BYTES)

    def feed() -> None:
        for _ in range(PDUS):
            writer.sendall(payload)

    feeder = threading.Thread(target=feed)
    feeder.start()
    started = time.thread_time()
    for _ in range(PDUS):
        read(reader, PDU_BYTES)
    used = time.thread_time() - started
    feeder.join()
    reader.close()
    writer.close()
    return used / PDUS


def compare() -> str:
    """A Markdown section with the median reader CPU per 1 MiB PDU for both read paths."""
    pynetdicom = statistics.median(_cpu_per_pdu(_pynetdicom) for _ in range(REPEATS))
    guarded = statistics.median(_cpu_per_pdu(_guard) for _ in range(REPEATS))
    return "\n".join([
        "## PDU read path",
        "",
        f"Reading a 1 MiB P-DATA body from loopback TCP ({PDUS} PDUs, median of {REPEATS}; reader thread CPU):",
        "",
        "| read path | CPU per PDU | CPU per object (0.5 MiB slice) |",
        "| --- | ---: | ---: |",
        f"| pynetdicom `AssociationSocket.recv` (4 KiB recv into a growing bytearray) | {pynetdicom * 1e6:.0f} µs | "
        f"{pynetdicom * 1e6 / 2:.0f} µs |",
        f"| `scp/pdu_guard.py` (recv_into a preallocated buffer) | {guarded * 1e6:.0f} µs | "
        f"{guarded * 1e6 / 2:.0f} µs |",
        "",
        f"The guarded read uses {guarded / pynetdicom:.0%} of the CPU of pynetdicom's own read.",
    ])  # fmt: skip


if __name__ == "__main__":
    print(compare())
