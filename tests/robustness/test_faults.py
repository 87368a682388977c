"""Faults: the daemon killed mid-transfer loses nothing it acknowledged; a full disk is answered with 0xA700."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.robustness.conftest import Watched, assert_acknowledged_present
from tests.robustness.test_data import encode
from tests.robustness.wire import Peer
from tests.support.corpus import make_instance, read
from tests.support.daemon import start_daemon
from tests.support.tmpfs import mounted_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KILL_ROUNDS = 3
SENDERS = 4
FILES_PER_SENDER = 25
OBJECT_BYTES = 256 * 1024

_SENDING = re.compile(r"Sending file: (\S+)")
_SUCCESS = "Received Store Response (Success)"


def acknowledged_by_storescu(output: str) -> list[Path]:
    """Files storescu -v reports a success response for (each response follows its "Sending file" line)."""
    acknowledged = []
    current: Path | None = None
    for line in output.splitlines():
        if match := _SENDING.search(line):
            current = Path(match.group(1))
        elif _SUCCESS in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    directory = tmp_path_factory.mktemp("corpus")
    return [
        [make_instance(directory, pixel_bytes=OBJECT_BYTES) for _ in range(FILES_PER_SENDER)] for _ in range(SENDERS)
    ]


def test_sigkill_during_a_multi_association_send_loses_nothing_acknowledged(
    tmp_path: Path, corpus: list[list[Path]]
) -> None:
    storage = tmp_path / "storage"
    chance = random.Random(20240611)
    acknowledged: dict[str, bytes] = {}
    for round_number in range(KILL_ROUNDS):
        daemon = start_daemon(tmp_path, storage_dir=storage, NETWORK_TIMEOUT="5", ACSE_TIMEOUT="5")
        senders = [
            subprocess.Popen(
                ["storescu", "-v", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port), *map(str, files)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
            )
            for files in corpus
        ]  # fmt: skip
        time.sleep(chance.uniform(0.2, 1.5))
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=10)
        for sender in senders:
            output, _ = sender.communicate(timeout=60)
            for path in acknowledged_by_storescu(output):
                acknowledged[read(path).SOPInstanceUID] = read(path).PixelData
        # Restarting on the same storage: the spool is swept, every acknowledged object is there and intact.
        restarted = start_daemon(tmp_path, storage_dir=storage)
        try:
            assert restarted.spool_files() == []
            assert_acknowledged_present(restarted, acknowledged)
            assert restarted.echo_ok()
        finally:
            restarted.stop()
        assert acknowledged or round_number < KILL_ROUNDS - 1 or pytest.fail("no store was acknowledged in any round")
    assert 0 < len(acknowledged) < SENDERS * FILES_PER_SENDER * KILL_ROUNDS


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "small", "3m") as mount_point:
        yield mount_point


@pytest.mark.parametrize("object_bytes", [5 * 1024 * 1024], ids=["receive-fills"])
def test_disk_full_is_a700_leaves_no_temporary_file_and_the_next_store_works(
    start_watched: Callable[..., Watched], small_filesystem: Path, tmp_path: Path, object_bytes: int
) -> None:
    watched = start_watched(storage_dir=small_filesystem / "storage")
    big = read(make_instance(tmp_path, pixel_bytes=object_bytes))
    small = read(make_instance(tmp_path, pixel_bytes=4096))
    with Peer(watched.port) as peer:
        peer.associate()
        assert peer.store(big.SOPInstanceUID, encode(_without_meta(big))) == 0xA700
        assert watched.daemon.spool_files() == []
        assert watched.daemon.stored_files() == []
        # The same association goes on: the next object fits and is stored.
        assert peer.store(small.SOPInstanceUID, encode(_without_meta(small))) == 0x0000
        peer.release()
    watched.acknowledged[small.SOPInstanceUID] = small.PixelData
    assert [p.stem for p in watched.daemon.stored_files()] == [small.SOPInstanceUID]
    assert watched.log_messages("store failed")
    watched.assert_healthy()


def _without_meta(dataset: Dataset) -> Dataset:
    del dataset.file_meta
    return dataset
