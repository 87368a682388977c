"""S3 mode: once StoreDICOM stored an instance, say so on its S3 object (batch_contract/stored_tags.py).

The working state dies with the daemon; the tag does not. If the daemon dies while the batch is open, the sweeper
seals it whole and its import job takes every object; the workflow reads the tags of an instance before it would
record it failed, so what StoreDICOM stored is recorded imported even when that job fails (docs/forwarding.rst,
"In the stack"). One thread writes the tags, never the C-STORE path; a tag that cannot be written is logged and
counted, and that instance is then recorded by its import job alone, as without the tag.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.stored_tags import stored_tags
from scp.forwarding.object_tagging import TaggingFailed
from scp.metrics import Metrics

LOG = logging.getLogger(__name__)

# A tag is a few hundred bytes; past this many waiting (S3 unreachable for long), new ones are dropped and counted.
QUEUE_MAX = 100_000
# Five attempts over about 7.5 s: S3's throttling and server errors pass, and a fallback copy made just after its
# batch closed (the key a late answer is tagged on) is there by then, so every failure is tried again, NoSuchKey too.
ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 0.5
# Each tag is one PutObjectTagging round trip (tens of milliseconds); several at once keep up with StoreDICOM's
# answers at 16 or more associations, so the window in which a killed daemon leaves a stored instance untagged stays
# one round trip long instead of growing with a queue. Each has its own connection.
WORKERS = 8

_Tag = tuple[str, StoredByStoreDICOM]


class TagWriter(Protocol):
    """One worker's PutObjectTagging (scp/forwarding/object_tagging.py, ``TaggingClient``)."""

    def put_tags(self, key: str, tags: Sequence[Mapping[str, str]]) -> None:
        """Replace the object's tags; raise :class:`TaggingFailed` when they may not be written."""

    def close(self) -> None: ...


class StoredTagger:
    def __init__(
        self,
        new_writer: Callable[[], TagWriter],
        metrics: Metrics,
        attempts: int = ATTEMPTS,
        first_backoff_seconds: float = FIRST_BACKOFF_SECONDS,
        workers: int = WORKERS,
    ) -> None:
        self._new_writer = new_writer
        self._metrics = metrics
        self._attempts = attempts
        self._first_backoff = first_backoff_seconds
        self._queue: queue.Queue[_Tag | None] = queue.Queue(maxsize=QUEUE_MAX)
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"forward-tags-{number}", daemon=True) for number in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def tag(self, key: str, stored: StoredByStoreDICOM) -> None:
        """Queue ``key``'s tags; never blocks."""
        try:
            self._queue.put_nowait((key, stored))
        except queue.Full:
            self._not_tagged(key, "too many tags waiting")

    def stop(self, timeout: float) -> None:
        """Write what is queued within ``timeout``; what is left then is logged and counted."""
        deadline = time.monotonic() + timeout
        for _ in self._threads:
            with contextlib.suppress(queue.Full):  # the threads are not keeping up: they stop at the flag below
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        for thread in self._threads:
            thread.join(1.0)

    def _run(self) -> None:
        writer = self._new_writer()
        try:
            while (item := self._queue.get()) is not None:
                key, stored = item
                if self._stopping.is_set():
                    self._not_tagged(key, "the daemon stopped first")
                else:
                    self._write(writer, key, stored)
        finally:
            writer.close()

    def _write(self, writer: TagWriter, key: str, stored: StoredByStoreDICOM) -> None:
        tags = stored_tags(stored)
        error: TaggingFailed | None = None
        for attempt in range(self._attempts):
            if attempt and self._stopping.wait(self._first_backoff * 2 ** (attempt - 1)):
                break
            try:
                writer.put_tags(key, tags)
                return
            except TaggingFailed as caught:
                error = caught
        self._not_tagged(key, str(error) if error else "the daemon stopped first")

    def _not_tagged(self, key: str, error: str) -> None:
        self._metrics.forward_tag_failed()
        LOG.error(
            "StoreDICOM stored it but its S3 object could not be tagged so; if its import job fails, it is recorded "
            "failed",
            extra={"key": key, "error": error},
        )
