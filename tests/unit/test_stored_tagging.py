"""The tags the daemon writes once StoreDICOM stored an instance: retried on S3 errors, counted when they fail."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.stored_tags import parse_stored_tags
from scp.forwarding.object_tagging import TaggingFailed
from scp.forwarding.stored_tagging import WORKERS, StoredTagger
from scp.metrics import Metrics

ANSWER = StoredByStoreDICOM("2026-11-23T18:57:03.113Z", "0123456789abcdef0123456789abcdef", None)
KEY = "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.5.dcm"


class FlakyS3:
    """A tag writer (each worker's PutObjectTagging) that fails ``failures`` times with SlowDown first."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.tagged: dict[str, Any] = {}
        self.calls = 0
        self.done = threading.Event()

    def put_tags(self, key: str, tags: Sequence[Mapping[str, str]]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            if self.calls == self.failures == 5:
                self.done.set()
            raise TaggingFailed("S3 answered 503 SlowDown: Please reduce your request rate.")
        self.tagged[key] = tags
        self.done.set()

    def close(self) -> None:
        return


def tag_failures(metrics: Metrics) -> float:
    for document in metrics.take():
        if "ForwardTagFailed" in document:
            return float(document["ForwardTagFailed"])
    return 0.0


def test_a_tag_is_retried_through_s3_errors() -> None:
    s3, metrics = FlakyS3(failures=2), Metrics()
    metrics.forwarding_enabled()
    tagger = StoredTagger(lambda: s3, metrics, first_backoff_seconds=0.01)
    tagger.start()
    tagger.tag(KEY, ANSWER)
    assert s3.done.wait(5)
    tagger.stop(1)
    assert s3.calls == 3 and parse_stored_tags(s3.tagged[KEY]) == ANSWER
    assert tag_failures(metrics) == 0


def test_a_tag_that_cannot_be_written_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    s3, metrics = FlakyS3(failures=5), Metrics()
    metrics.forwarding_enabled()
    tagger = StoredTagger(lambda: s3, metrics, first_backoff_seconds=0.01)
    tagger.start()
    with caplog.at_level(logging.ERROR):
        tagger.tag(KEY, ANSWER)
        assert s3.done.wait(5)
        tagger.stop(1)
    assert s3.calls == 5 and not s3.tagged
    assert tag_failures(metrics) == 1
    assert [r.key for r in caplog.records if r.getMessage().startswith("StoreDICOM stored it")] == [KEY]


class SlowS3:
    """A tag writer that answers only once ``together`` requests are under way at the same time."""

    def __init__(self, together: int) -> None:
        self.barrier = threading.Barrier(together, timeout=5)
        self.tagged: list[str] = []
        self.lock = threading.Lock()

    def put_tags(self, key: str, tags: Sequence[Mapping[str, str]]) -> None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise TaggingFailed("S3 answered 400 RequestTimeout: alone") from None
        with self.lock:
            self.tagged.append(key)

    def close(self) -> None:
        return


def test_tags_are_written_several_at_once_so_that_they_keep_up_with_storedicom() -> None:
    s3, metrics = SlowS3(together=WORKERS), Metrics()
    metrics.forwarding_enabled()
    tagger = StoredTagger(lambda: s3, metrics, attempts=1)
    tagger.start()
    keys = [KEY.replace("1.2.3.4.5.dcm", f"1.2.3.4.{number}.dcm") for number in range(WORKERS)]
    for key in keys:
        tagger.tag(key, ANSWER)
    tagger.stop(10)
    assert sorted(s3.tagged) == sorted(keys)
    assert tag_failures(metrics) == 0
