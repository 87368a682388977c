"""What the receive path knows of one object: as received (identity validated) and as stored.

The bottom of the receive path: the handler builds these, the stores and the import batches read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
