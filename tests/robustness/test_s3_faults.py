"""S3 faults: the daemon in S3 mode behind a fault-injecting proxy acknowledges only what S3 has, and answers in time.

Every case ends with the S3 form of the robustness checks: with the fault cleared the same daemon stores again, its
memory stayed bounded, everything it acknowledged is in S3 (read back from moto directly, not through the proxy)
with the pixel data sent, the batch manifests list exactly the acknowledged objects, and ``echoscu`` is answered.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.robustness.conftest import RSS_GROWTH_LIMIT_MIB, Watched, echoscu_ok, sample
from tests.support.corpus import make_instance, read
from tests.support.daemon import send_files
from tests.support.moto import CREDENTIALS, MotoServer
from tests.support.s3 import manifests, objects, read_part10, s3
from tests.support.s3_faults import (
    ACCESS_DENIED,
    ANSWER_LOST,
    HANG,
    INTERNAL_ERROR,
    SLOW_DOWN,
    FaultProxy,
    fault_proxy,
)
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DIMSE_TIMEOUT = 6.0
RETRY_BUDGET = DIMSE_TIMEOUT * 0.75  # the share of DIMSE_TIMEOUT the daemon spends retrying (scp/storage/s3.py)
OBJECT_BYTES = 64 * 1024  # one PutObject; the multipart path starts at 16 MiB


@pytest.fixture(scope="module")
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    with fault_proxy(moto.endpoint) as running:
        yield running


@dataclass
class S3Case:
    watched: Watched
    proxy: FaultProxy
    moto: MotoServer
    bucket: str
    workdir: Path
    acknowledged: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> pixel data sent
    refused: set[str] = field(default_factory=set)

    def store(self) -> tuple[int, float]:
        """One C-STORE of a fresh object: its status and how long the daemon took to answer."""
        path = make_instance(self.workdir, pixel_bytes=OBJECT_BYTES)
        sent = read(path)
        started = time.monotonic()
        (status,) = send_files(self.watched.daemon, [path])
        elapsed = time.monotonic() - started
        if status == 0:
            self.acknowledged[sent.SOPInstanceUID] = sent.PixelData
        else:
            self.refused.add(sent.SOPInstanceUID)
        return status, elapsed

    def manifest_uids(self) -> list[str]:
        return [o["sopInstanceUid"] for m in manifests(self.moto, self.bucket) for o in m["objects"]]

    def assert_healthy(self) -> None:
        daemon = self.watched.daemon
        assert daemon.process.poll() is None, f"daemon exited; log:\n{daemon.log_path.read_text()[-3000:]}"
        self.proxy.heal()
        assert self.store()[0] == 0x0000, "the daemon did not store again once S3 recovered"
        now = sample(daemon.process.pid)
        assert now.rss_mib < self.watched.baseline.rss_mib + RSS_GROWTH_LIMIT_MIB, (self.watched.baseline, now)
        bodies = objects(self.moto, self.bucket, "batches/").values()
        stored = {read_part10(body).SOPInstanceUID: body for body in bodies}
        missing = sorted(set(self.acknowledged) - set(stored))
        assert not missing, f"acknowledged but not in S3: {missing}"
        for uid, pixels in self.acknowledged.items():
            assert read_part10(stored[uid]).PixelData == pixels, f"{uid}: S3 holds other pixel data than was sent"

        # The quiet window closes the batch; then every acknowledged object is listed, and nothing else.
        def listed_all() -> tuple[list[str], ...]:
            listed = self.manifest_uids()
            return (listed,) if set(self.acknowledged) <= set(listed) else ()

        (listed,) = wait_for(listed_all, 15, "manifests listing every acknowledged object")
        assert sorted(listed) == sorted(self.acknowledged), "a manifest lists an object that was not acknowledged"
        assert echoscu_ok(daemon), "echoscu got no answer"


@pytest.fixture
def case(start_watched: Callable[..., Watched], moto: MotoServer, proxy: FaultProxy,
         tmp_path: Path) -> Iterator[S3Case]:  # fmt: skip
    proxy.heal()
    proxy.faulted.clear()
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    s3(moto).create_bucket(Bucket=bucket)
    watched = start_watched(
        DICOM_BUCKET=bucket, DIMSE_TIMEOUT=str(DIMSE_TIMEOUT), BATCH_WINDOW_SECONDS="1",
        **CREDENTIALS, AWS_ENDPOINT_URL=proxy.endpoint,
    )  # fmt: skip
    running = S3Case(watched, proxy, moto, bucket, tmp_path)
    yield running
    running.assert_healthy()


def test_transient_slow_down_is_retried_and_the_store_succeeds(case: S3Case) -> None:
    case.proxy.fail(SLOW_DOWN, times=2)
    status, elapsed = case.store()
    assert status == 0x0000
    assert len(case.proxy.faulted) == 2, case.proxy.faulted
    assert elapsed < DIMSE_TIMEOUT
    assert case.watched.log_messages("S3 upload retry"), "the daemon's own retry loop did not run"


def test_transient_internal_error_is_retried_and_the_store_succeeds(case: S3Case) -> None:
    case.proxy.fail(INTERNAL_ERROR, times=2)
    status, elapsed = case.store()
    assert status == 0x0000
    assert len(case.proxy.faulted) == 2, case.proxy.faulted
    assert elapsed < DIMSE_TIMEOUT


def test_persistent_slow_down_is_refused_in_time_and_recovers_without_restart(case: S3Case) -> None:
    case.proxy.fail(SLOW_DOWN)
    status, elapsed = case.store()
    assert status == 0xA700
    assert elapsed < DIMSE_TIMEOUT, f"answered after {elapsed:.1f}s, the sender waits {DIMSE_TIMEOUT}s"
    (failure,) = case.watched.log_messages("store failed")
    assert failure["status"] == "0xA700" and "SlowDown" in failure["reason"], failure
    assert case.watched.daemon.process.poll() is None


def test_access_denied_is_refused_at_once_without_retrying(case: S3Case) -> None:
    case.proxy.fail(ACCESS_DENIED)
    status, elapsed = case.store()
    assert status == 0xA700
    assert elapsed < RETRY_BUDGET / 3, f"took {elapsed:.1f}s: a refusal that cannot change was retried"
    assert len(case.proxy.faulted) == 1, case.proxy.faulted
    assert not case.watched.log_messages("S3 upload retry")
    (failure,) = case.watched.log_messages("store failed")
    assert "AccessDenied" in failure["reason"], failure


def test_hanging_s3_is_refused_within_the_dimse_timeout(case: S3Case) -> None:
    case.proxy.fail(HANG)
    status, elapsed = case.store()
    assert status == 0xA700
    assert elapsed < DIMSE_TIMEOUT, f"answered after {elapsed:.1f}s, the sender waits {DIMSE_TIMEOUT}s"


def test_an_object_stored_by_an_upload_whose_answer_was_lost_is_removed_before_its_batch_is_imported(
    case: S3Case,
) -> None:
    # Every attempt reaches S3 and is stored; no answer comes back, so the modality is refused.
    case.proxy.fail(ANSWER_LOST, key_prefix="batches/")
    status, _ = case.store()
    assert status == 0xA700 and case.refused
    assert objects(case.moto, case.bucket, "batches/"), "the proxy did not let the upload reach S3"
    case.proxy.heal()
    assert case.store()[0] == 0x0000

    def strays() -> tuple[list[str], ...]:
        stored = [read_part10(body).SOPInstanceUID for body in objects(case.moto, case.bucket, "batches/").values()]
        return () if case.refused & set(stored) else (stored,)

    (stored,) = wait_for(strays, 15, "the refused object to be removed from its batch's prefix")
    assert sorted(stored) == sorted(case.acknowledged)
    (removed,) = case.watched.log_messages("object of a failed upload removed")
    assert removed["key"].startswith("batches/"), removed


def test_manifest_refused_while_objects_succeed_is_written_once_s3_recovers(case: S3Case) -> None:
    case.proxy.fail(SLOW_DOWN, key_prefix="manifests/")
    assert [case.store()[0] for _ in range(3)] == [0x0000] * 3
    wait_for(lambda: case.watched.log_messages("batch manifest not written, will retry"), 10,
             "the daemon to try the manifest and fail")  # fmt: skip
    assert case.manifest_uids() == []
    assert all("/manifests/" in request for request in case.proxy.faulted), case.proxy.faulted

    case.proxy.heal()
    wait_for(lambda: len(case.manifest_uids()) == 3, 20, "the manifest after S3 recovered")


def test_latency_proxy_holds_every_answer_back_and_passes_the_request_on(moto: MotoServer) -> None:
    """The benchmark's S3 stand-in: each answer comes at least the latency late, and the write reached S3."""
    import boto3

    bucket = f"latency-{uuid.uuid4().hex[:10]}"
    s3(moto).create_bucket(Bucket=bucket)
    with fault_proxy(moto.endpoint, latency_seconds=0.3) as slow:
        client = boto3.client("s3", endpoint_url=slow.endpoint, region_name=CREDENTIALS["AWS_REGION"],
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        started = time.monotonic()
        client.put_object(Bucket=bucket, Key="object", Body=b"x" * 1024, ChecksumAlgorithm="CRC32")
        elapsed = time.monotonic() - started
    assert elapsed >= 0.3, f"answered after {elapsed:.2f} s"
    assert objects(moto, bucket) == {"object": b"x" * 1024}


@pytest.mark.parametrize("keep_alive", [False, True])
def test_proxy_keeps_the_connection_only_when_asked(moto: MotoServer, keep_alive: bool) -> None:
    """The fault tests get one response per connection; the benchmark's stand-in keeps connections as S3 does."""
    import http.client
    from urllib.parse import urlsplit

    bucket = f"alive-{uuid.uuid4().hex[:10]}"
    s3(moto).create_bucket(Bucket=bucket)
    with fault_proxy(moto.endpoint, keep_alive=keep_alive) as proxy:
        address = urlsplit(proxy.endpoint)
        connection = http.client.HTTPConnection(str(address.hostname), address.port, timeout=10)
        sockets = []
        for _ in range(2):
            connection.request("GET", f"/{bucket}?list-type=2")
            response = connection.getresponse()
            assert response.status == 200 and b"ListBucketResult" in response.read()
            sockets.append(connection.sock)
        connection.close()
    if keep_alive:
        assert sockets[0] is not None and sockets[0] is sockets[1]
    else:
        assert sockets == [None, None]  # http.client drops a connection the answer closed
