"""SIGTERM while peers have stopped reading: the daemon's sends to them are blocked, yet it aborts them, closes
its open S3 batch and exits within the grace period (plus the few seconds its parallel aborts may take)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.robustness import wire
from tests.robustness.wire import Peer
from tests.support.corpus import make_instance
from tests.support.daemon import send_files, start_daemon
from tests.support.moto import MotoServer
from tests.support.s3 import manifests, new_bucket
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GRACE_SECONDS = 3
STUCK_PEERS = 4
# The drain aborts every association left after the grace at once, each within about a second, then gives their
# threads a moment to remove partial files; one stuck send used to hold each abort for NETWORK_TIMEOUT.
ABORT_ALLOWANCE_SECONDS = 8
FLOOD_SECONDS = 15


def stop_reading(peer: Peer) -> None:
    """Send C-ECHO requests and never read the answers, until both directions are full: the daemon is then
    blocked sending this peer an answer, and has stopped reading from it."""
    request = wire.p_data(wire.ECHO_CONTEXT, wire.echo_rq(), command=True) * 100
    peer.sock.settimeout(0.5)
    until = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < until:
        try:
            peer.sock.sendall(request)
        except TimeoutError:
            return  # half a second without the daemon taking a byte
    raise AssertionError(f"the daemon kept reading for {FLOOD_SECONDS} s")


def test_sigterm_while_peers_stop_reading_exits_in_time_and_closes_the_batch(tmp_path: Path, moto: MotoServer) -> None:
    bucket = new_bucket(moto)
    daemon = start_daemon(
        tmp_path,
        DICOM_BUCKET=bucket,
        BATCH_WINDOW_SECONDS="3600",
        NETWORK_TIMEOUT="120",  # far longer than the test: only the shutdown can end these associations
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        **moto.env(),
    )
    files = [make_instance(tmp_path, pixel_bytes=4096) for _ in range(2)]
    assert send_files(daemon, files) == [0, 0]
    stuck = [Peer(daemon.port, receive_buffer=4096) for _ in range(STUCK_PEERS)]
    try:
        for peer in stuck:
            peer.associate()
            stop_reading(peer)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(timeout=GRACE_SECONDS + 60)
        took = time.monotonic() - started
    finally:
        for peer in stuck:
            peer.close()
    assert code == 0, daemon.log_path.read_text()[-2000:]
    assert took < GRACE_SECONDS + ABORT_ALLOWANCE_SECONDS, f"stopping took {took:.1f} s"
    (manifest,) = wait_for(lambda: manifests(moto, bucket), 5, "the batch manifest")
    assert manifest["closedBy"] == "shutdown" and manifest["objectCount"] == 2
    (stopped,) = daemon.log_messages("stopped")
    assert stopped["associations_aborted"] == STUCK_PEERS
