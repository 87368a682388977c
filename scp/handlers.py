"""C-ECHO and C-STORE (PS3.4 A, B): checks, data set identity, store, status, outcome log and metrics.

The association calls these and sends the status they return; they know no sockets. As in pynetdicom's
``EVT_C_STORE`` contract (``pynetdicom/_handlers.py``), a handler answers every request with a status and never
raises: a fault of ours is 0xA700 (retry later), never a status that tells the modality its data is bad.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from scp import dimse
from scp.dataset_header import DatasetIdentity
from scp.instances import ReceivedInstance, StoredInstance
from scp.logs import printable
from scp.metrics import Metrics
from scp.part10 import part10_header
from scp.receive_file import ReceiveFile
from scp.spool import Spool
from scp.status import Status, StoreFailure
from scp.storage import Store
from scp.uids import is_valid_uid

LOG = logging.getLogger(__name__)


def source_ae_title(calling: str) -> str:
    """The calling AE title as it may appear in a file meta (AE VR: 16 printable characters, no backslash)."""
    return printable(calling).replace("\\", "?")[:16]


@dataclass
class PendingStore:
    """A C-STORE whose command has arrived: its data set goes to ``receive_file``, or, when ``failure`` was decided
    from the command, is read and discarded."""

    command: dimse.Command
    transfer_syntax: str
    calling_ae_title: str  # as written into the file meta and the batch manifest
    started: float
    receive_file: ReceiveFile | None = None
    failure: StoreFailure | None = None

    def discard(self) -> None:
        """Nothing of this object stays in the spool: refused, uploaded, renamed into the store already, or cut
        short by the end of its association."""
        if self.receive_file is not None:
            self.receive_file.discard()


def handle_echo() -> Status:
    """PS3.7 9.1.5: a C-ECHO is answered with Success; that is the whole of Verification."""
    return Status.SUCCESS


class StoreHandler:
    def __init__(self, store: Store, spool: Spool, metrics: Metrics, writeback: bool = False) -> None:
        """``writeback``: the store keeps the receive file where it is and flushes it (the local store), so its
        writeback starts while the data arrives."""
        self._store = store
        self._spool = spool
        self._metrics = metrics
        self._writeback = writeback

    def begin(self, command: dimse.Command, context: tuple[str, str], calling_ae_title: str) -> PendingStore:
        """The command of a C-STORE on ``context`` (abstract syntax, transfer syntax) has arrived: check it and
        open the receive file behind the Part-10 header written from it."""
        abstract_syntax, transfer_syntax = context
        pending = PendingStore(command, transfer_syntax, source_ae_title(calling_ae_title), time.monotonic())
        pending.failure = _check_command(command, abstract_syntax)
        if pending.failure is None:
            header = part10_header(
                command.affected_sop_class_uid, command.affected_sop_instance_uid, transfer_syntax,
                pending.calling_ae_title,
            )  # fmt: skip
            try:
                pending.receive_file = ReceiveFile(self._spool.new_path(".rx"), header, self._writeback)
            except OSError as error:
                pending.failure = StoreFailure(Status.OUT_OF_RESOURCES, f"receive spool failed: {error.strerror}")
        return pending

    def end(self, pending: PendingStore, log_fields: Mapping[str, Any]) -> tuple[Status, str | None]:
        """The data set has arrived: store it durably, log and count the outcome, and return the status with the
        error comment to answer."""
        try:
            instance, stored = self._store_received(pending)
        except StoreFailure as refused:
            failure = refused
        except Exception as error:
            LOG.exception("store failed unexpectedly", extra={**log_fields, "error": type(error).__name__})
            failure = StoreFailure(Status.OUT_OF_RESOURCES, "internal error, retry later")
        else:
            milliseconds = round((time.monotonic() - pending.started) * 1000, 1)
            self._metrics.object_stored(instance.size, milliseconds)
            if LOG.isEnabledFor(logging.INFO):  # the line's fields cost more than the check when it is off
                _log_stored(instance, stored, milliseconds, log_fields)
            return Status.SUCCESS, None
        finally:
            pending.discard()  # refused, uploaded, or already renamed into the store
        self._metrics.store_failed(failure.status)
        LOG.warning(
            "store failed",
            extra={
                **log_fields,
                "status": f"0x{failure.status:04X}",
                "reason": failure.reason,
                "sop_instance_uid": printable(pending.command.affected_sop_instance_uid),
            },
        )
        return failure.status, failure.reason

    def _store_received(self, pending: PendingStore) -> tuple[ReceivedInstance, StoredInstance]:
        if pending.failure is not None:
            raise pending.failure
        received = pending.receive_file
        assert received is not None
        identity = received.complete(pending.transfer_syntax)
        instance = _instance(pending, identity, received.bytes_received)
        stored = self._store.store(received.path, instance)
        if self._writeback:
            received.taken_over()  # renamed into the store: nothing is left in the spool to remove
        return instance, stored


def _log_stored(
    instance: ReceivedInstance, stored: StoredInstance, milliseconds: float, log_fields: Mapping[str, Any]
) -> None:
    LOG.info(
        "replaced" if stored.replaced else "stored",
        extra={
            **log_fields,
            "sop_class_uid": instance.sop_class_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "study_instance_uid": instance.study_instance_uid,
            "series_instance_uid": instance.series_instance_uid,
            "transfer_syntax": instance.transfer_syntax,
            "bytes": instance.size,
            "milliseconds": milliseconds,
            "location": stored.location,
        },
    )


def _check_command(command: dimse.Command, abstract_syntax: str) -> StoreFailure | None:
    for name, uid in (
        ("Affected SOP Class UID", command.affected_sop_class_uid),
        ("Affected SOP Instance UID", command.affected_sop_instance_uid),
    ):
        if not is_valid_uid(uid):
            return StoreFailure(Status.CANNOT_UNDERSTAND, f"command {name} is not a valid UID")
    if command.affected_sop_class_uid != abstract_syntax:
        return StoreFailure(Status.SOP_CLASS_NOT_SUPPORTED, "SOP Class UID differs from the presentation context")
    return None


def _instance(pending: PendingStore, identity: DatasetIdentity, size: int) -> ReceivedInstance:
    command = pending.command
    for name, uid in (
        ("SOP Class UID", identity.sop_class_uid),
        ("SOP Instance UID", identity.sop_instance_uid),
        ("Study Instance UID", identity.study_instance_uid),
        ("Series Instance UID", identity.series_instance_uid),
    ):
        if not uid:
            raise StoreFailure(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"data set has no {name}")
        if not is_valid_uid(uid):
            raise StoreFailure(Status.CANNOT_UNDERSTAND, f"data set {name} is not a valid UID")
    # PS3.4 B.2.3: a data set that does not match the SOP class or instance of its command is 0xA900; checking
    # it also keeps the file meta (written from the command) true to the data set behind it.
    if identity.sop_class_uid != command.affected_sop_class_uid:
        raise StoreFailure(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "data set SOP Class UID differs from the command")
    if identity.sop_instance_uid != command.affected_sop_instance_uid:
        raise StoreFailure(
            Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "data set SOP Instance UID differs from the command"
        )
    return ReceivedInstance(
        sop_class_uid=command.affected_sop_class_uid,
        sop_instance_uid=command.affected_sop_instance_uid,
        study_instance_uid=identity.study_instance_uid,  # type: ignore[arg-type]
        series_instance_uid=identity.series_instance_uid,  # type: ignore[arg-type]
        transfer_syntax=pending.transfer_syntax,
        calling_ae_title=pending.calling_ae_title,
        size=size,
        received_at=datetime.now(UTC),
    )
