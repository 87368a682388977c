"""Where each stored instance went: SOP Instance UID to SOP Class UID and location, recorded after the store made
it durable, because a commitment request names instances by their SOP UIDs alone and the store files them by
study and series.

The C-STORE path appends one line to its receiver's journal (one write, no lock shared with other processes);
the journal is folded into the SQLite table in one transaction when it has grown past ``FOLD_BYTES``, and when its
receiver starts. A lookup reads every receiver's journal, then the table, so an entry moving from one to the other
is never missed: a journal is truncated only after its lines are committed to the table.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scp.instances import ReceivedInstance, StoredInstance
from scp.sqlite_transaction import Transaction, open_database
from scp.storage import Store

LOG = logging.getLogger(__name__)

DATABASE_NAME = "stored.sqlite"
_JOURNAL_GLOB = "stored-*.journal"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stored (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    location TEXT NOT NULL
);
"""
_UPSERT = (
    "INSERT INTO stored (sop_instance_uid, sop_class_uid, location) VALUES (?, ?, ?)"
    " ON CONFLICT (sop_instance_uid) DO UPDATE SET sop_class_uid = excluded.sop_class_uid,"
    " location = excluded.location"
)
_LOOKUP_CHUNK = 500  # SQLite's limit on bound parameters is 999 in older builds
# About 5,000 entries: a fold costs one transaction per that many stores, and a lookup reads at most this much of
# each receiver's journal.
FOLD_BYTES = 1024 * 1024
# A journal line: UID, class, location and the CRC-32 of the three, tab-separated. The checksum rejects a line a
# power loss cut short, which could otherwise read as an entry with a truncated location or class.
_SEPARATOR = b"\t"
_FIELDS = 4


@dataclass(frozen=True)
class Entry:
    sop_class_uid: str
    location: str


def database_path(storage_dir: Path) -> Path:
    return storage_dir / ".commitment" / DATABASE_NAME


def journal_path(database: Path, receiver: int) -> Path:
    return database.with_name(f"stored-{receiver}.journal")


def create(path: Path) -> None:
    """Create the database (already in WAL mode) before several receiver processes open it at once.

    SQLite switches a new database to WAL under a lock it does not wait for: of two processes switching one at
    the same moment, one fails with "database is locked" whatever its busy timeout, and that receiver could not
    start. A database in WAL mode already is opened side by side without that race.
    """
    open_database(path, "NORMAL", _SCHEMA).close()


class Ledger:
    def __init__(self, path: Path, receiver: int = 0) -> None:
        self._lock = threading.Lock()
        # NORMAL: a killed process loses nothing (nor does it lose a journal line, written before the C-STORE is
        # answered); a power loss may lose the last entries, and an instance without its entry is reported not
        # committed. The ledger can only make a report more pessimistic, never wrong, so it does not add an fsync
        # to every C-STORE.
        self._connection = open_database(path, "NORMAL", _SCHEMA)
        self._directory = path.parent
        self._journal = os.open(
            journal_path(path, receiver), os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        self._journal_bytes = 0
        with self._lock:
            self._fold()  # what the previous process of this receiver left; also drops a torn last line

    def record(self, instance: ReceivedInstance, location: str) -> None:
        fields = (instance.sop_instance_uid, instance.sop_class_uid, location)
        body = _SEPARATOR.join(field.encode() for field in fields)
        with self._lock:
            if body.count(_SEPARATOR) != _FIELDS - 2 or b"\n" in body:
                # A location the journal's format cannot hold (a storage directory named with a tab): the table.
                self._connection.execute(_UPSERT, fields)
                return
            line = b"%s\t%08x\n" % (body, zlib.crc32(body))
            # O_APPEND: one write lands whole at the end, whichever process appends.
            if os.write(self._journal, line) != len(line):
                raise OSError(0, "commitment journal write cut short")
            self._journal_bytes += len(line)
            if self._journal_bytes >= FOLD_BYTES:
                self._fold()

    def lookup(self, sop_instance_uids: Iterable[str]) -> dict[str, Entry]:
        wanted = list(dict.fromkeys(sop_instance_uids))
        found: dict[str, Entry] = {}
        with self._lock:
            # Journals first: a line folded meanwhile was committed to the table before its journal was cut.
            journaled = self._journaled(set(wanted))
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                placeholders = ",".join("?" * len(chunk))  # only "?" marks; the UIDs are bound parameters
                rows = self._connection.execute(
                    f"SELECT sop_instance_uid, sop_class_uid, location FROM stored WHERE sop_instance_uid IN ({placeholders})",  # noqa: S608, E501
                    chunk,
                ).fetchall()
                found.update((row[0], Entry(row[1], row[2])) for row in rows)
        found.update(journaled)  # newer than what the table holds
        return found

    def close(self) -> None:
        with self._lock:
            self._connection.close()
            os.close(self._journal)

    def _fold(self) -> None:
        """Move this receiver's journal into the table (called with the lock held)."""
        self._journal_bytes = 0  # a fold that fails is tried again once as much more has been appended
        os.lseek(self._journal, 0, os.SEEK_SET)
        entries = list(_entries(_read_all(self._journal)))
        if entries:
            with Transaction(self._connection):
                self._connection.executemany(_UPSERT, entries)
        os.ftruncate(self._journal, 0)  # appends go on at the new end

    def _journaled(self, wanted: set[str]) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for path in sorted(self._directory.glob(_JOURNAL_GLOB)):
            try:
                descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                continue
            try:
                data = _read_all(descriptor)
            finally:
                os.close(descriptor)
            found.update((uid, Entry(sop_class, location)) for uid, sop_class, location in _entries(data, wanted))
        return found


def _read_all(descriptor: int) -> bytes:
    chunks = []
    while chunk := os.read(descriptor, FOLD_BYTES):
        chunks.append(chunk)
    return b"".join(chunks)


def _entries(data: bytes, wanted: set[str] | None = None) -> Iterator[tuple[str, str, str]]:
    """The whole, intact lines of a journal, in order (optionally only those of ``wanted`` UIDs)."""
    for line in data.split(b"\n")[:-1]:  # the last piece is empty, or a line still being written
        fields = line.split(_SEPARATOR)
        if len(fields) != _FIELDS:
            continue
        uid = fields[0].decode(errors="replace")
        if wanted is not None and uid not in wanted:
            continue
        body = line[: line.rfind(_SEPARATOR)]
        if fields[3] != b"%08x" % zlib.crc32(body):
            continue
        yield uid, fields[1].decode(), fields[2].decode()


class RecordingStore:
    """A Store that records each instance in the ledger once the inner store has made it durable."""

    def __init__(self, inner: Store, ledger: Ledger) -> None:
        self._inner = inner
        self._ledger = ledger

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        stored = self._inner.store(staged, instance)
        try:
            self._ledger.record(instance, stored.location)
        except (OSError, sqlite3.Error) as error:
            # The object is durable and its C-STORE succeeds; only a commitment request for it will be answered
            # "failed" (never optimistic), so this is a warning, not a refusal.
            LOG.warning("commitment ledger write failed", extra={"error": str(error)})
        return stored

    def close(self) -> None:
        self._inner.close()
        self._ledger.close()
