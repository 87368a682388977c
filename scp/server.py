"""The listening socket: accepts connections, runs each association on its own thread, drains on shutdown."""

from __future__ import annotations

import logging
import socket
import threading
import time

from scp.association import Association, Registry
from scp.config import Settings
from scp.handlers import StoreHandler
from scp.metrics import Metrics
from scp.negotiation import Policy

LOG = logging.getLogger(__name__)

# A burst of modalities connecting at once must queue in the kernel, not be refused.
_LISTEN_BACKLOG = 512
# Connections that never send an association request hold a thread until ACSE_TIMEOUT; past this many beyond
# MAXIMUM_ASSOCIATIONS a new connection is closed at once instead of costing another thread.
_SPARE_CONNECTIONS = 64
_ACCEPT_POLL_SECONDS = 1.0


class Listener:
    def __init__(self, settings: Settings, handler: StoreHandler, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._policy = Policy(settings)
        self._handler = handler
        self.registry = Registry()
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
        self._socket = socket.create_server(
            (settings.bind_address, settings.scp_port), family=family, backlog=_LISTEN_BACKLOG
        )
        self._socket.settimeout(_ACCEPT_POLL_SECONDS)
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress go on."""
        self._stopping.set()
        self._thread.join(timeout=_ACCEPT_POLL_SECONDS * 2)
        self._socket.close()

    def _accept_loop(self) -> None:
        limit = self._settings.maximum_associations + _SPARE_CONNECTIONS
        while not self._stopping.is_set():
            try:
                connection, address = self._socket.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if self._stopping.is_set():
                    return
                LOG.warning("accept failed", extra={"error": str(error)})
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            with self._connections_lock:
                admitted = self._connections < limit
                if admitted:
                    self._connections += 1
            if not admitted:
                LOG.warning("connection closed: too many connections", extra={"peer": f"{address[0]}:{address[1]}"})
                connection.close()
                continue
            # Responses are small writes after large reads; without TCP_NODELAY, Nagle plus the peer's delayed
            # ACK can hold every C-STORE response for ~40 ms.
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            association = Association(
                connection, address, self._settings, self._policy, self._handler, self.registry,
                self._metrics, on_end=self._connection_ended,
            )  # fmt: skip
            threading.Thread(target=association.run, name=f"association-{address[0]}:{address[1]}", daemon=True).start()

    def _connection_ended(self) -> None:
        with self._connections_lock:
            self._connections -= 1


def start(settings: Settings, handler: StoreHandler, metrics: Metrics) -> Listener:
    """Listen on the configured address and serve associations on background threads."""
    listener = Listener(settings, handler, metrics)
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
    for association in remaining:
        association.abort_from_outside()
    # Give the aborted threads a moment to remove their partial files before the process exits.
    end = time.monotonic() + 5
    while listener.registry.snapshot() and time.monotonic() < end:
        time.sleep(0.05)
    return len(remaining)
