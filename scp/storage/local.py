"""Local disk store: fsync, atomic rename into <Study>/<Series>/<SOP>.dcm, fsync of the directory."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from scp.status import Status, StoreFailure
from scp.storage import ReceivedInstance, StoredInstance

LOG = logging.getLogger(__name__)


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

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
            _make_directories(final.parent, self.root)
            replaced = final.exists()
            os.replace(staged, final)
            _fsync_directory(final.parent)
        except OSError as error:
            raise StoreFailure(Status.OUT_OF_RESOURCES, _describe(error)) from error
        return StoredInstance(location=str(final), replaced=replaced)

    def close(self) -> None:
        """Every object is durable when its store returns; nothing is pending."""


def _fsync_file(path: Path) -> None:
    # fdatasync: the data and the size that reads depend on, without the timestamps fsync would add.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_directories(directory: Path, root: Path) -> None:
    """Create ``directory`` and make each new entry durable in its parent, so a rename below it survives a crash."""
    missing = []
    current = directory
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            continue  # another association created it a moment ago
        _fsync_directory(created.parent)


def _describe(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "local store is full"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "local store is not writable"
    return f"local store failed: {error.strerror or error}"
