"""Association requests built to cost CPU and memory: too many presentation contexts, duplicate or invalid ids,
256 KiB requests from an AE title the policy refuses, requests declaring more than they send. Each is refused at
once, and the daemon's CPU time for all of them stays bounded."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.robustness import wire
from tests.robustness.conftest import Watched, sample
from tests.robustness.test_protocol import assert_dropped, assert_one_clear_line
from tests.robustness.wire import Peer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REQUEST_CAP = 256 * 1024
ROUNDS = 20
# Decoding one 256 KiB request of 12,800 contexts used to cost 0.66 s of CPU; refused on its fixed fields or at
# its 129th context, twenty of them cost a few milliseconds each. Generous for a loaded 2-core machine.
CPU_SECONDS_FOR_ALL_ROUNDS = 1.5


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the whole process, every thread included (proc(5): stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def largest_request(calling: str, variant: int) -> bytes:
    """As many tiny presentation contexts as fit in the 256 KiB cap: over 10,000 items for a decoder to walk,
    their one-byte ids repeating. Each ``variant`` differs, as an attacker's would, so none is answered from
    the remembered negotiations."""
    tiny = (1, f"1.{variant}", ["1"])
    room = REQUEST_CAP - (len(wire.associate_rq(calling=calling, contexts=[tiny])) - 6)
    count = 1 + room // len(wire.presentation_context(*tiny))
    proposals = [(1 + 2 * (n % 128), tiny[1], tiny[2]) for n in range(count)]
    return wire.associate_rq(calling=calling, contexts=proposals)


def test_129_contexts_are_aborted_with_one_clear_line(watched: Watched) -> None:
    contexts = [(1 + 2 * (n % 128), wire.VERIFICATION, [wire.IMPLICIT_VR_LITTLE_ENDIAN]) for n in range(129)]
    with Peer(watched.port) as peer:
        peer.send(wire.associate_rq(contexts=contexts))
        assert assert_dropped(peer) == [wire.A_ABORT]
    assert_one_clear_line(watched, "over 128 presentation contexts")


@pytest.mark.parametrize(
    ("ids", "words"),
    [([1, 3, 5, 3], "id 3 proposed twice"), ([1, 4], "id 4 is not odd"), ([0, 1], "id 0 is not odd")],
    ids=["duplicate", "even", "zero"],
)
def test_duplicate_and_invalid_context_ids_are_aborted(watched: Watched, ids: list[int], words: str) -> None:
    with Peer(watched.port) as peer:
        peer.send(wire.associate_rq(contexts=[(i, wire.VERIFICATION, [wire.IMPLICIT_VR_LITTLE_ENDIAN]) for i in ids]))
        assert assert_dropped(peer) == [wire.A_ABORT]
    assert_one_clear_line(watched, words)


def test_largest_requests_from_an_allowed_ae_cost_little_cpu(watched: Watched) -> None:
    requests = [largest_request("ROBUST", variant) for variant in range(ROUNDS)]
    assert all(REQUEST_CAP - 64 < len(request) - 6 <= REQUEST_CAP for request in requests)
    before = cpu_seconds(watched.pid)
    for request in requests:
        with Peer(watched.port) as peer:
            peer.send(request)
            assert assert_dropped(peer) == [wire.A_ABORT]
    spent = cpu_seconds(watched.pid) - before
    assert spent < CPU_SECONDS_FOR_ALL_ROUNDS, f"{ROUNDS} requests of 256 KiB cost {spent:.2f} s of CPU"


def test_largest_requests_from_a_disallowed_ae_are_rejected_without_decoding(
    start_watched: Callable[..., Watched],
) -> None:
    watched = start_watched(REQUIRE_CALLING_AE_TITLE="CT1")
    requests = [largest_request("INTRUDER", variant) for variant in range(ROUNDS)]
    before = cpu_seconds(watched.pid)
    for request in requests:
        with Peer(watched.port) as peer:
            peer.send(request)
            answer = peer.receive()
            assert answer is not None and answer.pdu_type == wire.A_ASSOCIATE_RJ, answer
            assert tuple(answer.payload[1:4]) == (1, 1, 3)  # calling AE title not recognised
    spent = cpu_seconds(watched.pid) - before
    assert spent < CPU_SECONDS_FOR_ALL_ROUNDS, f"{ROUNDS} refused requests of 256 KiB cost {spent:.2f} s of CPU"
    # The allowed modality is still served, and the refused requests left it nothing to evict.
    with Peer(watched.port) as peer:
        peer.associate(wire.associate_rq(calling="CT1"))
        assert peer.echo() == 0
        peer.release()
    assert watched.daemon.process.poll() is None  # echoscu's own AE title is refused here: no assert_healthy


def test_requests_declaring_more_than_they_send_cost_no_memory(start_watched: Callable[..., Watched]) -> None:
    """Each connection declares a 256 KiB request and sends 100 bytes of it; after association, each declares a
    1 MiB P-DATA and sends 100 bytes. Memory follows the bytes sent, not the lengths declared."""
    watched = start_watched(ACSE_TIMEOUT="20", NETWORK_TIMEOUT="20", MAXIMUM_ASSOCIATIONS="300")
    connections = []
    for _ in range(150):
        connection = socket.create_connection(("127.0.0.1", watched.port), timeout=10)
        connection.sendall(wire.pdu(wire.A_ASSOCIATE_RQ, bytes(100), declared=REQUEST_CAP))
        connections.append(connection)
    associated = []
    for _ in range(150):
        peer = Peer(watched.port)
        peer.associate()
        peer.send(wire.pdu(wire.P_DATA_TF, bytes(100), declared=1_048_576))
        associated.append(peer)
    time.sleep(1)  # let every thread block in its read
    during = sample(watched.pid)
    for connection in connections:
        connection.close()
    for peer in associated:
        peer.close()
    # Buffers sized by the declared lengths would take 150 x 256 KiB + 150 x 1 MiB = 187 MiB.
    assert during.rss_mib < watched.baseline.rss_mib + 48, (watched.baseline, during)
    watched.assert_healthy()
