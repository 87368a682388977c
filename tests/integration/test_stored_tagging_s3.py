"""The forwarding tags against a real moto_server, through the fault proxy: the daemon's own signed PutObjectTagging
is read back by boto3 as written, and S3's errors (throttling, a key not there yet) are tried again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from batch_contract.manifest import StoredByStoreDICOM
from batch_contract.stored_tags import parse_stored_tags, stored_tags
from scp.config import Settings
from scp.forwarding.object_tagging import TaggingClient, tagging_endpoint
from scp.forwarding.stored_tagging import StoredTagger
from scp.metrics import Metrics
from scp.storage.s3 import s3_client, s3_session
from tests.support.moto import MotoServer
from tests.support.s3 import new_bucket, s3
from tests.support.s3_faults import SLOW_DOWN, FaultProxy, fault_proxy
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

ANSWER = StoredByStoreDICOM(
    "2026-11-23T18:57:03.113Z", "0123456789abcdef0123456789abcdef", "B007 data set does not match SOP class"
)


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    with fault_proxy(moto.endpoint, keep_alive=True) as server:
        yield server


def tagger(
    moto: MotoServer, proxy: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch, first_backoff: float = 0.05
) -> tuple[StoredTagger, Metrics]:
    """The daemon's tagger as startup wires it, its S3 client pointed at the proxy."""
    for name, value in {**moto.env(), "AWS_ENDPOINT_URL": proxy.endpoint}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env({"DICOM_BUCKET": bucket, "AWS_REGION": "us-east-1"})
    session = s3_session(settings)
    endpoint = tagging_endpoint(s3_client(settings, session), bucket, session.get_credentials())
    assert endpoint.bucket_url == f"{proxy.endpoint}/{bucket}"  # path-style, as boto3 addresses a custom endpoint
    metrics = Metrics()
    metrics.forwarding_enabled()
    return StoredTagger(lambda: TaggingClient(endpoint), metrics, first_backoff_seconds=first_backoff), metrics


def tag_failures(metrics: Metrics) -> float:
    return sum(float(document.get("ForwardTagFailed", 0)) for document in metrics.take())


def read_tags(moto: MotoServer, bucket: str, key: str) -> list[dict[str, Any]]:
    return list(s3(moto).get_object_tagging(Bucket=bucket, Key=key)["TagSet"])


def test_the_tags_are_read_back_by_boto3_as_written(
    moto: MotoServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(moto)
    # Keys as the layout makes them, and one with characters a path must encode.
    keys = [f"batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.{n}.dcm" for n in range(20)]
    keys.append("batches/20261123T185700Z-3f9a1c2b7d4e5f60/a b+c%d~e/1.2.3.4.99.dcm")
    for key in keys:
        s3(moto).put_object(Bucket=bucket, Key=key, Body=b"DICM")
    written, metrics = tagger(moto, proxy, bucket, monkeypatch)
    written.start()
    for key in keys:
        written.tag(key, ANSWER)
    written.stop(30)
    for key in keys:
        tags = read_tags(moto, bucket, key)
        assert sorted(tags, key=str) == sorted(stored_tags(ANSWER), key=str), key
        assert parse_stored_tags(tags) == ANSWER
    assert tag_failures(metrics) == 0
    assert proxy.faulted == []


def test_a_tag_is_written_through_s3_throttling(
    moto: MotoServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(moto)
    key = "batches/20261123T185700Z-3f9a1c2b7d4e5f60/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    s3(moto).put_object(Bucket=bucket, Key=key, Body=b"DICM")
    proxy.fail(SLOW_DOWN, times=2)
    written, metrics = tagger(moto, proxy, bucket, monkeypatch)
    written.start()
    written.tag(key, ANSWER)
    wait_for(lambda: parse_stored_tags(read_tags(moto, bucket, key)), 10, "the tags written after two SlowDowns")
    written.stop(5)
    assert [entry.split()[0] + " " + entry.split()[2] for entry in proxy.faulted] == ["PUT SlowDown"] * 2
    assert all(entry.split()[1].endswith(f"/{bucket}/{key}?tagging") for entry in proxy.faulted)
    assert parse_stored_tags(read_tags(moto, bucket, key)) == ANSWER
    assert tag_failures(metrics) == 0


def test_a_tag_waits_for_an_object_not_there_yet(
    moto: MotoServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late answer is tagged on its batch's fallback copy, which may come a moment later: NoSuchKey is retried."""
    bucket = new_bucket(moto)
    key = "batches/20261123T185800Z-0a1b2c3d4e5f6a7b/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    written, metrics = tagger(moto, proxy, bucket, monkeypatch, first_backoff=0.25)  # 3.75 s of retries
    written.start()
    written.tag(key, ANSWER)
    wait_for(lambda: f"PUT /{bucket}/{key}?tagging 404" in proxy.forwarded, 5, "S3's NoSuchKey")
    s3(moto).put_object(Bucket=bucket, Key=key, Body=b"DICM")
    wait_for(lambda: parse_stored_tags(read_tags(moto, bucket, key)), 10, "the tags written once the object came")
    written.stop(5)
    assert tag_failures(metrics) == 0


def test_a_tag_s3_keeps_refusing_is_counted_with_s3s_error(
    moto: MotoServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = new_bucket(moto)
    key = "batches/20261123T185900Z-1a2b3c4d5e6f7a8b/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    s3(moto).put_object(Bucket=bucket, Key=key, Body=b"DICM")
    proxy.fail(SLOW_DOWN)
    written, metrics = tagger(moto, proxy, bucket, monkeypatch)
    written.start()
    written.tag(key, ANSWER)
    wait_for(lambda: len(proxy.faulted) == 5, 10, "five attempts")
    written.stop(5)
    assert tag_failures(metrics) == 1
    (record,) = [r for r in caplog.records if r.getMessage().startswith("StoreDICOM stored it")]
    assert record.key == key
    assert record.error == "S3 answered 503 SlowDown: Please reduce your request rate."
    assert read_tags(moto, bucket, key) == []
