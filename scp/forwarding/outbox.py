"""The outbox: a Store that, once the local store has made an object durable, records it for forwarding.

It wraps the store the daemon already has, so the receive path is unchanged: the object is durable under its final
name first, then its row is committed to the forwarding database, and only then does the C-STORE succeed. A crash
between the two leaves a durable object that was never acknowledged; the modality sends it again. A power loss
right after the acknowledgement may lose the row, not the object: ``recovery`` records it again at the next start.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from scp.forwarding.forwarder import Forwarder
from scp.forwarding.results import Results
from scp.instances import ReceivedInstance, StoredInstance
from scp.status import Status, StoreFailure
from scp.storage import Store

# ECS waits at most 120 s after SIGTERM and the drain may take SHUTDOWN_GRACE_SECONDS (100 by default) of it.
_STOP_SECONDS = 5.0


class ForwardingStore:
    def __init__(
        self, inner: Store, results: Results, forwarder: Forwarder, clock: Callable[[], float] = time.time
    ) -> None:
        self._inner = inner
        self._results = results
        self._forwarder = forwarder
        self._clock = clock

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        stored = self._inner.store(staged, instance)
        try:
            self._results.enqueue(instance, Path(stored.location), self._clock())
        except sqlite3.Error as error:
            # Not recorded means never forwarded: the modality must not be told it is done.
            raise StoreFailure(Status.OUT_OF_RESOURCES, f"forwarding database failed: {error}") from error
        self._forwarder.wake()
        return stored

    def close(self) -> None:
        """After the drain: no C-STORE adds rows any more; requests in flight get a moment, the rest resume later."""
        self._inner.close()
        self._forwarder.stop(_STOP_SECONDS)
        self._results.stopped(self._clock())
        self._results.close()
