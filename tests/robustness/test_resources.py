"""Resource abuse: floods, idle and trickling connections, a peer that never reads, and thousands of short cycles."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

import pytest

from tests.robustness import wire
from tests.robustness.conftest import ACSE_TIMEOUT, NETWORK_TIMEOUT, Watched, sample
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
    watched = start_watched(MAXIMUM_ASSOCIATIONS=str(MAXIMUM_ASSOCIATIONS))
    held = [Peer(watched.port) for _ in range(MAXIMUM_ASSOCIATIONS)]
    for peer in held:
        peer.associate()
    for _ in range(20):
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
    during = wait_for(lambda: (s := sample(watched.pid)).threads >= IDLE_CONNECTIONS and s, 20, "threads per idle peer")
    assert during.rss_mib < watched.baseline.rss_mib + 150, (watched.baseline, during)

    # PS3.8 9.1.2: the ARTIM timer bounds the wait for an association request.
    pending = set(idle)
    deadline = opened + ACSE_TIMEOUT + 20
    while pending and time.monotonic() < deadline:
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
    wait_for(lambda: sample(watched.pid).threads <= watched.baseline.threads, 10, "threads back to baseline")
    watched.assert_healthy()


def test_peer_that_never_reads_responses_is_dropped(start_watched: Callable[..., Watched]) -> None:
    watched = start_watched()
    peer = Peer(watched.port, receive_buffer=4096)
    peer.associate()
    request = wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True)
    peer.sock.settimeout(0.5)
    sent = 0
    try:
        for _ in range(100_000):
            peer.sock.sendall(request * 50)
            sent += 50
    except TimeoutError:
        pass  # the daemon stopped reading: its responses fill our window and its send buffer
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 100_000 * 50, "the daemon kept reading although nothing read its responses"
    stalled = time.monotonic()
    # A send that makes no progress for NETWORK_TIMEOUT ends the association; other peers are served meanwhile.
    assert watched.daemon.echo_ok()
    wait_for(lambda: watched.log_messages("association aborted"), NETWORK_TIMEOUT + 15, "the stalled peer to be dropped")
    assert time.monotonic() - stalled < NETWORK_TIMEOUT + 15
    peer.close()
    wait_for(lambda: sample(watched.pid).threads <= watched.baseline.threads, 10, "threads back to baseline")
    watched.assert_healthy()


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
    watched = start_watched()
    for _ in range(50):  # warm up allocator arenas and lazy imports before taking the baseline
        _echo_cycle(watched.port)
    wait_for(lambda: sample(watched.pid).threads <= watched.baseline.threads, 10, "warm-up threads to end")
    baseline = sample(watched.pid)
    for _ in range(ECHO_CYCLES):
        _echo_cycle(watched.port)
    for _ in range(ABORT_CYCLES):
        _abort_cycle(watched.port)

    def settled() -> object:
        now = sample(watched.pid)
        return (now.threads <= baseline.threads and now.descriptors <= baseline.descriptors) and now

    after = wait_for(settled, 15, f"threads and descriptors back to {baseline}")
    assert after.rss_mib < baseline.rss_mib + CYCLE_RSS_GROWTH_LIMIT_MIB, (baseline, after)
    assert len(watched.log_messages("association released")) >= ECHO_CYCLES
    assert len(watched.log_messages("association aborted")) >= ABORT_CYCLES
    watched.assert_healthy()
