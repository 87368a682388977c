"""The Storage Commitment Result: the N-EVENT-REPORT's Event Type ID and Event Information (PS3.4 J.3.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from scp.commitment import ALL_COMMITTED, FAILURES_EXIST
from scp.commitment.pending import COMMITTED
from scp.commitment.request import Reference


@dataclass(frozen=True)
class Report:
    transaction_uid: str
    event_type: int
    event_information: Dataset
    committed: int
    failed: int


def build_report(transaction_uid: str, outcomes: Sequence[tuple[Reference, int]]) -> Report:
    """Every referenced instance appears once: in the Referenced SOP Sequence if committed, else in the Failed SOP
    Sequence with its Failure Reason (PS3.4 J.3.3.1.2)."""
    committed, failed = DicomSequence(), DicomSequence()
    for reference, outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = reference.sop_class_uid
        item.ReferencedSOPInstanceUID = reference.sop_instance_uid
        if outcome == COMMITTED:
            committed.append(item)
        else:
            item.FailureReason = int(outcome)
            failed.append(item)
    information = Dataset()
    information.TransactionUID = transaction_uid
    if committed:
        information.ReferencedSOPSequence = committed
    if failed:
        information.FailedSOPSequence = failed
    return Report(
        transaction_uid, FAILURES_EXIST if failed else ALL_COMMITTED, information, len(committed), len(failed)
    )
