"""Local disk store: fsync, atomic rename into <Study>/<Series>/<SOP>.dcm, fsync of the directory.

Every directory on the path of an acknowledged object is durable in its parent before the object is acknowledged,
whichever association created it. Associations storing into one directory at the same time share its fsyncs
(scp/fsync.py), each still answered only after an fsync that began after its own rename.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from scp.fsync import DirectorySyncs
from scp.instances import ReceivedInstance, StoredInstance
from scp.status import Status, StoreFailure

LOG = logging.getLogger(__name__)

# Directories known durable in their parents: a store below one of them needs no fsync of that parent. Forgetting
# them all past this many costs one fsync per parent again, never durability.
_DURABLE_DIRECTORIES_MAX = 65536


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # Paths as strings on the receive path: each pathlib step costs more than the system call it leads to.
        self._root = str(self.root)
        # Shared by every association's thread; set operations are atomic under the interpreter lock, and a
        # directory is added only after its own fsync, so a race costs at most a second fsync.
        self._durable: set[str] = set()
        self._directory_syncs = DirectorySyncs()

    def path_for(self, instance: ReceivedInstance) -> Path:
        return Path(self._location(instance))

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        final = self._location(instance)
        directory = os.path.dirname(final)
        try:
            _fsync_file(staged)
            self._make_durable(directory)
            replaced = os.path.exists(final)
            try:
                os.replace(staged, final)
            except FileNotFoundError:
                # A directory was removed behind our back (an operator clearing old studies): forget what was
                # known durable and make the path again.
                self._durable.clear()
                self._make_durable(directory)
                os.replace(staged, final)
            self._directory_syncs.sync(directory)
        except OSError as error:
            raise StoreFailure(Status.OUT_OF_RESOURCES, _describe(error)) from error
        return StoredInstance(location=final, replaced=replaced)

    def close(self) -> None:
        """Every object is durable when its store returns; nothing is pending."""

    def _location(self, instance: ReceivedInstance) -> str:
        names = (instance.study_instance_uid, instance.series_instance_uid, f"{instance.sop_instance_uid}.dcm")
        # The UIDs were validated as digits and dots; this check keeps the path inside the store even if that
        # validation ever changes (checked by name: resolving the path on every store costs system calls).
        if any(not name or name in (".", "..") or "/" in name or "\x00" in name for name in names):
            raise StoreFailure(Status.CANNOT_UNDERSTAND, "UIDs do not form a path inside the store")
        return os.path.join(self._root, *names)

    def _make_durable(self, directory: str) -> None:
        """Create ``directory`` as needed and make its entry, and every entry above it up to the root's own, durable.

        An association that finds a directory another one has just created cannot know whether that one has
        fsync'd its parent yet, so existence proves nothing: only a directory this process has seen made durable
        is skipped.
        """
        if directory in self._durable:
            return
        parent = os.path.dirname(directory)
        if directory != self._root:
            self._make_durable(parent)
            try:
                os.mkdir(directory)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise
                # Another association created it a moment ago, or an earlier run did: fsync its parent anyway.
        self._directory_syncs.sync(parent)
        if len(self._durable) >= _DURABLE_DIRECTORIES_MAX:
            self._durable.clear()
        self._durable.add(directory)


def _fsync_file(path: Path) -> None:
    # fdatasync: the data and the size that reads depend on, without the timestamps fsync would add.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(descriptor)
    finally:
        os.close(descriptor)


def _describe(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "local store is full"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "local store is not writable"
    return f"local store failed: {error.strerror or error}"
