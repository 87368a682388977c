"""The daemon under attack, with short timeouts, and the checks every robustness case ends with.

Every case ends with :func:`assert_healthy`: the process is still running, its memory stayed bounded, nothing it
acknowledged is missing, and DCMTK's ``echoscu`` still gets an answer.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, start_daemon

# Short enough that the deadline cases finish in seconds, long enough for a loaded 2-core CI machine.
NETWORK_TIMEOUT = 3.0
ACSE_TIMEOUT = 2.0
ROBUST_SETTINGS = {
    "NETWORK_TIMEOUT": str(NETWORK_TIMEOUT),
    "ACSE_TIMEOUT": str(ACSE_TIMEOUT),
    "DIMSE_TIMEOUT": "10",
    "LOG_LEVEL": "INFO",
    "SHUTDOWN_GRACE_SECONDS": "2",
}
# Above an idle daemon's footprint (~45 MiB): one PDU of the default 1 MiB maximum per association and the
# interpreter's own slack. A PDU read at its declared length (up to 4 GiB) would blow through it.
RSS_GROWTH_LIMIT_MIB = 96


@dataclass(frozen=True)
class ProcessSample:
    rss_mib: float
    threads: int
    descriptors: int


def sample(pid: int) -> ProcessSample:
    """Memory, threads and open descriptors of ``pid`` from /proc."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return ProcessSample(
        rss_mib=int(status["VmRSS"].split()[0]) / 1024,
        threads=int(status["Threads"]),
        descriptors=len(list(Path(f"/proc/{pid}/fd").iterdir())),
    )


def echoscu_ok(daemon: Daemon) -> bool:
    result = subprocess.run(
        ["echoscu", "-to", "10", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port)],
        capture_output=True, text=True, timeout=30,
    )
    return result.returncode == 0


@dataclass
class Watched:
    """A daemon plus its footprint when it started, the instances it has acknowledged, and where this case's log
    lines begin (a daemon may serve several cases)."""

    daemon: Daemon
    baseline: ProcessSample
    acknowledged: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> pixel data sent
    log_start: int = 0  # parsed JSON lines before this case
    log_offset: int = 0  # bytes of the log file before this case

    def log_text(self) -> str:
        with open(self.daemon.log_path, "rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        return self.daemon.logs()[self.log_start :]

    def log_messages(self, message: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("message") == message]

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def assert_healthy(self) -> None:
        assert self.daemon.process.poll() is None, f"daemon exited; log:\n{self.daemon.log_path.read_text()[-3000:]}"
        now = sample(self.pid)
        assert now.rss_mib < self.baseline.rss_mib + RSS_GROWTH_LIMIT_MIB, (self.baseline, now)
        assert_acknowledged_present(self.daemon, self.acknowledged)
        assert echoscu_ok(self.daemon), "echoscu got no answer"


def assert_acknowledged_present(daemon: Daemon, acknowledged: dict[str, bytes]) -> None:
    """Every acknowledged instance is stored, parses, and carries the pixel data that was sent."""
    import pydicom

    stored = {path.stem: path for path in daemon.stored_files()}
    missing = sorted(set(acknowledged) - set(stored))
    assert not missing, f"{len(missing)} acknowledged instances missing, e.g. {missing[:3]}"
    for sop_instance_uid, pixels in acknowledged.items():
        dataset = pydicom.dcmread(stored[sop_instance_uid])
        assert dataset.SOPInstanceUID == sop_instance_uid
        assert dataset.PixelData == pixels, f"{sop_instance_uid}: stored pixel data differs from what was sent"


@pytest.fixture(scope="session", autouse=True)
def _dcmtk() -> None:
    missing = [tool for tool in ("echoscu", "storescu") if shutil.which(tool) is None]
    assert not missing, f"DCMTK is not installed ({', '.join(missing)}); `make test` installs it"


@pytest.fixture
def start_watched(tmp_path: Path) -> Iterator[Callable[..., Watched]]:
    """Start a daemon (ROBUST_SETTINGS overridden by keyword arguments) and check it when the case ends."""
    started: list[Watched] = []

    def start(storage_dir: Path | None = None, **settings: str) -> Watched:
        environment: dict[str, Any] = {**ROBUST_SETTINGS, **settings}
        daemon = start_daemon(tmp_path, storage_dir=storage_dir, **environment)
        watched = Watched(daemon, sample(daemon.process.pid))
        started.append(watched)
        return watched

    yield start
    for watched in started:
        watched.daemon.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """One daemon for a module's cases: starting one per case would cost most of the suite's time."""
    environment: dict[str, Any] = ROBUST_SETTINGS
    daemon = start_daemon(tmp_path_factory.mktemp("daemon"), **environment)
    yield Watched(daemon, sample(daemon.process.pid))
    daemon.stop()


@pytest.fixture
def watched(shared_daemon: Watched) -> Iterator[Watched]:
    """The module's daemon, checked after the case: still up, memory bounded, nothing lost, echoscu answered."""
    case = Watched(shared_daemon.daemon, shared_daemon.baseline, shared_daemon.acknowledged,
                   log_start=len(shared_daemon.daemon.logs()),
                   log_offset=shared_daemon.daemon.log_path.stat().st_size)
    yield case
    case.assert_healthy()
