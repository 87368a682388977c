"""Resource abuse: floods, idle and trickling connections, a peer that never reads, and thousands of short cycles."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

import pytest

from tests.robustness import wire
from tests.robustness.conftest import ACSE_TIMEOUT, NETWORK_TIMEOUT, ProcessSample, Watched, sample
from tests.robustness.wire import Peer
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAXIMUM_ASSOCIATIONS = 4
IDLE_CONNECTIONS = 300
ECHO_CYCLES = 1000
ABORT_CYCLES = 300
# After the cycles the interpreter may keep some freed memory in its arenas; a leak of one object per cycle
# (a thread, a socket buffer, a receive file) would show as far more than this.
CYCLE_RSS_GROWTH_LIMIT_MIB = 16


def test_association_flood_is_rejected_promptly_and_slots_come_back(
    start_watched: Callable[..., Watched],
) -> None:
    watched = start_watched(MAXIMUM_ASSOCIATIONS=str(MAXIMUM_ASSOCIATIONS), NETWORK_TIMEOUT="60")
    held = [Peer(watched.port) for _ in range(MAXIMUM_ASSOCIATIONS)]
    for peer in held:
        peer.associate()
    for _ in range(10):
        with Peer(watched.port) as extra:
            started = time.monotonic()
            extra.send(wire.associate_rq())
            answer = extra.receive(timeout=5)
            assert answer is not None and answer.pdu_type == wire.A_ASSOCIATE_RJ, answer
            # PS3.8 9.3.4: rejected-transient (2), by the service provider's presentation layer (3), local limit
            # exceeded (2): a modality retries later.
            assert tuple(answer.payload[1:4]) == (2, 3, 2)
            assert time.monotonic() - started < 2
    for peer in held:
        peer.release()
        peer.close()

    def all_slots_free() -> bool:
        peers = [Peer(watched.port) for _ in range(MAXIMUM_ASSOCIATIONS)]
        try:
            for peer in peers:
                peer.send(wire.associate_rq())
            return all((a := p.receive()) is not None and a.pdu_type == wire.A_ASSOCIATE_AC for p in peers)
        finally:
            for peer in peers:
                peer.close()

    wait_for(all_slots_free, 10, "every association slot to be free again", interval=0.5)
    watched.assert_healthy()


def test_hundreds_of_idle_connections_are_closed_after_the_acse_timeout(
    start_watched: Callable[..., Watched],
) -> None:
    watched = start_watched()
    idle = []
    for _ in range(IDLE_CONNECTIONS):
        connection = socket.create_connection(("127.0.0.1", watched.port), timeout=10)
        idle.append(connection)
    opened = time.monotonic()
    # PS3.8 9.1.2: the ARTIM timer bounds the wait for an association request; accepting 300 connections
    # should take a second or two of CPU, so all are closed well within this.
    pending = set(idle)
    deadline = opened + ACSE_TIMEOUT + 15
    peak_rss = 0.0
    while pending and time.monotonic() < deadline:
        peak_rss = max(peak_rss, sample(watched.pid).rss_mib)
        readable, _, _ = select.select(list(pending), [], [], 0.5)
        for connection in readable:
            try:
                if connection.recv(64) == b"":
                    pending.discard(connection)
            except ConnectionResetError:
                pending.discard(connection)
    for connection in idle:
        connection.close()
    assert not pending, f"{len(pending)} idle connections still open {time.monotonic() - opened:.0f}s later"
    assert peak_rss < watched.baseline.rss_mib + 150, (watched.baseline, peak_rss)
    wait_for(lambda: sample(watched.pid).threads <= watched.baseline.threads, 10, "threads back to baseline")
    watched.assert_healthy()


def test_peer_pipelining_requests_without_reading_keeps_memory_bounded(start_watched: Callable[..., Watched]) -> None:
    """80-byte C-ECHO requests as fast as TCP takes them, answers never read: the daemon reads no faster than
    it answers (pynetdicom alone would queue every decoded request, kilobytes each, without bound)."""
    watched = start_watched()
    request = wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True) * 100
    with Peer(watched.port, receive_buffer=4096) as peer:
        peer.associate()
        peer.sock.settimeout(0.2)
        flooding_until = time.monotonic() + 4
        while time.monotonic() < flooding_until:
            try:
                peer.sock.sendall(request)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break  # dropped because its answers stayed unread for NETWORK_TIMEOUT: also a bounded outcome
        during = sample(watched.pid)
        assert during.rss_mib < watched.baseline.rss_mib + 24, (watched.baseline, during)
    # Closing with answers unread resets the connection; the association ends at once.
    wait_for(lambda: watched.log_messages("association aborted"), 10, "the flooding peer's association to end")
    wait_for(lambda: sample(watched.pid).threads <= watched.baseline.threads, 10, "threads back to baseline")
    watched.assert_healthy()


def test_peer_that_never_reads_responses_is_dropped_after_the_network_timeout(watched: Watched) -> None:
    with Peer(watched.port, receive_buffer=4096) as peer:
        peer.associate()
        peer.send(wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True) * 200)
        started = time.monotonic()
        wait_for(lambda: watched.log_messages("association aborted"), NETWORK_TIMEOUT + 10, "the silent peer's abort")
        assert time.monotonic() - started >= NETWORK_TIMEOUT - 0.5


def _echo_cycle(port: int) -> None:
    with Peer(port) as peer:
        peer.associate()
        assert peer.echo() == 0
        peer.release()


def _abort_cycle(port: int) -> None:
    with Peer(port) as peer:
        peer.associate()
        peer.send(wire.ABORT)


def test_thousands_of_short_cycles_leave_threads_descriptors_and_memory_at_baseline(
    start_watched: Callable[..., Watched],
) -> None:
    # Only CT storage is offered: with every storage SOP class, pynetdicom's per-association deep copy of the
    # supported contexts costs ~0.1 s of CPU, which would make this case about that cost instead of leaks.
    watched = start_watched(SUPPORTED_SOP_CLASS_UIDS=wire.CT_IMAGE_STORAGE)
    for _ in range(50):  # warm up allocator arenas and lazy imports before taking the baseline
        _echo_cycle(watched.port)
    wait_for(lambda: sample(watched.pid).threads <= watched.baseline.threads, 10, "warm-up threads to end")
    baseline = sample(watched.pid)
    for _ in range(ECHO_CYCLES):
        _echo_cycle(watched.port)
    for _ in range(ABORT_CYCLES):
        _abort_cycle(watched.port)

    def settled() -> ProcessSample | None:
        now = sample(watched.pid)
        return now if now.threads <= baseline.threads and now.descriptors <= baseline.descriptors else None

    after = wait_for(settled, 15, f"threads and descriptors back to {baseline}")
    assert after is not None
    assert after.rss_mib < baseline.rss_mib + CYCLE_RSS_GROWTH_LIMIT_MIB, (baseline, after)
    assert len(watched.log_messages("association released")) >= ECHO_CYCLES
    assert len(watched.log_messages("association aborted")) >= ABORT_CYCLES
    watched.assert_healthy()
