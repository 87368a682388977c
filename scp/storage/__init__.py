"""Storage backends behind one small interface: each makes a staged Part-10 file durable, or says why not."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from scp.instances import ReceivedInstance, StoredInstance


class Store(Protocol):
    def store(self, staged: Path, instance: ReceivedInstance) -> StoredInstance:
        """Make ``staged`` durable; return only once it is. Raises ``StoreFailure`` with the status to answer."""

    def close(self) -> None:
        """Finish pending work (an open S3 batch) before the daemon exits."""
