"""Storage backends behind one small interface: each makes a staged Part-10 file durable, or says why not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ReceivedInstance:
    """One received object, its identifying UIDs already validated."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    calling_ae_title: str
    size: int
    received_at: datetime


@dataclass(frozen=True)
class StoredInstance:
    location: str
    replaced: bool


class Store(Protocol):
    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        """Make ``staged`` durable; return only once it is. Raises ``StoreFailure`` with the status to answer."""

    def close(self) -> None:
        """Finish pending work (an open S3 batch) before the daemon exits."""
