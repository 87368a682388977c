"""Named DICOM status codes the SCP returns (PS3.4 Annex B.2.3 for C-STORE, PS3.7 C for the general ones) and the
Failure Reasons of its Storage Commitment reports (PS3.3 C.14.1.1), which share that code space."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    # PS3.7 C.4: the N-ACTION-RSP failures of a refused Storage Commitment request (PS3.7 10.1.4.1.10).
    PROCESSING_FAILURE = 0x0110
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    NO_SUCH_ACTION = 0x0123
    RESOURCE_LIMITATION = 0x0213
    # PS3.7 C.5.13: the command names a SOP class other than its presentation context's.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    # A7xx: the object was not stored through no fault of its own; the sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    # A9xx: the data set does not match the SOP class (or the command) it was sent under.
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Cxxx: the data set cannot be parsed in the negotiated transfer syntax; resending will not help.
    CANNOT_UNDERSTAND = 0xC000


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) of an instance in a Storage Commitment report's Failed SOP Sequence."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    CLASS_INSTANCE_CONFLICT = 0x0119


class StoreFailure(Exception):
    """A store that must be answered with ``status``; ``reason`` becomes the log line and the ErrorComment."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
