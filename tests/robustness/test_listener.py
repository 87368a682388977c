"""Failures injected where a real listener could fail: a thread that cannot start costs that one connection and
its slot comes back; a listening socket that breaks stops the process, which exits 1 to be replaced."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scp.config import Settings
from scp.handlers import StoreHandler
from scp.metrics import Metrics
from scp.server import Listener
from scp.spool import Spool
from scp.storage.local import LocalStore
from tests.robustness.wire import Peer
from tests.support.daemon import start_daemon
from tests.support.waits import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# With one association allowed, the listener holds 1 + 64 connection slots: more failures than that would
# exhaust them if a failed connection kept its slot.
MAXIMUM_ASSOCIATIONS = 1
FAILED_STARTS = 80


class FailingSpawn:
    """Starts association threads, except the first ``failures`` times, which fail as Thread.start() does when
    the process cannot have another thread."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self, target: Callable[[], None], name: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("can't start new thread")
        threading.Thread(target=target, name=name, daemon=True).start()


@pytest.fixture
def make_listener(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def make(spawn: FailingSpawn, on_failure: Callable[[], None] = lambda: None) -> Listener:
        settings = Settings.from_env(
            {
                "BIND_ADDRESS": "127.0.0.1",
                "SCP_PORT": str(free_port()),
                "STORAGE_DIR": str(tmp_path),
                "MAXIMUM_ASSOCIATIONS": str(MAXIMUM_ASSOCIATIONS),
                "NETWORK_TIMEOUT": "5",
            }
        )
        spool = Spool(settings.storage_dir)
        spool.prepare()
        metrics = Metrics()
        handler = StoreHandler(LocalStore(settings.storage_dir), spool, metrics)
        listener = Listener(settings, handler, metrics, on_failure=on_failure, spawn=spawn)
        listener.start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop_accepting()


def test_a_thread_that_cannot_start_costs_only_its_connection(
    make_listener: Callable[..., Listener], caplog: pytest.LogCaptureFixture
) -> None:
    spawn = FailingSpawn(FAILED_STARTS)
    listener = make_listener(spawn)
    caplog.set_level(logging.ERROR, logger="scp.server")
    for _ in range(FAILED_STARTS):
        with Peer(listener.port) as peer:
            assert peer.receive(timeout=5) is None  # closed at once, without a word
    assert spawn.failures == 0
    # The listener is still there, and every failed connection gave its slot back.
    with Peer(listener.port) as peer:
        peer.associate()
        assert peer.echo() == 0
        peer.release()
    not_served = [r for r in caplog.records if r.getMessage() == "connection not served"]
    assert len(not_served) == FAILED_STARTS
    assert "can't start new thread" in not_served[0].__dict__["error"]
    assert listener.failure is None


def test_a_broken_listening_socket_stops_the_process(make_listener: Callable[..., Listener]) -> None:
    stopped = threading.Event()
    listener = make_listener(FailingSpawn(0), on_failure=stopped.set)
    listener._socket.close()  # what a listening socket lost under the listener looks like
    wait_for(stopped.is_set, 10, "the listener to ask the process to stop")
    assert isinstance(listener.failure, OSError)


# Linux system calls (the same numbers on every architecture since 5.x): a descriptor for a process, and a copy of
# one of its file descriptors, which a parent may take from its child.
_PIDFD_OPEN, _PIDFD_GETFD = 434, 438


def shut_down_listening_socket(pid: int, port: int) -> None:
    """Shut down the child's listening socket under it: its accept() then fails with EINVAL, as for a socket the
    process lost."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                continue
            copy = libc.syscall(_PIDFD_GETFD, pidfd, int(entry), 0)
            assert copy >= 0, os.strerror(ctypes.get_errno())
            with socket.socket(fileno=copy) as sock:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and sock.getsockname()[1] == port:
                    sock.shutdown(socket.SHUT_RDWR)
                    return
        raise AssertionError(f"no listening socket on port {port} in process {pid}")
    finally:
        os.close(pidfd)


def test_the_daemon_exits_1_when_its_listener_cannot_go_on(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, SHUTDOWN_GRACE_SECONDS="2")
    shut_down_listening_socket(daemon.process.pid, daemon.port)
    assert daemon.wait(timeout=30) == 1
    (failed,) = daemon.log_messages("listener failed; exiting so that the task is replaced")
    assert failed["level"] == "CRITICAL" and "OSError" in failed["error"]
    assert daemon.log_messages("stopped"), "the daemon drained and stopped instead of dying"
