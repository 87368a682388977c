"""The spool file of one object being received: writes every byte or says why not, and knows what it holds.

It is the only code that writes, sizes or removes the file; the store takes it over by its path once complete.
A full disk answers a write with a short count before it raises ENOSPC, so every count is checked: a file that
lost a byte is never handed on, and it is removed at once so the space comes back to the other associations.

A file the store keeps where it is (the local store renames it into place and flushes it) has its writeback
started as the data arrives, every ``WRITEBACK_EVERY`` bytes, so the store's flush waits for the tail alone; a file
only read back (the S3 store uploads it, then removes it) is left to the page cache.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from scp.dataset_header import DatasetIdentity, read_identity
from scp.fsync import start_writeback
from scp.status import Status, StoreFailure

# Created like open(path, "xb+"): a fresh file the store may rename into place, readable as the umask allows.
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_MODE = 0o666
# The start of the data set, kept as it arrives: the identifying elements of real objects lie in their first
# kilobytes, so the identity is read from memory, and from the file only past this.
HEAD_BYTES = 16 * 1024
# Small enough that a CT slice (512 KiB) is mostly on its way to the disk when its last fragment arrives, large
# enough to be a few system calls per object.
WRITEBACK_EVERY = 256 * 1024


class ReceiveFile:
    """A Part-10 header, then the data set fragments exactly as they arrive."""

    def __init__(self, path: Path, header: bytes, writeback: bool = False) -> None:
        self.path = path
        self.header_length = len(header)
        self.bytes_received = 0  # data set bytes, whether or not they could be written
        self._error: OSError | None = None
        # File offset up to which writeback has been started; None: this file is not flushed by its store.
        self._written_back: int | None = 0 if writeback else None
        self._head = bytearray()
        self._taken_over = False
        self._descriptor = os.open(path, _FLAGS, _MODE)  # -1 once closed
        self._write(header)

    def write(self, data: memoryview, last: bool = False) -> None:
        """Append one data set fragment; after a failed write the rest is counted, not written.

        ``last``: the data set's last fragment, whose writeback is left to the store's flush that follows at once.
        """
        if self.bytes_received < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - self.bytes_received]
        self.bytes_received += len(data)
        if self._error is not None:
            return
        try:
            # One system call per fragment, as an unbuffered file would make; the loop only runs on a short count.
            written = os.write(self._descriptor, data)
        except OSError as error:
            self._fail(error)
            return
        if written != len(data):
            self._write(data[written:])
        if self._written_back is not None and not last:
            self._start_writeback()

    def complete(self, transfer_syntax: str) -> DatasetIdentity:
        """Check that every received byte is in the file, read the data set's identity, close the file.

        Raises ``StoreFailure`` (0xA700 when a write failed: the sender may retry once there is room).
        """
        if self._error is not None:
            raise StoreFailure(Status.OUT_OF_RESOURCES, f"receive spool write failed: {self._error.strerror}")
        descriptor = self._descriptor
        try:
            size = os.fstat(descriptor).st_size
            if size != self.header_length + self.bytes_received:
                raise StoreFailure(
                    Status.OUT_OF_RESOURCES,
                    f"receive spool holds {size - self.header_length} of {self.bytes_received} bytes",
                )
            return self._identity(descriptor, transfer_syntax)
        except OSError as error:
            raise StoreFailure(Status.OUT_OF_RESOURCES, f"receive spool failed: {error.strerror}") from error
        finally:
            self._close()

    def taken_over(self) -> None:
        """The store has renamed the file into place: it is the store's now, and ``discard`` leaves it alone."""
        self._taken_over = True

    def discard(self) -> None:
        """Close and remove the file, if it is still here (a store that renamed it has taken it over)."""
        self._close()
        if self._taken_over:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write(self, data: bytes | memoryview) -> None:
        descriptor = self._descriptor
        view = memoryview(data)
        try:
            while view:
                written = os.write(descriptor, view)
                if written <= 0:  # a regular file never does this; refuse rather than spin
                    raise OSError(0, "write made no progress")
                view = view[written:]
        except OSError as error:
            self._fail(error)

    def _start_writeback(self) -> None:
        assert self._written_back is not None
        end = self.header_length + self.bytes_received
        if end - self._written_back < WRITEBACK_EVERY or self._error is not None:
            return
        try:
            # Returns at once: the store's fdatasync still waits for these pages, and makes them durable.
            start_writeback(self._descriptor, self._written_back, end - self._written_back)
        except OSError as error:
            self._fail(error)  # the store's flush would fail too
            return
        self._written_back = end

    def _fail(self, error: OSError) -> None:
        self._error = error
        self.discard()  # free the space now: the rest of this object is only counted

    def _identity(self, descriptor: int, transfer_syntax: str) -> DatasetIdentity:
        return read_identity(
            _HeadThenFile(self._head, descriptor, self.header_length), self.bytes_received, transfer_syntax
        )

    def _close(self) -> None:
        descriptor, self._descriptor = self._descriptor, -1
        if descriptor >= 0:
            os.close(descriptor)


class _HeadThenFile:
    """The data set as the identity reader reads it: from the head kept in memory, then through our own descriptor
    (no second open; the data set starts where our Part-10 header ends)."""

    def __init__(self, head: bytearray, descriptor: int, start: int) -> None:
        self._head = bytes(head)
        self._descriptor = descriptor
        self._start = start
        self._position = 0  # within the data set

    def read(self, size: int, /) -> bytes:
        position, self._position = self._position, self._position + size
        if self._position <= len(self._head):
            return self._head[position : self._position]
        data = os.pread(self._descriptor, size, self._start + position)
        self._position = position + len(data)
        return data

    def seek(self, offset: int, whence: int, /) -> int:
        assert whence == os.SEEK_CUR  # the reader only steps forward over values
        self._position += offset
        return self._position
