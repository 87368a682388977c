"""The receive spool: in-flight objects, on the store's own filesystem so a finished one is renamed into place.

Files here are never visible under a final name; a crash leaves them behind, and start-up removes them.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

SPOOL_DIRECTORY_NAME = ".incoming"


class Spool:
    def __init__(self, root: Path) -> None:
        self.directory = root / SPOOL_DIRECTORY_NAME

    def prepare(self) -> int:
        """Create the spool and remove what a crashed run left behind; returns how many files were removed."""
        removed = 0
        if self.directory.exists():
            removed = sum(1 for _ in self.directory.iterdir())
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        return removed

    def new_path(self, suffix: str) -> Path:
        return self.directory / f"{uuid.uuid4().hex}{suffix}"
