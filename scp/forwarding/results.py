"""The forwarding database (SQLite on local disk): the outbox of stored objects and each instance's StoreDICOM result.

One row per SOP Instance UID. A row is committed before the C-STORE is acknowledged; from then on it is either
still ``forwarding`` or in one of the import path's end states (``imported``, ``warning``, ``failed``), so a
restart resumes from here and nothing acknowledged is nowhere.

Commits are not fsync'd one by one (WAL with ``synchronous=NORMAL``): a commit survives the process being killed
at once, and a checkpoint every second makes it survive a power loss too. What the last second held before a power
loss is found again from the store itself at the next start (``recovery``), guided by the ``meta`` table.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scp.instances import ReceivedInstance
from scp.sqlite_transaction import Transaction, open_database

# The import workflow's status words for an instance item (docs/import-workflow.rst), and the one of our own.
FORWARDING = "forwarding"
IMPORTED = "imported"
WARNING = "warning"
FAILED = "failed"
END_STATES = (IMPORTED, WARNING, FAILED)
# S3 mode only: taken out of forwarding when its batch closed; the batch's import job takes it instead.
WITHDRAWN = "withdrawn"

DATABASE_NAME = "forwarding.sqlite"
_LOOKUP_CHUNK = 500  # SQLite's limit on bound parameters is 999 in older builds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    location TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    status TEXT NOT NULL,
    generation INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    unanswered INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    image_set_id TEXT,
    reason TEXT,
    last_error TEXT,
    stored_at TEXT
);
CREATE INDEX IF NOT EXISTS due ON instances (next_attempt_at) WHERE status = 'forwarding';
CREATE INDEX IF NOT EXISTS by_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Pending:
    """An instance that is due to be sent: what to send, and which receipt of it (``generation``)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    location: Path
    size: int
    generation: int
    attempts: int
    enqueued_at: float
    next_attempt_at: float


@dataclass(frozen=True)
class Row:
    """One instance as the status command reports it."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae_title: str
    received_at: str
    status: str
    attempts: int
    duplicates: int
    image_set_id: str | None
    reason: str | None
    last_error: str | None


def database_path(storage_dir: Path) -> Path:
    # Beside the receive spool, outside the <Study>/<Series> tree, so no UID can collide with it.
    return storage_dir / ".forwarding" / DATABASE_NAME


class Results:
    """Thread-safe access to the forwarding database; every write is committed (fsync'd by ``checkpoint``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # One connection shared under a lock: SQLite serialises writers anyway, and one connection keeps its
        # page cache warm for the receive path's inserts.
        # NORMAL: an fsync per commit would cost the receive path as much as the object's own fsync (measured
        # 0.7 ms median on this product's test disk); ``checkpoint`` and ``recovery`` cover a power loss instead.
        self._connection = open_database(path, "NORMAL", _SCHEMA)
        # Checkpoints fsync; on a connection of their own they never hold up the receive path's inserts (a
        # passive checkpoint does not block writers).
        self._checkpointer = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._checkpoint_lock = threading.Lock()

    def close(self) -> None:
        with self._checkpoint_lock:
            self._checkpointer.close()
        with self._lock:
            self._connection.close()

    # -- runs and durability ---------------------------------------------------------------------------------

    def previous_run(self) -> tuple[str | None, bool, float]:
        """The boot the last run started in, whether it stopped cleanly, and when its rows were last durable."""
        with self._lock:
            meta = dict(self._connection.execute("SELECT key, value FROM meta").fetchall())
        return meta.get("boot_id"), meta.get("clean", "1") == "1", float(meta.get("durable_until", "0"))

    def running(self, boot_id: str | None, now: float) -> None:
        with self._lock:
            self._connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [("boot_id", boot_id or ""), ("clean", "0"), ("durable_until", repr(now))],
            )
        self.checkpoint(now)

    def checkpoint(self, now: float) -> None:
        """Make every commit so far durable (the WAL is fsync'd before a checkpoint), then record when."""
        with self._checkpoint_lock:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with self._lock:
            # Becomes durable itself with the next checkpoint: what is read back after a power loss is a time
            # before which every row is on disk.
            self._connection.execute("UPDATE meta SET value = ? WHERE key = 'durable_until'", (repr(now),))

    def stopped(self, now: float) -> None:
        with self._lock:
            self._connection.execute("UPDATE meta SET value = '1' WHERE key = 'clean'")
        self.checkpoint(now)
        with self._checkpoint_lock:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def enqueued_at(self, sop_instance_uid: str) -> float | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT enqueued_at FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else float(row[0])

    # -- the receive path ------------------------------------------------------------------------------------

    def enqueue(self, instance: ReceivedInstance, location: Path, now: float) -> None:
        """Record a durably stored object as due now; a receipt of an instance already known starts it over."""
        with self._lock:
            self._connection.execute(
                """
                INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,
                    calling_ae_title, location, size, received_at, enqueued_at, status, generation, next_attempt_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)
                ON CONFLICT (sop_instance_uid) DO UPDATE SET
                    sop_class_uid = excluded.sop_class_uid, study_instance_uid = excluded.study_instance_uid,
                    series_instance_uid = excluded.series_instance_uid,
                    calling_ae_title = excluded.calling_ae_title, location = excluded.location,
                    size = excluded.size, received_at = excluded.received_at, enqueued_at = excluded.enqueued_at,
                    status = excluded.status, generation = generation + 1, attempts = 0,
                    next_attempt_at = excluded.next_attempt_at, unanswered = 0, image_set_id = NULL,
                    reason = NULL, last_error = NULL, stored_at = NULL
                """,
                (
                    instance.sop_instance_uid,
                    instance.sop_class_uid,
                    instance.study_instance_uid,
                    instance.series_instance_uid,
                    instance.calling_ae_title,
                    str(location),
                    instance.size,
                    _iso(instance.received_at.timestamp()),
                    now,
                    FORWARDING,
                    now,
                ),
            )

    # -- the forwarder -----------------------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Pending]:
        """Instances due by ``now``, oldest first, leaving out those already being sent."""
        excluded = set(exclude)
        with self._lock:
            rows = self._connection.execute(
                """
                SELECT sop_instance_uid, sop_class_uid, study_instance_uid, location, size, generation, attempts,
                    enqueued_at, next_attempt_at
                FROM instances WHERE status = 'forwarding' AND next_attempt_at <= ?
                ORDER BY next_attempt_at LIMIT ?
                """,
                (now, limit + len(excluded)),
            ).fetchall()
        found = [Pending(r[0], r[1], r[2], Path(r[3]), *r[4:]) for r in rows if r[0] not in excluded]
        return found[:limit]

    def backlog(self) -> int:
        with self._lock:
            row = self._connection.execute("SELECT COUNT(*) FROM instances WHERE status = 'forwarding'").fetchone()
        return int(row[0])

    def sending(self, pending: Sequence[Pending]) -> None:
        """Count a request before it leaves: if we never learn its answer, it may have stored the instance."""
        with self._lock, self._transaction():
            self._connection.executemany(
                "UPDATE instances SET attempts = attempts + 1, unanswered = unanswered + 1 "
                "WHERE sop_instance_uid = ? AND generation = ?",
                [(p.sop_instance_uid, p.generation) for p in pending],
            )

    def refused(self, pending: Sequence[Pending]) -> None:
        """HealthImaging answered the request that carried ``pending`` without storing any of them."""
        with self._lock, self._transaction():
            self._connection.executemany(
                "UPDATE instances SET unanswered = MAX(unanswered - 1, 0) "
                "WHERE sop_instance_uid = ? AND generation = ?",
                [(p.sop_instance_uid, p.generation) for p in pending],
            )

    def stored(self, pending: Pending, status: str, image_set_id: str | None, reason: str | None, now: float) -> int:
        """HealthImaging stored the instance (``imported``, or ``warning`` with its reason); returns how many of
        its stores were duplicates: earlier requests whose answer never came, or an earlier confirmed store."""
        assert status in (IMPORTED, WARNING)
        with self._lock, self._transaction():
            row = self._connection.execute(
                "SELECT unanswered, deliveries FROM instances WHERE sop_instance_uid = ? AND generation = ?",
                (pending.sop_instance_uid, pending.generation),
            ).fetchone()
            if row is None:
                return 0  # received again meanwhile: the newer receipt is sent on its own
            # This request was counted unanswered when it left; the others still unanswered may have stored it
            # too (their answers were lost: a timeout, or the process killed), as may an earlier receipt. The
            # count and the outcome change in one transaction, so a kill between them cannot hide a duplicate.
            duplicates = max(int(row[0]) - 1, 0) + (1 if row[1] else 0)
            self._connection.execute(
                """
                UPDATE instances SET status = ?, image_set_id = ?, reason = ?, last_error = NULL, unanswered = 0,
                    deliveries = deliveries + 1, duplicates = duplicates + ?, stored_at = ?
                WHERE sop_instance_uid = ? AND generation = ?
                """,
                (status, image_set_id, reason, duplicates, _iso(now), pending.sop_instance_uid, pending.generation),
            )
        return duplicates

    def failed(self, pending: Pending, reason: str, now: float, answered: bool) -> None:
        """Not stored, for good; ``answered``: HealthImaging answered the request that carried it."""
        with self._lock:
            self._connection.execute(
                "UPDATE instances SET status = 'failed', reason = ?, stored_at = ?, "
                "unanswered = MAX(unanswered - ?, 0) WHERE sop_instance_uid = ? AND generation = ?",
                (reason, _iso(now), int(answered), pending.sop_instance_uid, pending.generation),
            )

    def retry_later(self, pending: Pending, error: str, at: float, answered: bool) -> None:
        """Not stored yet; due again at ``at``. ``answered``: HealthImaging said so (it did not store it)."""
        with self._lock:
            self._connection.execute(
                "UPDATE instances SET next_attempt_at = ?, last_error = ?, unanswered = MAX(unanswered - ?, 0) "
                "WHERE sop_instance_uid = ? AND generation = ? AND status = 'forwarding'",
                (at, error, int(answered), pending.sop_instance_uid, pending.generation),
            )

    # -- S3 mode: a closing batch takes its instances back ---------------------------------------------------

    def withdraw(self, rows: Sequence[tuple[str, Path]]) -> None:
        """(SOP Instance UID, location) rows still due are never sent again; a request under way still records
        its answer (``stored`` and ``failed``), a retry it asks for is not made."""
        with self._lock, self._transaction():
            self._connection.executemany(
                "UPDATE instances SET status = 'withdrawn' "
                "WHERE sop_instance_uid = ? AND location = ? AND status = 'forwarding'",
                [(uid, str(location)) for uid, location in rows],
            )

    def outcomes(self, rows: Sequence[tuple[str, Path]]) -> dict[str, tuple[str, str | None, str | None, str | None]]:
        """(status, stored_at, image_set_id, reason) of each row still holding that location, by SOP Instance UID."""
        found: dict[str, tuple[str, str | None, str | None, str | None]] = {}
        with self._lock:
            for uid, location in rows:
                row = self._connection.execute(
                    "SELECT status, stored_at, image_set_id, reason FROM instances "
                    "WHERE sop_instance_uid = ? AND location = ?",
                    (uid, str(location)),
                ).fetchone()
                if row is not None:
                    found[uid] = (str(row[0]), row[1], row[2], row[3])
        return found

    def forget(self, rows: Sequence[tuple[str, Path]]) -> None:
        """Delete rows no request carries any more (their generation can then never be answered)."""
        with self._lock, self._transaction():
            self._connection.executemany(
                "DELETE FROM instances WHERE sop_instance_uid = ? AND location = ?",
                [(uid, str(location)) for uid, location in rows],
            )

    def _transaction(self) -> Transaction:
        return Transaction(self._connection)


def study_rows(path: Path, study_uid: str) -> list[Row]:
    """For the status command: reads the database read-only, never creates or changes it."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            """
            SELECT sop_instance_uid, study_instance_uid, series_instance_uid, calling_ae_title, received_at,
                status, attempts, duplicates, image_set_id, reason, last_error
            FROM instances WHERE study_instance_uid = ? ORDER BY series_instance_uid, sop_instance_uid
            """,
            (study_uid,),
        ).fetchall()
    finally:
        connection.close()
    return [Row(*row) for row in rows]


def instance_states(path: Path, sop_instance_uids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """For Storage Commitment: (SOP Class UID, status) of each instance the database knows among
    ``sop_instance_uids``; reads the database read-only, never creates or changes it."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    found: dict[str, tuple[str, str]] = {}
    try:
        for start in range(0, len(sop_instance_uids), _LOOKUP_CHUNK):
            chunk = list(sop_instance_uids[start : start + _LOOKUP_CHUNK])
            placeholders = ",".join("?" * len(chunk))  # only "?" marks; the UIDs are bound parameters
            rows = connection.execute(
                f"SELECT sop_instance_uid, sop_class_uid, status FROM instances WHERE sop_instance_uid IN ({placeholders})",  # noqa: S608, E501
                chunk,
            ).fetchall()
            found.update((row[0], (row[1], row[2])) for row in rows)
    finally:
        connection.close()
    return found


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}Z"
