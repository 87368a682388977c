"""The receive spool: where pynetdicom streams each incoming data set, on the store's own filesystem.

pynetdicom (with STORE_RECV_CHUNKED_DATASET) writes every received C-STORE data set to a file it creates with
``tempfile.NamedTemporaryFile``; we hand it files in our spool instead, so that (a) they sit on the same
filesystem as the local store and can be renamed into place, (b) a crash leaves them where start-up cleans
them, and (c) a write error (disk full) is remembered and answered with 0xA700 instead of killing the
association inside pynetdicom's reader.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from pynetdicom import dimse_messages

SPOOL_DIRECTORY_NAME = ".incoming"


class SpoolFile:
    """The subset of NamedTemporaryFile that pynetdicom uses, with write errors captured instead of raised."""

    def __init__(self, path: Path, owner: int) -> None:
        self.name = str(path)
        self.owner = owner
        self.error: OSError | None = None
        self._handle = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by pynetdicom via close()

    @property
    def file(self) -> SpoolFile:
        return self  # pynetdicom calls ``.file.flush()`` after every fragment; writes are unbuffered already

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                return self._handle.write(data) or 0
            except OSError as error:
                self.error = error
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered in user space."""

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class Spool:
    """A directory of in-flight receive files, and the registry of the files whose writing failed."""

    def __init__(self, root: Path) -> None:
        self.directory = root / SPOOL_DIRECTORY_NAME
        self._open: dict[str, SpoolFile] = {}
        self._lock = threading.Lock()

    def prepare(self) -> int:
        """Create the spool and remove what a crashed run left behind; returns how many files were removed."""
        removed = 0
        if self.directory.exists():
            removed = sum(1 for _ in self.directory.iterdir())
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        return removed

    def new_path(self, suffix: str) -> Path:
        return self.directory / f"{uuid.uuid4().hex}{suffix}"

    def open_receive_file(self, **_ignored: Any) -> SpoolFile:
        # pynetdicom decodes P-DATA in the association's DUL thread, so the thread identifies the association.
        spool_file = SpoolFile(self.new_path(".rx"), owner=threading.get_ident())
        with self._lock:
            self._open[spool_file.name] = spool_file
        return spool_file

    def discard_unhandled(self, owner: int | None) -> int:
        """Remove the files an association received but never handed to a handler (it ended mid-transfer)."""
        with self._lock:
            orphans = [f for f in self._open.values() if f.owner == owner]
            for orphan in orphans:
                del self._open[orphan.name]
        for orphan in orphans:
            orphan.close()
            remove_quietly(Path(orphan.name))
        return len(orphans)

    def take_write_error(self, path: Path) -> OSError | None:
        """The error that interrupted writing ``path``, if any; forgets the file."""
        with self._lock:
            spool_file = self._open.pop(str(path), None)
        return spool_file.error if spool_file else None

    def install(self) -> None:
        """Make pynetdicom create its receive files here (see the module docstring for why)."""
        dimse_messages.NamedTemporaryFile = self.open_receive_file  # type: ignore[attr-defined,assignment]


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
