"""PROXY_PROTOCOL=true against the real daemon: the modality's address from the header is the logged peer, the
load balancer's LOCAL health checks are served, and a connection without a valid header is refused."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scp.config import Settings
from scp.healthcheck import check
from tests.robustness import wire
from tests.robustness.wire import Peer
from tests.support.daemon import Daemon, start_daemon
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")
ACSE_TIMEOUT = 2
REFUSED = "connection refused: no valid PROXY protocol v2 header"


def proxy_header(source: str, port: int, command: int = 0x21, family: int = 0x11) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("10.0.1.5") + struct.pack(">HH", port, 11112)
    return SIGNATURE + bytes([command, family]) + struct.pack(">H", len(addresses)) + addresses


LOCAL = SIGNATURE + b"\x20\x00\x00\x00"
# A PROXY header whose 12 bytes of addresses are followed by a TLV declaring 16 bytes that are not there.
TRUNCATED_TLV = SIGNATURE + b"\x21\x11\x00\x0f" + proxy_header("203.0.113.7", 40112)[16:] + b"\xea\x00\x10"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    started = start_daemon(
        tmp_path_factory.mktemp("proxy"), ready=False, PROXY_PROTOCOL="true", ACSE_TIMEOUT=str(ACSE_TIMEOUT)
    )
    settings = Settings.from_env({"SCP_PORT": str(started.port), "BIND_ADDRESS": "127.0.0.1", "PROXY_PROTOCOL": "1"})
    try:
        wait_for(lambda: check(settings)[0], 30, "the daemon to answer a health check with a LOCAL header")
    except AssertionError:
        started.stop()
        raise AssertionError(f"daemon did not start; log:\n{started.log_path.read_text()}") from None
    yield started
    started.stop()


def new_lines(daemon: Daemon, since: int, message: str) -> list[dict[str, Any]]:
    return [entry for entry in daemon.logs()[since:] if entry.get("message") == message]


def test_the_logged_peer_is_the_source_in_the_header(daemon: Daemon) -> None:
    since = len(daemon.logs())
    with Peer(daemon.port) as peer:
        peer.send(proxy_header("203.0.113.7", 40112))
        peer.associate()
        assert peer.echo() == 0
        peer.release()
    (released,) = wait_for(lambda: new_lines(daemon, since, "association released"), 5, "the release log line")
    (accepted,) = new_lines(daemon, since, "association accepted")
    assert accepted["peer"] == released["peer"] == "203.0.113.7:40112"


def test_a_local_header_is_served_with_the_connection_own_address(daemon: Daemon) -> None:
    since = len(daemon.logs())
    with Peer(daemon.port) as peer:
        peer.send(LOCAL)
        peer.associate()
        assert peer.echo() == 0
        peer.release()
    (accepted,) = wait_for(lambda: new_lines(daemon, since, "association accepted"), 5, "the accept log line")
    assert accepted["peer"].startswith("127.0.0.1:")


def test_load_balancer_health_check_connection_is_quiet(daemon: Daemon) -> None:
    """The NLB's TCP health check sends LOCAL and closes: no warning for it."""
    since = len(daemon.logs())
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as connection:
        connection.sendall(LOCAL)
    time.sleep(0.5)
    assert [e for e in daemon.logs()[since:] if e["level"] in ("WARNING", "ERROR")] == []


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (wire.associate_rq(), "no PROXY protocol v2 signature"),
        (b"PROXY TCP4 203.0.113.7 10.0.1.5 40112 11112\r\n" + wire.associate_rq(), "version 1"),
        (SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12) + wire.associate_rq(), "version 1, expected 2"),
        (SIGNATURE + b"\x23\x11\x00\x0c" + bytes(12), "command"),
        (SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "not TCP over IP"),
        (SIGNATURE + b"\x21\x11\xff\xff", "more than 512"),  # refused before a byte more is read
        (TRUNCATED_TLV, "TLV"),
    ],
    ids=["none", "v1", "version-1", "command", "udp", "oversize", "tlv"],
)  # fmt: skip
def test_a_connection_without_a_valid_header_is_refused_with_one_line(
    daemon: Daemon, first_bytes: bytes, reason: str
) -> None:
    since = len(daemon.logs())
    with Peer(daemon.port) as peer:
        peer.send(first_bytes)
        sent, took = peer.ending(5)
    assert sent == [] and took < 2  # closed at once, nothing said in a protocol the peer did not speak
    (refused,) = wait_for(lambda: new_lines(daemon, since, REFUSED), 5, "the refusal log line")
    assert refused["level"] == "WARNING" and reason in refused["reason"]
    assert [e for e in daemon.logs()[since:] if e["level"] in ("WARNING", "ERROR")] == [refused]


def test_a_truncated_header_is_dropped_at_the_acse_timeout(daemon: Daemon) -> None:
    with Peer(daemon.port) as peer:
        peer.send(proxy_header("203.0.113.7", 40112)[:20])
        _, took = peer.ending(ACSE_TIMEOUT + 5)
    assert ACSE_TIMEOUT - 0.5 <= took < ACSE_TIMEOUT + 3


def healthcheck(port: int, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SCP_PORT": str(port), "BIND_ADDRESS": "127.0.0.1", **env}
    return subprocess.run(
        [sys.executable, "-m", "scp", "healthcheck"], capture_output=True, text=True, timeout=30, env=environment
    )


def test_the_container_health_check_sends_a_local_header(daemon: Daemon) -> None:
    result = healthcheck(daemon.port, PROXY_PROTOCOL="true")
    assert result.returncode == 0 and result.stdout.startswith("healthy: C-ECHO succeeded"), result.stdout
    # Configured without it, the check is refused like any connection without a header.
    assert healthcheck(daemon.port).returncode == 1


def test_a_second_header_from_the_client_is_not_believed(daemon: Daemon) -> None:
    """The load balancer passes on what the client sends, a header of its own included: only the first header
    counts, and what follows it must be DICOM."""
    since = len(daemon.logs())
    with Peer(daemon.port) as peer:
        peer.send(proxy_header("203.0.113.7", 40112) + proxy_header("198.51.100.1", 104) + wire.associate_rq())
        sent, _ = peer.ending(5)
    assert sent == [wire.A_ABORT]
    aborted = wait_for(lambda: new_lines(daemon, since, "association aborted"), 5, "the abort log line")
    assert aborted[0]["peer"] == "203.0.113.7:40112"
