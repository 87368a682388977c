"""COMMITMENT_AFTER=healthimaging's evidence: StoreDICOM forwarding's result for each instance, read from the
forwarding database (scp/forwarding/results.py) without changing it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from scp.commitment.committer import ForwardedState
from scp.forwarding.results import instance_states

LOG = logging.getLogger(__name__)


class ForwardingDatabase:
    def __init__(self, path: Path) -> None:
        self._path = path

    def states(self, sop_instance_uids: Sequence[str]) -> dict[str, ForwardedState]:
        try:
            found = instance_states(self._path, sop_instance_uids)
        except sqlite3.Error as error:
            # Nothing known now is nothing committed now: the instances stay awaited until the deadline.
            LOG.warning("commitment check cannot read the forwarding database", extra={"error": str(error)})
            return {}
        return {uid: ForwardedState(sop_class_uid, status) for uid, (sop_class_uid, status) in found.items()}
