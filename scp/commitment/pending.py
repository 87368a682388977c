"""Storage Commitment requests kept durably (SQLite under STORAGE_DIR) from their N-ACTION until their report is
delivered, so a restart, even after SIGKILL or a power loss, still answers every request it accepted."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from scp.commitment.request import CommitmentRequest, Reference
from scp.fsync import fsync_directory
from scp.sqlite_transaction import Transaction, open_database

DATABASE_NAME = "requests.sqlite"
COMMITTED = 0  # a resolved reference's outcome; any other value is its Failure Reason (PS3.3 C.14.1.1)
# Instances awaiting commitment across every pending request: what peers may make the daemon look for, and keep
# on disk, at once (five full requests of 10,000).
MAX_PENDING_INSTANCES = 50_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    transaction_uid TEXT PRIMARY KEY,
    calling_ae_title TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    received_at REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    event_type INTEGER,
    reported_at REAL
);
CREATE TABLE IF NOT EXISTS request_references (
    transaction_uid TEXT NOT NULL,
    position INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    outcome INTEGER,
    PRIMARY KEY (transaction_uid, position)
);
CREATE INDEX IF NOT EXISTS unfinished ON requests (next_attempt_at) WHERE state = 'pending';
"""
_PENDING = "pending"
_REPORTED = "reported"


class Added(Enum):
    NEW = "new"
    REPEATED = "repeated"  # the same request again while it is still pending: one report answers both
    REUSED = "reused"  # PS3.4 J.3.3.1.2: a Transaction UID is not used for another request, nor after its report
    FULL = "full"  # MAX_PENDING_INSTANCES would be exceeded: not recorded


@dataclass(frozen=True)
class PendingRequest:
    transaction_uid: str
    calling_ae_title: str
    received_at: float
    deadline: float
    attempts: int


@dataclass(frozen=True)
class ReferenceState:
    position: int
    reference: Reference
    outcome: int | None  # None while undecided


def database_path(storage_dir: Path, receiver: int = 0) -> Path:
    """Beside the receive spool, outside the <Study>/<Series> tree, so no UID can collide with it. Each receiver
    process keeps its own requests (it alone holds their associations); the first keeps the one database a single
    process has always had."""
    name = DATABASE_NAME if receiver == 0 else f"requests-{receiver}.sqlite"
    return storage_dir / ".commitment" / name


def _fingerprint(request: CommitmentRequest) -> str:
    digest = hashlib.sha256()
    for reference in request.references:
        digest.update(f"{reference.sop_class_uid}/{reference.sop_instance_uid};".encode())
    return digest.hexdigest()


class PendingRequests:
    """Thread-safe; every write is committed with a full sync before it returns."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        # FULL: the WAL is fsync'd at each commit, so a request acknowledged with N-ACTION-RSP Success survives a
        # power loss, not only a killed process.
        self._connection = open_database(path, "FULL", _SCHEMA)
        # SQLite syncs the files, not the directory entries that name them: without this, a power loss soon after
        # the first start could take the database (and the requests it acknowledged) with it.
        for directory in (path.parent, path.parent.parent):
            fsync_directory(directory)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def add(self, request: CommitmentRequest, calling_ae_title: str, now: float, deadline: float) -> Added:
        fingerprint = _fingerprint(request)
        with self._lock, Transaction(self._connection):
            known = self._connection.execute(
                "SELECT fingerprint, state FROM requests WHERE transaction_uid = ?", (request.transaction_uid,)
            ).fetchone()
            if known is not None:
                same = known[0] == fingerprint and known[1] == _PENDING
                return Added.REPEATED if same else Added.REUSED
            # A reported request's references are deleted, so these are the pending requests' instances.
            (awaiting,) = self._connection.execute("SELECT COUNT(*) FROM request_references").fetchone()
            if awaiting + len(request.references) > MAX_PENDING_INSTANCES:
                return Added.FULL
            self._connection.execute(
                "INSERT INTO requests (transaction_uid, calling_ae_title, fingerprint, received_at, deadline, state,"
                " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request.transaction_uid, calling_ae_title, fingerprint, now, deadline, _PENDING, now),
            )
            self._connection.executemany(
                "INSERT INTO request_references (transaction_uid, position, sop_class_uid, sop_instance_uid)"
                " VALUES (?, ?, ?, ?)",
                [
                    (request.transaction_uid, position, reference.sop_class_uid, reference.sop_instance_uid)
                    for position, reference in enumerate(request.references)
                ],
            )
        return Added.NEW

    def due(self, now: float, exclude: Iterable[str] = ()) -> list[PendingRequest]:
        excluded = set(exclude)
        with self._lock:
            rows = self._connection.execute(
                "SELECT transaction_uid, calling_ae_title, received_at, deadline, attempts FROM requests"
                " WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at",
                (now,),
            ).fetchall()
        return [PendingRequest(*row) for row in rows if row[0] not in excluded]

    def references(self, transaction_uid: str, undecided_only: bool = False) -> list[ReferenceState]:
        query = (
            "SELECT position, sop_class_uid, sop_instance_uid, outcome FROM request_references"
            " WHERE transaction_uid = ? AND (outcome IS NULL OR NOT ?) ORDER BY position"
        )
        with self._lock:
            rows = self._connection.execute(query, (transaction_uid, undecided_only)).fetchall()
        return [ReferenceState(row[0], Reference(row[1], row[2]), row[3]) for row in rows]

    def resolve(self, transaction_uid: str, outcomes: Sequence[tuple[int, int]]) -> None:
        """Record decided outcomes (position, outcome); a decided reference is not judged again."""
        if not outcomes:
            return
        with self._lock, Transaction(self._connection):
            self._connection.executemany(
                "UPDATE request_references SET outcome = ? WHERE transaction_uid = ? AND position = ?",
                [(outcome, transaction_uid, position) for position, outcome in outcomes],
            )

    def retry_later(self, transaction_uid: str, at: float, error: str) -> None:
        with self._lock:
            self._connection.execute(
                "UPDATE requests SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                " WHERE transaction_uid = ? AND state = 'pending'",
                (at, error, transaction_uid),
            )

    def wait_until(self, transaction_uid: str, at: float) -> None:
        """Instances are still awaited: look again at ``at`` (no delivery was attempted)."""
        with self._lock:
            self._connection.execute(
                "UPDATE requests SET next_attempt_at = ? WHERE transaction_uid = ? AND state = 'pending'",
                (at, transaction_uid),
            )

    def reported(self, transaction_uid: str, event_type: int, now: float) -> None:
        """The report was delivered: the request is finished; its Transaction UID stays known so it is not reused."""
        with self._lock, Transaction(self._connection):
            self._connection.execute(
                "UPDATE requests SET state = ?, event_type = ?, reported_at = ? WHERE transaction_uid = ?",
                (_REPORTED, event_type, now, transaction_uid),
            )
            self._connection.execute("DELETE FROM request_references WHERE transaction_uid = ?", (transaction_uid,))

    def state(self, transaction_uid: str) -> tuple[str, int | None] | None:
        """(state, event type) of a request, for tests and operators."""
        with self._lock:
            row = self._connection.execute(
                "SELECT state, event_type FROM requests WHERE transaction_uid = ?", (transaction_uid,)
            ).fetchone()
        return None if row is None else (str(row[0]), row[1])
