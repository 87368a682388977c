"""The C-STORE handler: every request answered with a status, never an exception; the spool left empty."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from scp import dimse
from scp.handlers import StoreHandler
from scp.instances import ReceivedInstance, StoredInstance
from scp.metrics import Metrics
from scp.spool import Spool
from scp.status import Status
from scp.storage.local import LocalStore

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
WHO = {"peer": "127.0.0.1:1", "calling_ae": "CT1", "called_ae": "STORESCP"}


def ui(group: int, element: int, value: str) -> bytes:
    raw = value.encode() + (b"\x00" if len(value) % 2 else b"")
    return struct.pack("<HH2sH", group, element, b"UI", len(raw)) + raw


def data_set(sop_instance_uid: str = "1.2.3.4.5", sop_class_uid: str = CT) -> bytes:
    identity = ui(8, 0x16, sop_class_uid) + ui(8, 0x18, sop_instance_uid)
    return identity + ui(0x20, 0xD, "1.2.3") + ui(0x20, 0xE, "1.2.3.4")


def command(sop_instance_uid: str = "1.2.3.4.5", sop_class_uid: str = CT) -> dimse.Command:
    return dimse.Command(dimse.C_STORE_RQ, 1, True, sop_class_uid, sop_instance_uid)


class Outcomes:
    def __init__(self) -> None:
        self.metrics = Metrics(write=lambda line: None)

    def failures(self) -> dict[str, int]:
        documents = self.metrics.take()
        return {str(d["Status"]): int(d["StoreFailures"]) for d in documents if "Status" in d}


def store_once(handler: StoreHandler, sent: bytes, request: dimse.Command, context: tuple[str, str] = (CT, EXPLICIT_LE)
               ) -> tuple[int, str | None]:  # fmt: skip
    pending = handler.begin(request, context, "CT1")
    if pending.receive_file is not None:
        pending.receive_file.write(memoryview(sent))
    return handler.end(pending, WHO)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "store")
    spool.prepare()
    return spool


def test_a_whole_object_is_stored_and_the_spool_left_empty(spool: Spool, tmp_path: Path) -> None:
    outcomes = Outcomes()
    handler = StoreHandler(LocalStore(tmp_path / "store"), spool, outcomes.metrics)
    assert store_once(handler, data_set(), command()) == (Status.SUCCESS, None)
    stored = tmp_path / "store" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert stored.read_bytes().endswith(data_set())
    assert list(spool.directory.iterdir()) == []


@pytest.mark.parametrize(
    ("request_", "context", "status"),
    [
        (command(sop_instance_uid="1.2.3.4.6"), (CT, EXPLICIT_LE), Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        (command(sop_instance_uid="1.2/../3"), (CT, EXPLICIT_LE), Status.CANNOT_UNDERSTAND),
        (command(), ("1.2.840.10008.5.1.4.1.1.4", EXPLICIT_LE), Status.SOP_CLASS_NOT_SUPPORTED),
    ],
    ids=["data-set-differs", "crafted-uid", "other-context"],
)
def test_refusals_carry_their_status_and_leave_nothing(
    spool: Spool, tmp_path: Path, request_: dimse.Command, context: tuple[str, str], status: Status
) -> None:
    outcomes = Outcomes()
    handler = StoreHandler(LocalStore(tmp_path / "store"), spool, outcomes.metrics)
    answered, comment = store_once(handler, data_set(), request_, context)
    assert answered == status and comment
    assert outcomes.failures() == {f"0x{status:04X}": 1}
    assert list(spool.directory.iterdir()) == []
    assert not (tmp_path / "store" / "1.2.3").exists()


class BrokenStore:
    """A backend with a bug: the handler must still answer, and with "retry later", not "your data is bad"."""

    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        raise RuntimeError("a bug in a backend")

    def close(self) -> None:
        pass


def test_an_unexpected_error_of_ours_is_a700_not_a_status_blaming_the_data(spool: Spool) -> None:
    outcomes = Outcomes()
    handler = StoreHandler(BrokenStore(), spool, outcomes.metrics)
    assert store_once(handler, data_set(), command()) == (Status.OUT_OF_RESOURCES, "internal error, retry later")
    assert list(spool.directory.iterdir()) == []


def test_a_spool_that_cannot_take_the_file_is_a700_decided_from_the_command(spool: Spool, tmp_path: Path) -> None:
    outcomes = Outcomes()
    handler = StoreHandler(LocalStore(tmp_path / "store"), spool, outcomes.metrics)
    spool.directory.rmdir()
    pending = handler.begin(command(), (CT, EXPLICIT_LE), "CT1")
    assert pending.receive_file is None and pending.failure is not None
    assert handler.end(pending, WHO)[0] == Status.OUT_OF_RESOURCES
