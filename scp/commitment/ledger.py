"""Where each stored instance went: SOP Instance UID to SOP Class UID and location, recorded after the store made
it durable, because a commitment request names instances by their SOP UIDs alone and the store files them by
study and series."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scp.instances import ReceivedInstance, StoredInstance
from scp.sqlite_transaction import open_database
from scp.storage import Store

LOG = logging.getLogger(__name__)

DATABASE_NAME = "stored.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stored (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    location TEXT NOT NULL
);
"""
_LOOKUP_CHUNK = 500  # SQLite's limit on bound parameters is 999 in older builds


@dataclass(frozen=True)
class Entry:
    sop_class_uid: str
    location: str


def database_path(storage_dir: Path) -> Path:
    return storage_dir / ".commitment" / DATABASE_NAME


class Ledger:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        # NORMAL: a killed process loses nothing; a power loss may lose the last entries, and an instance without
        # its entry is reported not committed. The ledger can only make a report more pessimistic, never wrong,
        # so it does not add an fsync to every C-STORE.
        self._connection = open_database(path, "NORMAL", _SCHEMA)

    def record(self, instance: ReceivedInstance, location: str) -> None:
        with self._lock:
            self._connection.execute(
                "INSERT INTO stored (sop_instance_uid, sop_class_uid, location) VALUES (?, ?, ?)"
                " ON CONFLICT (sop_instance_uid) DO UPDATE SET sop_class_uid = excluded.sop_class_uid,"
                " location = excluded.location",
                (instance.sop_instance_uid, instance.sop_class_uid, location),
            )

    def lookup(self, sop_instance_uids: Iterable[str]) -> dict[str, Entry]:
        wanted = list(dict.fromkeys(sop_instance_uids))
        found: dict[str, Entry] = {}
        with self._lock:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                placeholders = ",".join("?" * len(chunk))  # only "?" marks; the UIDs are bound parameters
                rows = self._connection.execute(
                    f"SELECT sop_instance_uid, sop_class_uid, location FROM stored WHERE sop_instance_uid IN ({placeholders})",  # noqa: S608, E501
                    chunk,
                ).fetchall()
                found.update((row[0], Entry(row[1], row[2])) for row in rows)
        return found

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class RecordingStore:
    """A Store that records each instance in the ledger once the inner store has made it durable."""

    def __init__(self, inner: Store, ledger: Ledger) -> None:
        self._inner = inner
        self._ledger = ledger

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        stored = self._inner.store(staged, instance)
        try:
            self._ledger.record(instance, stored.location)
        except sqlite3.Error as error:
            # The object is durable and its C-STORE succeeds; only a commitment request for it will be answered
            # "failed" (never optimistic), so this is a warning, not a refusal.
            LOG.warning("commitment ledger write failed", extra={"error": str(error)})
        return stored

    def close(self) -> None:
        self._inner.close()
        self._ledger.close()
