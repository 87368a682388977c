"""The receivers under test, each started on a loopback port with an empty output directory, and what they stored.

Every receiver is a child process tree whose CPU time and memory the runner samples; ``received`` parses whatever
it wrote so the runner can check each object against what was sent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom

AE_TITLE = "BENCHSCP"
# The receiver the throughput goals are ratios against.
REFERENCE = "DCMTK storescp +B"
REPOSITORY = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` or one of its children holds a listening TCP socket on ``port``."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in tree:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections):
            return True
    return False


def _answers_echo(port: int) -> bool:
    result = subprocess.run(
        ["echoscu", "-to", "2", "-aec", AE_TITLE, "127.0.0.1", str(port)], capture_output=True, check=False
    )
    return result.returncode == 0


@dataclass
class Receiver:
    """One receiver kind: how to start it in ``workdir`` listening on ``port``, and where its files land."""

    name: str
    available: bool
    note: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    output: Path = field(default=Path(), repr=False)
    port: int = 0

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        self.output = workdir / "received"
        self.output.mkdir(parents=True)
        arguments, environment = self.command(workdir)
        log = open(workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            arguments, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **environment}, cwd=workdir
        )
        deadline = time.monotonic() + 60
        while not _answers_echo(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {(workdir / f'{self.name}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        # The port was free when chosen, not necessarily when the receiver bound it: an echo answered by whatever
        # else took it meanwhile would measure that process, or find every later connection refused.
        if not listens_on(self.process.pid, self.port):
            self.stop()
            raise RuntimeError(f"{self.name} does not listen on port {self.port}: another process answered there")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def files(self) -> Iterator[Path]:
        return (path for path in self.output.rglob("*") if path.is_file() and ".incoming" not in path.parts)

    def received(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 of the stored pixel data, for every object the receiver kept."""
        import hashlib

        found = {}
        for path in self.files():
            try:
                dataset = pydicom.dcmread(path)
            except (pydicom.errors.InvalidDicomError, OSError):
                continue  # an index or journal file of the receiver's own
            found[str(dataset.SOPInstanceUID)] = hashlib.sha256(dataset.PixelData).hexdigest()
        return found


class ThisDaemon(Receiver):
    _NOTE = "local store, fsync of every object and directory"

    def __init__(self, source: Path = REPOSITORY) -> None:
        super().__init__("this daemon", available=True, note=self._NOTE)
        self.source = source

    def start(self, workdir: Path) -> None:
        super().start(workdir)
        assert self.process is not None
        self.note = f"{self._NOTE}, {receiver_processes(self.process.pid)}"

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "scp"], daemon_environment(self.source, self.port, self.output)


def receiver_processes(pid: int) -> str:
    """How many receiver processes the daemon ``pid`` runs, as the report says it: the benchmark measures its
    default (RECEIVER_PROCESSES unset) unless the run's environment sets it. With several, the daemon is their
    parent and each is a child; alone, it receives itself."""
    count = len(psutil.Process(pid).children()) or 1
    return f"{count} receiver process" + ("es" if count > 1 else "")


def daemon_environment(source: Path, port: int, storage_dir: Path) -> dict[str, str]:
    """This daemon's settings in every benchmark run, whichever store it uses: the checkout at ``source``, on
    loopback, quiet logs."""
    return {
        "PYTHONPATH": str(source),
        "SCP_PORT": str(port),
        "BIND_ADDRESS": "127.0.0.1",
        "AE_TITLE": AE_TITLE,
        "STORAGE_DIR": str(storage_dir),
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }


class DcmtkStorescp(Receiver):
    """DCMTK's storescp in bit-preserving mode (``+B``): each data set written to its file exactly as it arrives,
    with no parsing or re-encoding, the closest C counterpart of this daemon's receive path and the reference of
    the throughput goals."""

    def __init__(self, fork: bool) -> None:
        super().__init__(
            "DCMTK storescp +B --fork" if fork else REFERENCE,
            available=shutil.which("storescp") is not None,
            note="bit-preserving, no fsync" + (", one process per association" if fork else ", one process"),
        )
        self.fork = fork

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        options = ["--fork"] if self.fork else []
        return ["storescp", *options, "+B", "-aet", AE_TITLE, "-od", str(self.output), "+uf", str(self.port)], {
            "TCP_NODELAY": "1"
        }


class Orthanc(Receiver):
    def __init__(self) -> None:
        super().__init__(
            "Orthanc", available=shutil.which("Orthanc") is not None, note="SQLite index, no fsync by default"
        )

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        configuration = {
            "Name": "bench",
            "StorageDirectory": str(self.output),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": AE_TITLE,
            "DicomPort": self.port,
            "HttpPort": free_port(),
            "RemoteAccessAllowed": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "StorageCompression": False,
            "ConcurrentJobs": 2,
            "DicomThreadsCount": 64,
        }
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(configuration))
        return ["Orthanc", str(path)], {"TCP_NODELAY": "1"}


class PynetdicomStorescp(Receiver):
    def __init__(self) -> None:
        super().__init__("pynetdicom storescp", available=True, note="pynetdicom's example app, no fsync")

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        # The app has no option for it, and its default of 10 associations would reject most of 16 and 64.
        return [sys.executable, "-c", _PYNETDICOM_STORESCP, str(self.port), "-aet", AE_TITLE,
                "-od", str(self.output)], {}  # fmt: skip


_PYNETDICOM_STORESCP = """
import sys
from pynetdicom import AE
from pynetdicom.apps.storescp.storescp import main
initialise = AE.__init__
def more_associations(self, *args, **kwargs):
    initialise(self, *args, **kwargs)
    self.maximum_associations = 100
AE.__init__ = more_associations
main(sys.argv[1:])
"""


def all_receivers(source: Path) -> list[Receiver]:
    return [ThisDaemon(source), DcmtkStorescp(fork=False), DcmtkStorescp(fork=True), Orthanc(), PynetdicomStorescp()]
