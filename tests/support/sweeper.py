"""The sweeper function, loaded in this process against moto_server, run at a time when every batch the test
opened looks abandoned to it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest

from tests.functions.workflow import load_app
from tests.support.daemon import Daemon, send_files
from tests.support.moto import MotoServer
from tests.support.s3 import open_batch_ids

# What the sweeper's settings read besides the bucket; only its sealing and late-object passes run here.
SETTINGS = {
    "BATCH_WINDOW_SECONDS": "6",
    "TABLE_NAME": "imports",
    "STATE_MACHINE_ARN": "arn:aws:states:us-east-1:123456789012:stateMachine:import",
}
MIN_AGE_SECONDS = 900
LOOKBACK_HOURS = 72


@dataclass
class Sweeper:
    app: ModuleType
    bucket: str
    # An hour from the test's start: older than MIN_AGE_SECONDS is every batch the test opens.
    now: datetime

    def seal(self) -> list[str]:
        """The sealing pass; returns the ids of the batches it wrote a manifest for."""
        return list(self.app.sweep(self.app.S3, self.bucket, self.now, MIN_AGE_SECONDS, LOOKBACK_HOURS))

    def recover_late(self) -> list[str]:
        """The late-object pass; returns the ids of the late batches it closed."""
        return list(self.app.recover_late(self.app.S3, self.bucket, self.now, MIN_AGE_SECONDS, LOOKBACK_HOURS))


def load_sweeper(bucket: str, monkeypatch: pytest.MonkeyPatch) -> Sweeper:
    app = load_app("sweeper", monkeypatch, {"DICOM_BUCKET": bucket, **SETTINGS})
    return Sweeper(app, bucket, datetime.now(UTC) + timedelta(hours=1))


def seal_between(daemon: Daemon, sweeper: Sweeper, server: MotoServer, before: list[Path], after: list[Path]) -> str:
    """Store ``before``, have the sweeper seal their batch as abandoned while the daemon still fills it, then store
    ``after`` into that same batch (its window still open); returns the sealed batch's id."""
    assert send_files(daemon, before) == [0] * len(before)
    (sealed_id,) = open_batch_ids(server, sweeper.bucket)
    assert sweeper.seal() == [sealed_id]
    assert send_files(daemon, after) == [0] * len(after)
    return sealed_id
