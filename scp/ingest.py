"""The C-STORE pipeline: check a received object against its command, then hand it to the store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from scp.dataset_header import DatasetIdentity, read_identity
from scp.part10 import dataset_offset
from scp.status import Status, StoreFailure
from scp.storage import ReceivedInstance, Store, StoredInstance
from scp.uids import is_valid_uid

# Our own Part-10 header (preamble, prefix, file meta) is a few hundred bytes.
_HEADER_PROBE = 1024


@dataclass(frozen=True)
class StoreRequest:
    """What the C-STORE command and the association say about one received object.

    ``received_file`` is already a Part-10 file: the header written from the (validated) command, then the data
    set exactly as received.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae_title: str
    received_file: Path


class Ingest:
    def __init__(self, store: Store) -> None:
        self._store = store

    def receive(self, request: StoreRequest) -> tuple[ReceivedInstance, StoredInstance]:
        """Store one object durably or raise ``StoreFailure``. The caller removes the file if it is still there."""
        try:
            with open(request.received_file, "rb") as received:
                size = os.fstat(received.fileno()).st_size
                offset = dataset_offset(received.read(_HEADER_PROBE))
                received.seek(offset)
                identity = read_identity(received, size - offset, request.transfer_syntax)
        except OSError as error:
            raise StoreFailure(Status.OUT_OF_RESOURCES, f"receive spool failed: {error.strerror}") from error
        instance = _instance(request, identity, size - offset)
        return instance, self._store.store(request.received_file, instance)


def _instance(request: StoreRequest, identity: DatasetIdentity, size: int) -> ReceivedInstance:
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
    if identity.sop_class_uid != request.sop_class_uid:
        raise StoreFailure(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "data set SOP Class UID differs from the command")
    if identity.sop_instance_uid != request.sop_instance_uid:
        raise StoreFailure(
            Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "data set SOP Instance UID differs from the command"
        )
    return ReceivedInstance(
        sop_class_uid=request.sop_class_uid,
        sop_instance_uid=request.sop_instance_uid,
        study_instance_uid=identity.study_instance_uid,  # type: ignore[arg-type]
        series_instance_uid=identity.series_instance_uid,  # type: ignore[arg-type]
        transfer_syntax=request.transfer_syntax,
        calling_ae_title=request.calling_ae_title,
        size=size,
        received_at=datetime.now(UTC),
    )
