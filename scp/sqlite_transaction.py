"""The daemon's local SQLite databases: a connection in autocommit mode and WAL, and one transaction on it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal


def open_database(path: Path, synchronous: Literal["NORMAL", "FULL"], schema: str) -> sqlite3.Connection:
    """A connection shared between threads under the caller's lock; ``synchronous`` is what its promise needs:
    FULL survives a power loss, NORMAL only a killed process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.executescript(schema)
    return connection


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on an error.

    IMMEDIATE takes the write lock at the start, so a transaction never fails half-way for want of it.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._connection.execute("COMMIT" if kind is None else "ROLLBACK")
