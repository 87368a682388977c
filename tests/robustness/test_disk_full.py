"""A disk that fills part-way through a fragment: every Success is for an intact object, the rest are 0xA700.

A real 16 MiB tmpfs holds the storage directory (and so the receive spool); a filler file leaves exactly the room
each case wants, so the filesystem runs out inside a fragment at several offsets of a 2.6 MB object, in local mode
and, for the spool, in S3 mode against moto_server. Once the room is back, the next store succeeds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.robustness.conftest import Watched
from tests.robustness.test_data import encode
from tests.robustness.wire import Peer
from tests.support.corpus import make_instance, read
from tests.support.moto import MotoServer
from tests.support.s3 import dataset_bytes, new_bucket, objects
from tests.support.tmpfs import mounted_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

OBJECT_PIXEL_BYTES = 2_600_000
# Not a divisor of anything the daemon writes: the disk fills inside a fragment, not between two.
FRAGMENT = 61_447
# Bytes of the data set that do not fit: from the Part-10 header (the whole data set) down to a few hundred.
SHORTFALLS = ["all", 700_001, 250_013, 61_000, 9_001, 300]
PAGE = 4096  # tmpfs allocates whole pages
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "tmpfs", "16m") as mount_point:
        yield mount_point


class Filler:
    """A file that takes all the room of its filesystem but ``free`` bytes (rounded to pages)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def leave(self, free: int) -> None:
        stats = os.statvfs(self.path)
        available = stats.f_bavail * stats.f_frsize
        size = os.fstat(self._descriptor).st_size + available - free
        os.ftruncate(self._descriptor, 0)  # shrinking first: growing then allocates exactly what is asked
        if size > 0:
            os.posix_fallocate(self._descriptor, 0, size)
        stats = os.statvfs(self.path)
        left = stats.f_bavail * stats.f_frsize
        assert abs(left - free) <= 2 * PAGE, f"wanted {free} bytes free, have {left}"

    def remove(self) -> None:
        os.close(self._descriptor)
        self.path.unlink()


@dataclass
class Sent:
    sop_instance_uid: str
    data_set: bytes


def fresh_object(workdir: Path, pixel_bytes: int = OBJECT_PIXEL_BYTES) -> Sent:
    dataset = read(make_instance(workdir, pixel_bytes=pixel_bytes))
    del dataset.file_meta
    return Sent(str(dataset.SOPInstanceUID), encode(dataset))


def run_disk_full_cases(watched: Watched, workdir: Path, mount_point: Path,
                        stored_data_sets: Callable[[], dict[str, bytes]]) -> None:  # fmt: skip
    """Each shortfall on one association; every answer checked against what the store then holds."""
    filler = Filler(mount_point / "filler")
    answers: dict[str, int] = {}
    sent: dict[str, bytes] = {}
    with Peer(watched.port, timeout=30) as peer:
        peer.associate()
        for shortfall in SHORTFALLS:
            item = fresh_object(workdir)
            room = 0 if shortfall == "all" else len(item.data_set) - int(shortfall)
            filler.leave(room)
            status = peer.store(item.sop_instance_uid, item.data_set, fragment=FRAGMENT)
            assert status in (SUCCESS, OUT_OF_RESOURCES), f"shortfall {shortfall}: status {status}"
            answers[item.sop_instance_uid], sent[item.sop_instance_uid] = status, item.data_set
            assert watched.daemon.spool_files() == [], f"shortfall {shortfall}: a receive file was left behind"
        filler.remove()
        # The room is back: the same association stores again.
        after = fresh_object(workdir)
        assert peer.store(after.sop_instance_uid, after.data_set, fragment=FRAGMENT) == SUCCESS
        answers[after.sop_instance_uid], sent[after.sop_instance_uid] = SUCCESS, after.data_set
        peer.release()
    refused = [uid for uid, status in answers.items() if status == OUT_OF_RESOURCES]
    # Every case but the last few hundred bytes cannot fit even with page rounding; they must all be refused.
    assert len(refused) >= len(SHORTFALLS) - 1, answers
    stored = stored_data_sets()
    acknowledged = {uid for uid, status in answers.items() if status == SUCCESS}
    assert set(stored) == acknowledged, "what is stored is exactly what was acknowledged"
    for uid in acknowledged:
        assert stored[uid] == sent[uid], f"{uid}: the stored data set is not byte-identical to what was sent"
    failures = watched.log_messages("store failed")
    assert len(failures) == len(refused)
    assert all(entry["status"] == "0xA700" for entry in failures)
    assert any("No space left on device" in entry["reason"] for entry in failures), failures


def test_local_store_acknowledges_only_whole_objects_when_the_disk_fills(
    start_watched: Callable[..., Watched], tmpfs: Path, tmp_path: Path
) -> None:
    watched = start_watched(storage_dir=tmpfs / "storage", DIMSE_TIMEOUT="30")

    def stored_data_sets() -> dict[str, bytes]:
        return {path.stem: dataset_bytes(path.read_bytes()) for path in watched.daemon.stored_files()}

    run_disk_full_cases(watched, tmp_path, tmpfs, stored_data_sets)
    watched.assert_healthy()


def test_s3_spool_acknowledges_only_whole_objects_when_the_disk_fills(
    start_watched: Callable[..., Watched], tmpfs: Path, tmp_path: Path, moto: MotoServer
) -> None:
    bucket = new_bucket(moto, "diskfull")
    watched = start_watched(storage_dir=tmpfs / "spool", DICOM_BUCKET=bucket, DIMSE_TIMEOUT="30", **moto.env())

    def stored_data_sets() -> dict[str, bytes]:
        bodies = objects(moto, bucket, "batches/")
        return {key.rsplit("/", 1)[1].removesuffix(".dcm"): dataset_bytes(body) for key, body in bodies.items()}

    run_disk_full_cases(watched, tmp_path, tmpfs, stored_data_sets)
    watched.assert_healthy()
