"""The outbox's promise: a C-STORE succeeds only once its object is durable and its forwarding row committed."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scp.forwarding.forwarder import Forwarder
from scp.forwarding.outbox import ForwardingStore
from scp.forwarding.results import FORWARDING, Results, study_rows
from scp.instances import ReceivedInstance
from scp.metrics import Metrics
from scp.status import Status, StoreFailure
from scp.storage.local import LocalStore

STUDY = "1.2.3"


def instance(sop: str) -> ReceivedInstance:
    return ReceivedInstance(
        "1.2.840.10008.5.1.4.1.1.2", sop, STUDY, "1.2.3.4", "1.2.840.10008.1.2.1", "CT01", 6, datetime.now(UTC)
    )


def outbox(tmp_path: Path) -> tuple[ForwardingStore, Path]:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    database = tmp_path / "forwarding.sqlite"
    results = Results(database)
    # Never started: these tests are about the receive path, which only wakes the forwarder.
    forwarder = Forwarder(results, lambda: None, Metrics(write=lambda line: None))  # type: ignore[arg-type,return-value]
    return ForwardingStore(LocalStore(store_dir), results, forwarder), database


def staged(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.rx"
    path.write_bytes(b"object")
    return path


def test_a_stored_object_has_its_forwarding_row_committed_before_the_store_returns(tmp_path: Path) -> None:
    store, database = outbox(tmp_path)
    stored = store.store(staged(tmp_path, "a"), instance("1.2.3.4.5"))
    # Another connection sees the row: it is committed, not only written into this connection's transaction.
    rows = study_rows(database, STUDY)
    assert [(row.sop_instance_uid, row.status) for row in rows] == [("1.2.3.4.5", FORWARDING)]
    assert Path(stored.location).read_bytes() == b"object"


def test_a_row_the_database_refuses_fails_the_store_with_a_status_to_retry(tmp_path: Path) -> None:
    store, database = outbox(tmp_path)
    store.store(staged(tmp_path, "a"), instance("1.2.3.4.5"))
    # The forwarding database stops taking rows (its table is gone); the object store itself still works.
    other = sqlite3.connect(database)
    other.execute("DROP TABLE instances")
    other.close()
    with pytest.raises(StoreFailure) as refused:
        store.store(staged(tmp_path, "b"), instance("1.2.3.4.6"))
    # Not recorded means never forwarded: the modality is told to send it again, not that it is done.
    assert refused.value.status == Status.OUT_OF_RESOURCES
    assert "forwarding database failed" in refused.value.reason
