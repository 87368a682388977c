"""The real daemon as a child process on a free loopback port, and a pynetdicom SCU to talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config
from pynetdicom.association import Association

from tests.support.corpus import read
from tests.support.waits import free_port, wait_for

VERIFICATION = "1.2.840.10008.1.1"

# Every daemon a test starts, so that none outlives its test even when the test fails before stopping it.
STARTED: list[Daemon] = []


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    port: int
    storage_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ae_title: str = "STORESCP"

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def log_messages(self, message: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("message") == message]

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage_dir.rglob("*.dcm") if ".incoming" not in p.parts)

    def spool_files(self) -> list[Path]:
        spool = self.storage_dir / ".incoming"
        return sorted(spool.iterdir()) if spool.exists() else []

    def associate(
        self, calling: str = "TESTSCU", called: str | None = None, contexts: list[Any] | None = None, **ae_settings: Any
    ) -> Association:
        ae = AE(ae_title=calling)
        for name, value in ae_settings.items():
            setattr(ae, name, value)
        for context in contexts or [VERIFICATION]:
            if isinstance(context, tuple):
                ae.add_requested_context(*context)
            else:
                ae.add_requested_context(context)
        return ae.associate("127.0.0.1", self.port, ae_title=called or self.ae_title)

    def echo_ok(self, rejection_counts: bool = False) -> bool:
        """A C-ECHO succeeds; with ``rejection_counts``, an A-ASSOCIATE-RJ is an answer too."""
        association = self.associate()
        if association.is_rejected:
            return rejection_counts
        if not association.is_established:
            return False
        try:
            status = association.send_c_echo()
            return bool(status) and status.Status == 0
        finally:
            association.release()

    def answers_dicom(self) -> bool:
        """Up: it accepts and echoes, or it rejects (an AE title policy may refuse the test's own title)."""
        return self.echo_ok(rejection_counts=True)

    def receiving_pids(self) -> list[int]:
        """The processes that receive: each receiver process's when the daemon runs several (once all have
        started), else the daemon's own. A tracer attached to the daemon alone would miss the receivers' calls."""
        (listening,) = self.log_messages("listening")
        count = int(listening["receiver_processes"])
        if count == 1:
            return [self.process.pid]
        started = wait_for(
            lambda: len(lines := self.log_messages("receiver started")) >= count and lines, 30, "every receiver"
        )
        return [int(entry["pid"]) for entry in started]

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


def start_daemon(
    workdir: Path,
    storage_dir: Path | None = None,
    port: int | None = None,
    ready: bool = True,
    **settings: str | None,
) -> Daemon:
    """Start `python -m scp` with the given settings (environment variables) and wait for a C-ECHO.

    The daemon inherits this process's environment but AWS credentials; a setting given as None is unset.
    """
    storage_dir = storage_dir or workdir / "storage"
    port = port or free_port()
    log_path = workdir / f"daemon-{port}-{os.getpid()}-{len(list(workdir.glob('daemon-*.log')))}.log"
    given: dict[str, str | None] = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "SCP_PORT": str(port),
        "BIND_ADDRESS": "127.0.0.1",
        "STORAGE_DIR": str(storage_dir),
        "SHUTDOWN_GRACE_SECONDS": "20",
        # One receiver process unless the run or the test asks for more: what a test sees must not follow the
        # machine's CPUs. The daemon's own default (one per usable CPU) is started by a test that unsets it
        # (tests/integration/test_receiver_processes.py).
        "RECEIVER_PROCESSES": os.environ.get("RECEIVER_PROCESSES", "1"),
        **settings,
    }
    env = {name: value for name, value in given.items() if value is not None}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "scp"], stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(process, port, storage_dir, log_path, env, env.get("AE_TITLE", "STORESCP"))
    STARTED.append(daemon)
    if ready:
        try:
            wait_for(lambda: process.poll() is None and daemon.answers_dicom(), 30, "the daemon to answer C-ECHO")
        except AssertionError:
            daemon.stop()
            raise AssertionError(f"daemon did not start; log:\n{log_path.read_text()}") from None
    return daemon


def send_files(daemon: Daemon, files: list[Path], calling: str = "CT01") -> list[int]:
    """Send each file's data set bytes exactly as they are in the file (pynetdicom's chunked send), on one
    association; returns the C-STORE statuses."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    contexts = sorted({(str(read(f).SOPClassUID), str(read(f).file_meta.TransferSyntaxUID)) for f in files})
    association = daemon.associate(calling=calling, contexts=[(sop, [ts]) for sop, ts in contexts])
    assert association.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [association.send_c_store(f).Status for f in files]
    finally:
        association.release()
