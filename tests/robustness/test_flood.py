"""A connection flood far beyond the limit: the container's health check keeps passing throughout, and the
refusals are reported in one line per interval instead of one line per connection."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import pytest

from scp.server import REFUSALS_REPORT_SECONDS
from tests.robustness.conftest import Watched

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAXIMUM_ASSOCIATIONS = 4
CONNECTION_LIMIT = MAXIMUM_ASSOCIATIONS + 64  # the spare connections the listener allows beyond the limit
# The flood comes from another loopback address, as a flood through the load balancer comes from the NLB's own
# addresses; the health check runs inside the container and connects from 127.0.0.1.
FLOOD_SOURCE = "127.0.0.2"
FLOOD_HELD = 300
REFUSED_SUMMARY = "connections refused: too many connections"


class Flood:
    """Opens idle connections as fast as it can, holding the newest few hundred, until stopped."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self.opened = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        held: deque[socket.socket] = deque()
        while not self._stop.is_set():
            connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            connection.bind((FLOOD_SOURCE, 0))
            connection.settimeout(5)
            try:
                connection.connect(("127.0.0.1", self._port))
            except OSError:
                connection.close()
                continue
            self.opened += 1
            held.append(connection)
            if len(held) > FLOOD_HELD:
                held.popleft().close()
            time.sleep(0.001)
        for connection in held:
            connection.close()


def healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SCP_PORT": str(port), "BIND_ADDRESS": "127.0.0.1"}
    return subprocess.run(
        [sys.executable, "-m", "scp", "healthcheck"], capture_output=True, text=True, timeout=30, env=environment
    )


def test_healthcheck_passes_throughout_a_flood_and_refusals_are_summarised(
    start_watched: Callable[..., Watched],
) -> None:
    # Long ACSE and network timeouts: the flood's idle connections keep every slot taken for the whole case.
    watched = start_watched(MAXIMUM_ASSOCIATIONS=str(MAXIMUM_ASSOCIATIONS), ACSE_TIMEOUT="60", NETWORK_TIMEOUT="60")
    results = []
    with Flood(watched.port) as flood:
        started = time.monotonic()
        # Two full summary intervals, and a health check after another all the way through.
        while time.monotonic() - started < 2 * REFUSALS_REPORT_SECONDS + 1:
            results.append(healthcheck(watched.port))
        elapsed = time.monotonic() - started
        opened = flood.opened
    failed = [(r.returncode, r.stdout.strip()) for r in results if r.returncode != 0]
    assert not failed, f"{len(failed)} of {len(results)} health checks failed during the flood: {failed[:3]}"
    assert all(r.stdout.startswith("healthy: C-ECHO succeeded") for r in results)
    assert len(results) >= 5
    assert opened > CONNECTION_LIMIT + 1000, f"the flood opened only {opened} connections"

    summaries = watched.log_messages(REFUSED_SUMMARY)
    assert 1 <= len(summaries) <= elapsed / REFUSALS_REPORT_SECONDS + 1, summaries
    assert all(entry["level"] == "WARNING" for entry in summaries)
    assert sum(int(entry["connections_refused"]) for entry in summaries) > 500
    # One line per interval, not one per connection: the flood left only a handful of warnings in the log.
    warnings = [entry for entry in watched.logs() if entry["level"] in ("WARNING", "ERROR")]
    assert len(warnings) <= len(summaries) + 3, warnings[:10]
    watched.assert_healthy()
