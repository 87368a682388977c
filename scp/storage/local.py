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
        # Shared by every association's thread; set operations are atomic under the interpreter lock, and a
        # directory is added only after its own fsync, so a race costs at most a second fsync.
        self._durable: set[Path] = set()
        self._directory_syncs = DirectorySyncs()

    def path_for(self, instance: ReceivedInstance) -> Path:
        names = (instance.study_instance_uid, instance.series_instance_uid, f"{instance.sop_instance_uid}.dcm")
        # The UIDs were validated as digits and dots; this check keeps the path inside the store even if that
        # validation ever changes (checked by name: resolving the path on every store costs system calls).
        if any(not name or name in (".", "..") or "/" in name or "\x00" in name for name in names):
            raise StoreFailure(Status.CANNOT_UNDERSTAND, "UIDs do not form a path inside the store")
        return self.root.joinpath(*names)

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        final = self.path_for(instance)
        try:
            _fsync_file(staged)
            self._make_durable(final.parent)
            replaced = final.exists()
            try:
                os.replace(staged, final)
            except FileNotFoundError:
                # A directory was removed behind our back (an operator clearing old studies): forget what was
                # known durable and make the path again.
                self._durable.clear()
                self._make_durable(final.parent)
                os.replace(staged, final)
            self._directory_syncs.sync(final.parent)
        except OSError as error:
            raise StoreFailure(Status.OUT_OF_RESOURCES, _describe(error)) from error
        return StoredInstance(location=str(final), replaced=replaced)

    def close(self) -> None:
        """Every object is durable when its store returns; nothing is pending."""

    def _make_durable(self, directory: Path) -> None:
        """Create ``directory`` as needed and make its entry, and every entry above it up to the root's own, durable.

        An association that finds a directory another one has just created cannot know whether that one has
        fsync'd its parent yet, so existence proves nothing: only a directory this process has seen made durable
        is skipped.
        """
        if directory in self._durable:
            return
        if directory != self.root:
            self._make_durable(directory.parent)
            try:
                directory.mkdir()
            except FileExistsError:
                if not directory.is_dir():
                    raise
                # Another association created it a moment ago, or an earlier run did: fsync its parent anyway.
        self._directory_syncs.sync(directory.parent)
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
