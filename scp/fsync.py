"""Flushing to disk: directory entries (a created or renamed file survives a crash only once its directory is
synced), and writeback started early (so that a file's final flush has only its tail left to wait for)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# Python's os module has no sync_file_range (Linux); libc has had it since glibc 2.6 and in musl.
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the dirty pages of the range, wait for nothing


def fsync_directory(path: Path) -> None:
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
