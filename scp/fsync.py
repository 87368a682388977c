"""Flushing to disk: directory entries (a created or renamed file survives a crash only once its directory is
synced), shared by the threads that need the same directory synced at once, and writeback started early (so that
a file's final flush has only its tail left to wait for)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path

# Python's os module has no sync_file_range (Linux); libc has had it since glibc 2.6 and in musl.
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the dirty pages of the range, wait for nothing


def fsync_directory(path: str | Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def start_writeback(descriptor: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes of the file from ``offset`` to the disk and return.

    This makes nothing durable (neither the data nor the metadata that finds it): only a later fdatasync does,
    which then has less left to write. Raises ``OSError`` as the kernel reports it (EIO).
    """
    if _sync_file_range(descriptor, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


class DirectorySyncs:
    """Directory fsyncs shared by the threads that need one of the same directory at the same time (group commit).

    An entry made before ``sync`` is called is durable once an fsync of its directory that *began* after the call
    has succeeded. While one fsync of a directory runs, the callers that arrive wait for it to end, then share the
    next one, which one of them runs: one fsync for all of them instead of one each, and none of them answered by
    an fsync that began before its entry was made. When that fsync fails, every caller it was for gets the error.
    """

    def __init__(self, flush: Callable[[str | Path], None] = fsync_directory) -> None:
        self._flush = flush
        self._lock = threading.Lock()
        self._directories: dict[str | Path, _Directory] = {}  # those with callers waiting or an fsync running

    def sync(self, directory: str | Path) -> None:
        with self._lock:
            state = self._directories.get(directory)
            if state is None:
                state = self._directories[directory] = _Directory(self._lock)
            ticket = state.next  # the fsync this caller needs: the first to begin from now on
            state.waiting[ticket] = state.waiting.get(ticket, 0) + 1
            try:
                while state.completed < ticket:
                    if state.running:
                        state.changed.wait()
                    else:
                        self._run(directory, state, ticket)
                failure = state.failures.get(ticket)
            finally:
                state.waiting[ticket] -= 1
                if not state.waiting[ticket]:
                    del state.waiting[ticket]
                    state.failures.pop(ticket, None)
                if not state.waiting and not state.running:
                    del self._directories[directory]
        if failure is not None:
            raise OSError(failure.errno, failure.strerror, str(directory))

    def _run(self, directory: str | Path, state: _Directory, ticket: int) -> None:
        """Run fsync number ``ticket`` (called with the lock held; releases it meanwhile)."""
        state.running = True
        state.next = ticket + 1
        self._lock.release()
        try:
            self._flush(directory)
        except BaseException as error:
            # Its other callers fail too; this one raises what the flush raised.
            state.failures[ticket] = error if isinstance(error, OSError) else OSError(0, "directory fsync failed")
            raise
        finally:
            self._lock.acquire()
            state.running = False
            state.completed = ticket
            state.changed.notify_all()


class _Directory:
    def __init__(self, lock: threading.Lock) -> None:
        self.changed = threading.Condition(lock)
        self.next = 0  # the number the next fsync to begin takes
        self.completed = -1  # the number of the last fsync that ended
        self.running = False
        self.waiting: dict[int, int] = {}  # callers per fsync number
        self.failures: dict[int, OSError] = {}
