"""DICOM_BUCKET against a real moto_server: durability, outages, batches and manifests."""

from __future__ import annotations

import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.support.corpus import PYDICOM_CORPUS, make_instance, read
from tests.support.daemon import Daemon, send_files
from tests.support.moto import MotoServer, start_moto_server
from tests.support.s3 import dataset_bytes, manifests, objects, read_part10, s3
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration


def test_round_trip_is_byte_identical_and_the_manifest_describes_the_batch(
    s3_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str
) -> None:
    daemon = s3_daemon(BATCH_WINDOW_SECONDS="1")
    # rtplan.dcm's file meta names another SOP instance than its data set; sent as is, that is rightly 0xA900.
    # Several MR_small variants share one SOP Instance UID; one of each instance makes the key check exact.
    unique = {read(f.path).SOPInstanceUID: f.path for f in reversed(PYDICOM_CORPUS) if f.name != "rtplan.dcm"}
    files = list(unique.values())
    assert send_files(daemon, files) == [0] * len(files)
    assert send_files(daemon, [next(f.path for f in PYDICOM_CORPUS if f.name == "rtplan.dcm")]) == [0xA900]

    (manifest,) = wait_for(lambda: manifests(moto, bucket), 20, "the batch manifest")
    stored = objects(moto, bucket, "batches/")
    assert len(stored) == len(files)
    for path in files:
        sent = read(path)
        key = f"{manifest['prefix']}{sent.StudyInstanceUID}/{sent.SeriesInstanceUID}/{sent.SOPInstanceUID}.dcm"
        assert dataset_bytes(stored[key]) == dataset_bytes(path.read_bytes()), path.name
        assert read_part10(stored[key]).file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID

    assert manifest["manifestVersion"] == 1
    assert manifest["closedBy"] == "window"
    assert manifest["bucket"] == bucket
    assert manifest["prefix"] == f"batches/{manifest['batchId']}/"
    assert manifest["objectCount"] == len(files)
    assert manifest["byteCount"] == sum(len(body) for body in stored.values())
    assert manifest["callingAETitles"] == ["CT01"]
    assert {o["key"] for o in manifest["objects"]} == set(stored)
    assert {o["sopInstanceUid"] for o in manifest["objects"]} == {read(f).SOPInstanceUID for f in files}
    assert manifest["firstReceivedAt"] <= manifest["lastReceivedAt"]
    assert daemon.spool_files() == []


def test_s3_outage_refuses_with_a700_then_recovers_without_restart(
    s3_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    private = start_moto_server()
    try:
        name = "outage-bucket"
        s3(private).create_bucket(Bucket=name)
        daemon = s3_daemon(private, DICOM_BUCKET=name, DIMSE_TIMEOUT="6", BATCH_WINDOW_SECONDS="1")
        first, during, after = (make_instance(tmp_path, pixel_bytes=64 * 1024) for _ in range(3))
        assert send_files(daemon, [first]) == [0]

        private.process.send_signal(signal.SIGSTOP)  # S3 stops answering: connections hang, as in an outage
        try:
            assert send_files(daemon, [during]) == [0xA700]
            assert daemon.echo_ok(), "the daemon keeps serving during the outage"
        finally:
            private.process.send_signal(signal.SIGCONT)

        assert send_files(daemon, [after]) == [0]
        stored = objects(private, name, "batches/")
        names = {key.rsplit("/", 1)[1] for key in stored}
        assert names == {first.name, after.name}, "exactly what was acknowledged is in S3"
        failures = daemon.log_messages("store failed")
        assert failures and failures[0]["status"] == "0xA700"
        # Stopped while its S3 still answers: the open batch's manifest is written, not retried against no server.
        assert daemon.stop() == 0
    finally:
        private.stop()


def test_missing_bucket_is_reported_at_start_and_stores_work_once_it_exists(
    s3_daemon: Callable[..., Daemon], moto: MotoServer, tmp_path: Path
) -> None:
    name = f"late-{uuid.uuid4().hex[:10]}"
    daemon = s3_daemon(DICOM_BUCKET=name)
    assert daemon.log_messages("S3 bucket is not usable; stores will be refused with 0xA700 until it is")
    instance = make_instance(tmp_path, pixel_bytes=4096)
    assert send_files(daemon, [instance]) == [0xA700]
    s3(moto).create_bucket(Bucket=name)
    assert send_files(daemon, [instance]) == [0]


def test_large_object_streams_with_flat_memory(
    s3_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    daemon = s3_daemon()
    large = make_instance(tmp_path, pixel_bytes=300 * 1024 * 1024)
    process = psutil.Process(daemon.process.pid)
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = subprocess.run(
            ["storescu", "-aec", "STORESCP", "127.0.0.1", str(daemon.port), str(large)],
            capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    listing = s3(moto).list_objects_v2(Bucket=bucket, Prefix="batches/")["Contents"]
    assert len(listing) == 1 and listing[0]["Size"] > 300 * 1024 * 1024
    growth = (peak - baseline) / 2**20
    assert growth < 120, f"daemon memory grew by {growth:.0f} MiB while receiving a 300 MiB object"


def test_batches_close_by_file_count(s3_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str,
                                     tmp_path: Path) -> None:  # fmt: skip
    daemon = s3_daemon(BATCH_MAX_FILES="3", BATCH_WINDOW_SECONDS="2")
    files = [make_instance(tmp_path, pixel_bytes=4096) for _ in range(7)]
    assert send_files(daemon, files) == [0] * 7
    found = wait_for(lambda: (m := manifests(moto, bucket)) and len(m) == 3 and m, 20, "three manifests")
    assert sorted((m["objectCount"], m["closedBy"]) for m in found) == [(1, "window"), (3, "files"), (3, "files")]
    assert len({m["batchId"] for m in found}) == 3


def test_batches_close_by_bytes(s3_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str,
                                tmp_path: Path) -> None:  # fmt: skip
    daemon = s3_daemon(BATCH_MAX_BYTES="1000000", BATCH_WINDOW_SECONDS="2")
    files = [make_instance(tmp_path, pixel_bytes=400 * 1024) for _ in range(5)]
    assert send_files(daemon, files) == [0] * 5
    found = wait_for(lambda: (m := manifests(moto, bucket)) and len(m) == 3 and m, 20, "three manifests")
    assert sorted((m["objectCount"], m["closedBy"]) for m in found) == [(1, "window"), (2, "bytes"), (2, "bytes")]
    assert all(m["byteCount"] <= 1_000_000 for m in found)


def test_sigterm_closes_the_open_batch(s3_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str,
                                       tmp_path: Path) -> None:  # fmt: skip
    daemon = s3_daemon(BATCH_WINDOW_SECONDS="3600")
    files = [make_instance(tmp_path, pixel_bytes=4096) for _ in range(2)]
    assert send_files(daemon, files) == [0, 0]
    assert manifests(moto, bucket) == []
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == 0
    (manifest,) = manifests(moto, bucket)
    assert manifest["closedBy"] == "shutdown" and manifest["objectCount"] == 2


def test_two_daemons_write_distinct_batches_to_one_bucket(
    s3_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    daemons = [s3_daemon(BATCH_WINDOW_SECONDS="1") for _ in range(2)]
    for index, daemon in enumerate(daemons):
        files = [make_instance(tmp_path, pixel_bytes=4096) for _ in range(3)]
        assert send_files(daemon, files, calling=f"CT0{index}") == [0, 0, 0]
    found = wait_for(lambda: (m := manifests(moto, bucket)) and len(m) == 2 and m, 20, "two manifests")
    assert len({m["batchId"] for m in found}) == 2
    assert sorted(m["callingAETitles"][0] for m in found) == ["CT00", "CT01"]
    keys = [o["key"] for m in found for o in m["objects"]]
    assert len(keys) == len(set(keys)) == 6
