"""The C-STORE pipeline: validate a received data set, frame it as a Part-10 file, hand it to the store."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from scp.dataset_header import DatasetIdentity, read_identity
from scp.part10 import dataset_offset, part10_header
from scp.spool import Spool, remove_quietly
from scp.status import Status, StoreFailure
from scp.storage import ReceivedInstance, Store, StoredInstance
from scp.uids import is_valid_uid

# pynetdicom's receive file starts with its own preamble and file meta; a few hundred bytes hold all of it.
_RECEIVE_HEADER_PROBE = 1024


@dataclass(frozen=True)
class StoreRequest:
    """What the C-STORE command and the association say about one incoming object."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae_title: str
    received_file: Path


class Ingest:
    def __init__(self, spool: Spool, store: Store) -> None:
        self._spool = spool
        self._store = store

    def receive(self, request: StoreRequest) -> tuple[ReceivedInstance, StoredInstance]:
        """Store one object durably or raise ``StoreFailure``; the received file is left for pynetdicom."""
        write_error = self._spool.take_write_error(request.received_file)
        if write_error is not None:
            raise StoreFailure(Status.OUT_OF_RESOURCES, f"receive spool write failed: {write_error.strerror}")
        _check_command(request)
        staged = self._spool.new_path(".dcm")
        try:
            instance = self._stage(request, staged)
            return instance, self._store.store(staged, instance)
        finally:
            remove_quietly(staged)  # already renamed or uploaded on success; never left behind on failure

    def _stage(self, request: StoreRequest, staged: Path) -> ReceivedInstance:
        try:
            with open(request.received_file, "rb") as received:
                size = os.fstat(received.fileno()).st_size
                offset = dataset_offset(received.read(_RECEIVE_HEADER_PROBE))
                received.seek(offset)
                identity = read_identity(received, size - offset, request.transfer_syntax)
                instance = _instance(request, identity, size - offset)
                header = part10_header(
                    instance.sop_class_uid,
                    instance.sop_instance_uid,
                    request.transfer_syntax,
                    instance.calling_ae_title,
                )
                with open(staged, "wb", buffering=0) as output:
                    output.write(header)
                    _copy_range(received.fileno(), output.fileno(), offset, size - offset)
        except OSError as error:
            raise StoreFailure(Status.OUT_OF_RESOURCES, f"receive spool failed: {error.strerror}") from error
        return instance


def _check_command(request: StoreRequest) -> None:
    for name, uid in (
        ("Affected SOP Class UID", request.sop_class_uid),
        ("Affected SOP Instance UID", request.sop_instance_uid),
    ):
        if not is_valid_uid(uid):
            raise StoreFailure(Status.CANNOT_UNDERSTAND, f"command {name} is not a valid UID")


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
    # PS3.4 B.2.3: a data set that does not match the SOP class or instance of its command is 0xA900.
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


def _copy_range(source: int, destination: int, offset: int, count: int) -> None:
    """Copy in the kernel: the data set never passes through this process's memory."""
    while count:
        try:
            copied = os.copy_file_range(source, destination, count, offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = os.sendfile(destination, source, offset, count)  # filesystems without copy_file_range
        if copied == 0:
            raise OSError(0, "receive file ended early")
        offset += copied
        count -= copied
