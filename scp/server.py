"""The listening socket: accepts connections, runs each association on its own thread, drains on shutdown."""

from __future__ import annotations

import errno
import functools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from scp.association import Association
from scp.commitment.service import CommitmentService
from scp.config import Settings
from scp.handlers import StoreHandler
from scp.limits import LimitedRegistry, Limits
from scp.metrics import Metrics
from scp.negotiation import Policy

LOG = logging.getLogger(__name__)

# A burst of modalities connecting at once must queue in the kernel, not be refused.
_LISTEN_BACKLOG = 512
# Connections refused under a flood are counted and reported in one line per interval, not one line each.
REFUSALS_REPORT_SECONDS = 10.0
# The accept loop looks at its refusals this often when no connection comes; a stop wakes it at once.
_ACCEPT_POLL_SECONDS = 1.0
# accept() errors that say the listening socket itself is unusable; any other error is about one connection, or
# a passing shortage (descriptors, memory), and the listener goes on.
_LISTENER_BROKEN = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EFAULT})
# During shutdown, each association still open gets this long to be aborted; the aborts run at once, in parallel.
_ABORT_SECONDS = 3.0
# A receiver process that holds more connections than another leaves the next one to it, and looks again this
# often: the kernel would otherwise hand a burst of connections to whichever process happens to wait in accept().
# A connection waits this long at most, when the process it is left to is itself between two looks; a shorter
# wait would take the interpreter lock from the busier process's associations more often.
_DEFER_SECONDS = 0.02


def _start_thread(target: Callable[[], None], name: str) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


class Listener:
    """Accepts connections while it can; ``on_failure`` is called (from the listener's thread) if it cannot go
    on, so that the process exits non-zero and the orchestrator replaces it."""

    def __init__(
        self,
        settings: Settings,
        handler: StoreHandler,
        metrics: Metrics,
        on_failure: Callable[[], None] = lambda: None,
        spawn: Callable[[Callable[[], None], str], None] = _start_thread,
        commitment: CommitmentService | None = None,
        listening: socket.socket | None = None,
        limits: Limits | None = None,
    ) -> None:
        """``listening``: a socket bound before the receiver processes were forked (default: bind one here);
        ``limits``: the counts shared with the other receiver processes (default: this process's alone)."""
        self._settings = settings
        self._commitment = commitment
        self._metrics = metrics
        self._policy = Policy(settings)
        self._handler = handler
        self._on_failure = on_failure
        self._spawn = spawn
        self.limits = limits or Limits(settings.maximum_associations)
        self.registry = LimitedRegistry(self.limits)
        self.failure: BaseException | None = None
        self._refused = 0
        self._refusals_reported = time.monotonic()
        self._stopping = threading.Event()
        self._socket = listening or bind(settings)
        # Non-blocking: the loop waits in poll, for a connection or for stop_accepting's wake-up, and another
        # receiver process may take the connection between the poll and the accept.
        self._socket.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.limits.serving()

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress go on."""
        self._stopping.set()
        self._wake_writer.send(b"\0")
        self._thread.join(timeout=_ACCEPT_POLL_SECONDS * 2)
        self._socket.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _accept_loop(self) -> None:
        try:
            self._accept_until_stopped()
        except Exception as error:
            self.failure = error
            LOG.critical(
                "listener failed; exiting so that the task is replaced", exc_info=True,
                extra={"error": f"{type(error).__name__}: {error}"},
            )  # fmt: skip
            self._on_failure()

    def _accept_until_stopped(self) -> None:
        waiting = select.poll()
        waiting.register(self._socket, select.POLLIN)
        waiting.register(self._wake_reader, select.POLLIN)
        while not self._stopping.is_set():
            self._report_refusals()
            if not self.limits.least_loaded():
                self._stopping.wait(_DEFER_SECONDS)
                continue
            if not waiting.poll(_ACCEPT_POLL_SECONDS * 1000) or self._stopping.is_set():
                continue
            try:
                connection, address = self._socket.accept()
            except BlockingIOError:
                continue  # another receiver process took the connection
            except OSError as error:
                if self._stopping.is_set():
                    return
                if error.errno in _LISTENER_BROKEN:
                    raise
                LOG.warning("accept failed", extra={"error": str(error)})
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            self._serve(connection, address)

    def _serve(self, connection: socket.socket, address: tuple[str, int]) -> None:
        """Give the connection its thread; whatever fails for this one connection, the listener goes on."""
        slot = self.limits.take_connection(address[0])
        if slot is None:
            self._refused += 1
            connection.close()
            return
        peer = f"{address[0]}:{address[1]}"
        try:
            # Responses are small writes after large reads; without TCP_NODELAY, Nagle plus the peer's delayed
            # ACK can hold every C-STORE response for ~40 ms.
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            association = Association(
                connection, address, self._settings, self._policy, self._handler, self.registry,
                self._metrics, on_end=functools.partial(self.limits.connection_ended, slot),
                commitment=self._commitment,
            )  # fmt: skip
            self._spawn(association.run, f"association-{peer}")
        except Exception as error:  # noqa: BLE001 - e.g. no thread to be had: this connection only
            LOG.error("connection not served", extra={"peer": peer, "error": f"{type(error).__name__}: {error}"})
            connection.close()
            self.limits.connection_ended(slot)

    def _report_refusals(self) -> None:
        now = time.monotonic()
        if now - self._refusals_reported < REFUSALS_REPORT_SECONDS:
            return
        if self._refused:
            LOG.warning(
                "connections refused: too many connections",
                extra={
                    "connections_refused": self._refused,
                    "seconds": round(now - self._refusals_reported, 1),
                    "limit": self.limits.connection_limit,
                },
            )
            self._refused = 0
        self._refusals_reported = now


def bind(settings: Settings) -> socket.socket:
    """The listening socket; bound once, before any receiver process is forked, when there are several."""
    family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
    return socket.create_server((settings.bind_address, settings.scp_port), family=family, backlog=_LISTEN_BACKLOG)


def start(
    settings: Settings,
    handler: StoreHandler,
    metrics: Metrics,
    on_failure: Callable[[], None],
    commitment: CommitmentService | None = None,
    listening: socket.socket | None = None,
    limits: Limits | None = None,
) -> Listener:
    """Listen on the configured address and serve associations on background threads."""
    listener = Listener(
        settings, handler, metrics, on_failure, commitment=commitment, listening=listening, limits=limits
    )
    listener.start()
    return listener


def drain(listener: Listener, grace_seconds: float) -> int:
    """Stop accepting at once, let live associations finish within the grace period, abort the rest.

    A modality in the middle of a study finishes it on scale-in instead of being cut off; returns how many
    associations had to be aborted.
    """
    listener.stop_accepting()
    deadline = time.monotonic() + grace_seconds
    while listener.registry.snapshot() and time.monotonic() < deadline:
        time.sleep(0.1)
    remaining = listener.registry.snapshot()
    # All at once: one by one, a few hundred aborts to peers that stopped reading would overrun the orchestrator's
    # stop timeout (ECS: 120 s at most), and the open batch would never be closed.
    aborts = [threading.Thread(target=association.abort_from_outside, daemon=True) for association in remaining]
    for thread in aborts:
        thread.start()
    end = time.monotonic() + _ABORT_SECONDS
    for thread in aborts:
        thread.join(timeout=max(end - time.monotonic(), 0.0))
    # Give the aborted threads a moment to remove their partial files before the process exits.
    end = time.monotonic() + 5
    while listener.registry.snapshot() and time.monotonic() < end:
        time.sleep(0.05)
    listener.limits.aborted_at_shutdown(len(remaining))
    return len(remaining)
