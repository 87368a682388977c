"""Reading an N-ACTION-RQ (Request Storage Commitment, PS3.4 J.3.2) into a checked request, or why it is refused."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode

from scp import dimse
from scp.commitment import REQUEST_STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH_MODEL
from scp.status import Status
from scp.uids import is_valid_uid

# A request names every instance of a study or two; 10,000 covers the largest CT and tomosynthesis studies, and a
# modality with more splits them over several requests. The data set cap follows: about 130 bytes per item.
MAX_REFERENCES = 10_000
MAX_DATA_SET_BYTES = 2 * 1024 * 1024
# What every association together may hold of request data sets while they arrive: eight of the largest at once.
# A deployment sizes MAXIMUM_ASSOCIATIONS at about 1 MiB each; this keeps commitment requests inside that.
MAX_DATA_SET_BYTES_HELD = 8 * MAX_DATA_SET_BYTES

_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# The Item tag (FFFE,E000) in little endian. Every sequence item starts with it, so its count bounds the items
# pydicom would build: 2 MiB of empty items is 130,000 of them, seconds of CPU and a hundred MiB to decode.
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_TRANSACTION_UID = 0x00081195
_REFERENCED_SOP_SEQUENCE = 0x00081199
_REFERENCED_SOP_CLASS_UID = 0x00081150
_REFERENCED_SOP_INSTANCE_UID = 0x00081155


class Refused(Exception):
    """The N-ACTION is answered with ``status``: the SCP is not processing it (PS3.4 J.3.2.1.3)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    references: tuple[Reference, ...]


class ActionBudget:
    """The bytes of N-ACTION data sets that every association together holds in memory; thread-safe."""

    def __init__(self, limit: int = MAX_DATA_SET_BYTES_HELD) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self._held + size > self.limit:
                return False
            self._held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._held -= size

    @property
    def held(self) -> int:
        with self._lock:
            return self._held


class ActionData:
    """An N-ACTION's data set as its fragments arrive, held in memory up to ``MAX_DATA_SET_BYTES`` and within the
    shared ``budget``; beyond either the rest is read and dropped, and the request is refused once complete.
    ``release`` gives the bytes back once the request is decoded or dropped."""

    def __init__(self, budget: ActionBudget) -> None:
        self._budget = budget
        self._data = bytearray()
        self.oversized = False
        self.crowded = False  # the shared budget was spent by other associations' requests

    def append(self, fragment: memoryview | bytes) -> None:
        if self.oversized or self.crowded:
            return
        if len(self._data) + len(fragment) > MAX_DATA_SET_BYTES:
            self.oversized = True
            self.release()
        elif not self._budget.take(len(fragment)):
            self.crowded = True
            self.release()
        else:
            self._data += fragment

    def data(self) -> bytes:
        return bytes(self._data)

    def release(self) -> None:
        self._budget.give_back(len(self._data))
        self._data = bytearray()


def check_command(command: dimse.Command) -> None:
    """The command names the commitment SOP Class, its well-known instance and the one action it has."""
    if command.requested_sop_class_uid != STORAGE_COMMITMENT_PUSH_MODEL:
        raise Refused(Status.NO_SUCH_SOP_CLASS, "Requested SOP Class UID is not Storage Commitment Push Model")
    if command.requested_sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
        raise Refused(Status.INVALID_OBJECT_INSTANCE, "Requested SOP Instance UID is not 1.2.840.10008.1.20.1.1")
    if command.action_type_id != REQUEST_STORAGE_COMMITMENT:
        raise Refused(Status.NO_SUCH_ACTION, "Action Type ID is not 1 (Request Storage Commitment)")


def parse_request(action: ActionData | None, transfer_syntax: str) -> CommitmentRequest:
    """The Transaction UID and the Referenced SOP Sequence of an N-ACTION's data set, every UID checked."""
    if action is None:
        raise Refused(Status.INVALID_ARGUMENT_VALUE, "N-ACTION without Action Information")
    if action.oversized:
        raise Refused(Status.RESOURCE_LIMITATION, f"request data set over {MAX_DATA_SET_BYTES} bytes")
    if action.crowded:
        raise Refused(Status.RESOURCE_LIMITATION, "too many commitment requests arriving at once; retry later")
    data = action.data()
    if data.count(_ITEM_TAG) > MAX_REFERENCES:
        raise Refused(Status.RESOURCE_LIMITATION, f"over {MAX_REFERENCES} sequence items in one request")
    try:
        # The commitment context is accepted in the little endian syntaxes only (scp/negotiation.py).
        dataset = decode(BytesIO(data), transfer_syntax == _IMPLICIT_VR_LITTLE_ENDIAN, True)
        return _request(dataset)
    except Refused:
        raise
    except Exception as error:  # noqa: BLE001 - any decoding failure is the peer's malformed data set
        reason = f"undecodable request data set: {type(error).__name__}"
        raise Refused(Status.INVALID_ARGUMENT_VALUE, reason) from None


def _request(dataset: Dataset) -> CommitmentRequest:
    transaction = dataset.get(_TRANSACTION_UID)
    transaction_uid = str(transaction.value) if transaction is not None and transaction.value else ""
    if not is_valid_uid(transaction_uid):
        raise Refused(Status.INVALID_ARGUMENT_VALUE, "Transaction UID missing or not a valid UID")
    sequence = dataset.get(_REFERENCED_SOP_SEQUENCE)
    items = sequence.value if sequence is not None else None
    if not isinstance(items, Sequence) or not items:
        raise Refused(Status.INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence missing or empty")
    if len(items) > MAX_REFERENCES:
        raise Refused(Status.RESOURCE_LIMITATION, f"over {MAX_REFERENCES} instances in one request")
    references = []
    for position, item in enumerate(items, start=1):
        uids = []
        for tag, name in ((_REFERENCED_SOP_CLASS_UID, "Class"), (_REFERENCED_SOP_INSTANCE_UID, "Instance")):
            element = item.get(tag)
            uid = str(element.value) if element is not None and element.value else ""
            if not is_valid_uid(uid):
                reason = f"item {position}: Referenced SOP {name} UID missing or invalid"
                raise Refused(Status.INVALID_ARGUMENT_VALUE, reason)
            uids.append(uid)
        references.append(Reference(*uids))
    return CommitmentRequest(transaction_uid, tuple(references))
