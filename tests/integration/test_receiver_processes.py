"""Two receiver processes on one port: the association limit holds across them, SIGTERM drains both with every
acknowledged object stored, a killed receiver is replaced and its slots come back, ActiveAssociations is the
task's count, and receivers starting at the same instant each open the database they share. Unset, the daemon
runs one receiver per usable CPU, and Storage Commitment answers across them."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import _config

from scp.commitment import ledger
from scp.cpus import usable_cpus
from scp.metrics import SERVICE
from tests.operations.emf import data_from_lines
from tests.support.commitment import Modality, action_information, instances, references
from tests.support.corpus import comparable, make_instance, read
from tests.support.daemon import Daemon, start_daemon
from tests.support.waits import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
LIMIT = 4
ATTEMPTS_BEYOND_THE_LIMIT = 6


def two_receivers(tmp_path: Path, **settings: str) -> Daemon:
    daemon = start_daemon(tmp_path, RECEIVER_PROCESSES="2", **settings)
    try:
        wait_for(lambda: len(daemon.log_messages("receiver started")) == 2, 30, "both receivers to start")
    except AssertionError as error:
        raise AssertionError(f"{error}; log:\n{daemon.log_path.read_text()}") from None
    return daemon


def receivers_of(daemon: Daemon, calling: str) -> list[int]:
    """The receiver process that accepted each of ``calling``'s associations, in order."""
    accepted = daemon.log_messages("association accepted")
    return [entry["receiver"] for entry in accepted if entry["calling_ae"] == calling]


def accepted_by(daemon: Daemon, calling: str, associations: int) -> list[int]:
    """Once logged (just after the peer has its answer), which receiver accepted each association."""
    return wait_for(lambda: len(r := receivers_of(daemon, calling)) == associations and r, 10, "the log lines")


def pid_of(daemon: Daemon, receiver: int) -> int:
    started = [entry for entry in daemon.log_messages("receiver started") if entry["receiver"] == receiver]
    return int(started[-1]["pid"])


def healthcheck(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SCP_PORT": str(daemon.port), "BIND_ADDRESS": "127.0.0.1"}
    return subprocess.run(
        [sys.executable, "-m", "scp", "healthcheck"], capture_output=True, text=True, timeout=30, env=environment
    )


def limit_rejections(daemon: Daemon) -> int:
    rejected = daemon.log_messages("association rejected")
    return sum(1 for entry in rejected if entry["calling_ae"] == "EXTRA" and entry["code"] == [2, 3, 2])


def assert_rejected(daemon: Daemon) -> None:
    """One more association beyond the limit is not established, and the daemon rejected it (local limit exceeded).

    The daemon's log line is what proves the rejection: pynetdicom as the requestor now and then reports an
    A-ASSOCIATE-RJ it received as an abort, when its reactor sees the connection end before it hands on the PDU.
    """
    before = limit_rejections(daemon)
    association = daemon.associate(calling="EXTRA")
    assert not association.is_established
    wait_for(lambda: limit_rejections(daemon) == before + 1, 10, "the daemon's rejection")


def established(association: Any) -> Any:
    return association if association.is_established else None


def test_the_association_limit_holds_across_both_processes(tmp_path: Path) -> None:
    daemon = two_receivers(tmp_path, MAXIMUM_ASSOCIATIONS=str(LIMIT))
    held = [daemon.associate(calling="HOLDER") for _ in range(LIMIT)]
    try:
        assert all(association.is_established for association in held)
        # Each receiver holds some: a limit counted per process would let either of them admit more.
        assert sorted(accepted_by(daemon, "HOLDER", LIMIT)) == [0, 0, 1, 1]
        for _ in range(ATTEMPTS_BEYOND_THE_LIMIT):
            assert_rejected(daemon)
        rejected = [e for e in daemon.log_messages("association rejected") if e["calling_ae"] == "EXTRA"]
        assert len(rejected) == ATTEMPTS_BEYOND_THE_LIMIT
        assert all(entry["code"] == [2, 3, 2] for entry in rejected), "local limit exceeded"
        assert {entry["receiver"] for entry in rejected} == {0, 1}
        # The container's health check still gets an answer from a task at its limit.
        result = healthcheck(daemon)
        assert result.returncode == 0, result.stdout
        # A slot given back in one process is free for both.
        held.pop().release()
        # Its thread gives the slot back just after the release: the next association is admitted within moments.
        again = wait_for(lambda: established(daemon.associate(calling="AGAIN")), 10, "the slot to be free again")
        held.append(again)
        assert_rejected(daemon)
    finally:
        for association in held:
            association.release()
    assert daemon.stop() == 0
    data = data_from_lines(daemon.log_path.read_text().splitlines())
    active = [value for d in data if d.name == "ActiveAssociations" for value in d.values]
    # Each process writes its own lines; the gauge in them is the task's peak, not the process's own.
    assert max(active) == LIMIT
    accepted = sum(sum(d.values) for d in data if d.name == "AssociationsAccepted" and d.dimensions == (
        ("service", SERVICE),))  # fmt: skip
    assert accepted == len(daemon.log_messages("association accepted"))


class PacedSender(threading.Thread):
    """One association sending its files with a pause between them, so that it is still sending at SIGTERM."""

    def __init__(self, daemon: Daemon, files: list[Path], pause: float) -> None:
        super().__init__(daemon=True)
        self._daemon, self._files, self._pause = daemon, files, pause
        self.statuses: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            _config.STORE_SEND_CHUNKED_DATASET = True
            contexts: list[Any] = [(CT_IMAGE_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN])]
            association = self._daemon.associate(calling="PACED", contexts=contexts)
            assert association.is_established
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for path in self._files:
                        self.statuses.append(association.send_c_store(path).Status)
                        time.sleep(self._pause)
            finally:
                association.release()
        except Exception as error:  # reported by the test, which joins the thread
            self.error = error


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_both_processes_and_every_acknowledged_object_is_stored(tmp_path: Path) -> None:
    daemon = two_receivers(tmp_path, SHUTDOWN_GRACE_SECONDS="30")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paced = [[make_instance(corpus, pixel_bytes=128 * 1024) for _ in range(12)] for _ in range(4)]
    bulk = [[make_instance(corpus, pixel_bytes=512 * 1024) for _ in range(20)] for _ in range(4)]
    senders = [PacedSender(daemon, files, pause=0.15) for files in paced]
    for sender in senders:
        sender.start()
    command = ["storescu", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port)]
    storescu = [
        subprocess.Popen([*command, *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for files in bulk
    ]
    # Every peer associated before SIGTERM: one connecting after it is refused, rightly, and sends nothing.
    peers = len(senders) + len(storescu)
    wait_for(lambda: len(receivers_of(daemon, "PACED") + receivers_of(daemon, "STORESCU")) == peers, 30, "peers")
    daemon.signal(signal.SIGTERM)
    # Stopped accepting at once, as a single process does: no connection waits in the backlog for the drain.
    wait_for(lambda: refused(daemon.port), 10, "new connections to be refused")
    assert any(sender.is_alive() for sender in senders), "the drain was to be seen with associations in flight"
    for sender in senders:
        sender.join(timeout=60)
    outputs = [process.communicate(timeout=60)[0] for process in storescu]
    assert daemon.wait(timeout=60) == 0
    assert [sender.error for sender in senders] == [None] * len(senders)
    for sender, files in zip(senders, paced, strict=True):
        assert sender.statuses == [0] * len(files), "the drain let each paced association finish"
    assert [process.returncode for process in storescu] == [0] * len(storescu), outputs
    # Both receivers served, and drained, the associations in flight at SIGTERM.
    assert set(receivers_of(daemon, "PACED") + receivers_of(daemon, "STORESCU")) == {0, 1}
    (stopped,) = daemon.log_messages("stopped")
    assert stopped["associations_aborted"] == 0 and stopped["receiver_exit_codes"] == [0, 0]
    assert len(daemon.log_messages("receiver stopped")) == 2
    sent = [path for files in paced + bulk for path in files]
    stored = {path.name: path for path in daemon.stored_files()}
    assert sorted(stored) == sorted(path.name for path in sent)
    for path in sent:
        assert comparable(read(stored[path.name])) == comparable(read(path))
    assert daemon.spool_files() == []


def test_a_killed_receiver_is_replaced_and_its_slots_come_back(tmp_path: Path) -> None:
    daemon = two_receivers(tmp_path, MAXIMUM_ASSOCIATIONS="2")
    first, second = daemon.associate(calling="HOLDER"), daemon.associate(calling="HOLDER")
    assert first.is_established and second.is_established
    assert sorted(accepted_by(daemon, "HOLDER", 2)) == [0, 1]
    os.kill(pid_of(daemon, 1), signal.SIGKILL)
    (killed,) = wait_for(lambda: daemon.log_messages("receiver process killed; starting another"), 10, "the kill")
    assert killed["receiver"] == 1 and killed["signal"] == "SIGKILL" and killed["level"] == "ERROR"
    wait_for(lambda: len(daemon.log_messages("receiver started")) == 3, 30, "a new receiver 1")
    # The association the killed process held is gone, and so is its slot: one more fits, not two.
    wait_for(lambda: first.is_aborted or second.is_aborted, 10, "the killed receiver's association to end")
    survivor = first if first.is_established else second
    replacement = daemon.associate(calling="REPLACED")
    try:
        assert replacement.is_established
        assert_rejected(daemon)
        assert survivor.send_c_echo().Status == 0
    finally:
        replacement.release()
        survivor.release()
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_unset_one_receiver_per_usable_cpu_and_commitment_answers_across_them(tmp_path: Path) -> None:
    """The daemon's default, not the one process the other tests pin: as many receivers as this machine gives the
    test (2 on the 2-core machine the suite is written on, 1 where it may use one CPU). Instances stored through
    one receiver are committed on an association another one accepted, from the ledger they share."""
    expected = min(usable_cpus(), 64)
    daemon = start_daemon(tmp_path, RECEIVER_PROCESSES=None, COMMITMENT_TIMEOUT="20")
    assert "RECEIVER_PROCESSES" not in daemon.env
    (listening,) = daemon.log_messages("listening")
    assert listening["receiver_processes"] == expected
    if expected > 1:
        wait_for(lambda: len(daemon.log_messages("receiver started")) == expected, 30, "every receiver to start")
    else:
        assert daemon.log_messages("receiver started") == []
    modality = Modality(daemon)
    sent = instances(tmp_path, 3)
    storing = modality.associate()
    asking = modality.associate()  # while the first is held, the least busy receiver takes it
    try:
        if expected > 1:
            storing_receiver, asking_receiver = accepted_by(daemon, "MODALITY", 2)
            assert storing_receiver != asking_receiver, "the two associations were to be in two receivers"
        else:  # a single process: its lines name no receiver
            accepted = wait_for(lambda: daemon.log_messages("association accepted"), 10, "the log lines")
            assert all("receiver" not in entry for entry in accepted)
        modality.store(storing, sent)
        information = action_information(references(sent))
        assert modality.request(asking, information) == 0x0000
        report = modality.reports.get(timeout=30)
        wait_for(lambda: daemon.log_messages("commitment reported"), 10, "the report's response")
    finally:
        storing.release()
        asking.release()
    assert report.event_type == 1 and report.transaction_uid == information.TransactionUID
    assert sorted(report.committed) == sorted(references(sent)) and report.failed == []
    result = healthcheck(daemon)
    assert result.returncode == 0, result.stdout
    assert daemon.stop() == 0
    (stopped,) = daemon.log_messages("stopped")
    assert stopped["associations_aborted"] == 0
    assert stopped.get("receiver_exit_codes", [0]) == [0] * expected
    # Each receiver writes its own metrics lines (at the latest when it stops), each naming it as its log lines do.
    named = {line.get("receiver") for line in daemon.log_messages("metrics")}
    assert named == (set(range(expected)) if expected > 1 else {None})
    assert sorted(path.name for path in daemon.stored_files()) == sorted(path.name for path in sent)


def _open_ledger_at(database: Path, receiver: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    try:
        ledger.Ledger(database, receiver).close()
    except sqlite3.OperationalError:
        os._exit(1)
    os._exit(0)


def test_receivers_starting_at_the_same_instant_each_open_the_ledger_created_before_them(tmp_path: Path) -> None:
    """Two processes switching one new database to WAL at the same instant: about one time in six one of them
    fails at once with "database is locked" (its busy timeout does not apply there), and that receiver cannot
    start. The daemon creates the ledger before it forks the receivers; so does each attempt here."""
    forked = multiprocessing.get_context("fork")
    for attempt in range(40):
        database = ledger.database_path(tmp_path / str(attempt))
        ledger.create(database)
        start = forked.Barrier(2)
        receivers = [forked.Process(target=_open_ledger_at, args=(database, n, start)) for n in range(2)]
        for receiver in receivers:
            receiver.start()
        for receiver in receivers:
            receiver.join(timeout=30)
        assert [receiver.exitcode for receiver in receivers] == [0, 0], f"attempt {attempt}"
