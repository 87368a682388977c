"""Nothing acknowledged is lost, nothing torn is visible: kills, shutdowns and storage failures."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.corpus import comparable, make_instance, read
from tests.support.daemon import Daemon, start_daemon
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

LARGE = 160 * 1024 * 1024


def storescu_process(daemon: Daemon, *files: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["storescu", "-v", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )


def receiving(daemon: Daemon) -> bool:
    return any(path.suffix == ".rx" and path.stat().st_size > 0 for path in daemon.spool_files())


@pytest.fixture(scope="module")
def large_instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_instance(tmp_path_factory.mktemp("large"), pixel_bytes=LARGE)


def test_sigkill_mid_transfer_leaves_no_torn_object_and_restart_cleans_up(tmp_path: Path, large_instance: Path) -> None:
    daemon = start_daemon(tmp_path)
    acknowledged = [make_instance(tmp_path, pixel_bytes=64 * 1024) for _ in range(3)]
    assert storescu_process(daemon, *acknowledged).wait(timeout=60) == 0

    sender = storescu_process(daemon, large_instance)
    wait_for(lambda: receiving(daemon), 30, "the large object to be arriving")
    daemon.process.kill()
    daemon.process.wait(timeout=10)
    sender.wait(timeout=30)

    # Under the final names: exactly the three acknowledged objects, each complete.
    stored = daemon.stored_files()
    assert sorted(p.name for p in stored) == sorted(p.name for p in acknowledged)
    for path in acknowledged:
        (copy,) = [p for p in stored if p.name == path.name]
        assert comparable(read(copy)) == comparable(read(path))
    assert daemon.spool_files(), "the interrupted receive is still in the spool"

    restarted = start_daemon(tmp_path, storage_dir=daemon.storage_dir)
    try:
        assert restarted.spool_files() == []
        (listening,) = restarted.log_messages("listening")
        assert listening["spool_files_removed"] >= 1
        assert len(restarted.stored_files()) == 3
    finally:
        restarted.stop()


def test_sigterm_lets_the_transfer_in_flight_finish_and_refuses_new_ones(tmp_path: Path, large_instance: Path) -> None:
    daemon = start_daemon(tmp_path, SHUTDOWN_GRACE_SECONDS="60")
    sender = storescu_process(daemon, large_instance)
    wait_for(lambda: receiving(daemon), 30, "the large object to be arriving")
    daemon.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 5, "the listening socket to close")
    output, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, output
    assert daemon.wait(timeout=60) == 0
    (stored,) = daemon.stored_files()
    assert stored.stat().st_size > LARGE
    assert daemon.log_messages("stopped")[0]["associations_aborted"] == 0


def test_sigterm_aborts_what_outlives_the_grace_period(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, SHUTDOWN_GRACE_SECONDS="1")
    idle = daemon.associate()
    assert idle.is_established
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert time.monotonic() - started < 10
    assert daemon.log_messages("stopped")[0]["associations_aborted"] == 1
    wait_for(lambda: idle.is_aborted, 10, "the client to see the abort")


def test_storage_failure_answers_out_of_resources_and_the_daemon_serves_on(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path)
    try:
        instance = make_instance(tmp_path, pixel_bytes=4096)
        study_uid = read(instance).StudyInstanceUID
        daemon.storage_dir.joinpath(study_uid).write_text("not a directory")  # the study folder cannot be made

        result = storescu_process(daemon, instance)
        output, _ = result.communicate(timeout=60)
        assert "Refused: OutOfResources" in output, output
        (line,) = daemon.log_messages("store failed")
        assert line["status"] == "0xA700"
        assert daemon.spool_files() == []

        os.unlink(daemon.storage_dir / study_uid)
        assert storescu_process(daemon, instance).wait(timeout=60) == 0
        assert len(daemon.stored_files()) == 1
    finally:
        daemon.stop()


_FSYNC = re.compile(r"fsync\(\d+<([^>]*)>\) = 0")


def traced(daemon: Daemon) -> list[str]:
    """strace's options attaching to every process that receives (each receiver when there are several)."""
    return [option for pid in daemon.receiving_pids() for option in ("-p", str(pid))]


def test_directories_another_association_just_created_are_durable_before_success(tmp_path: Path) -> None:
    """The daemon is traced while it stores into a study and series directory that exist but, as far as it knows,
    are not yet durable (another association may have made them a moment ago): it fsyncs the parent of each before
    it answers, not only the series directory that receives the file."""
    assert shutil.which("strace"), "strace is not installed; `make test` installs it"
    daemon = start_daemon(tmp_path)
    trace = tmp_path / "fsync.trace"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-e", "trace=fsync", "-o", str(trace), *traced(daemon)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def warm_up_traced() -> bool:
            """One store in a study of its own: once its fsyncs show in the trace, the tracer is attached."""
            warm_up = make_instance(tmp_path, pixel_bytes=1024)
            assert storescu_process(daemon, warm_up).wait(timeout=60) == 0
            return str(read(warm_up).SeriesInstanceUID) in trace.read_text()

        wait_for(warm_up_traced, 30, "strace to attach to the daemon")
        traced_before = len(trace.read_text())
        instance = make_instance(tmp_path, pixel_bytes=4096)
        dataset = read(instance)
        root = daemon.storage_dir.resolve()
        study = root / dataset.StudyInstanceUID
        series = study / dataset.SeriesInstanceUID
        series.mkdir(parents=True)  # as another association does, an instant before it fsyncs their parents
        assert storescu_process(daemon, instance).wait(timeout=60) == 0
        synced = [Path(path) for path in _FSYNC.findall(trace.read_text()[traced_before:])]
        # The study's entry in the root, the series' entry in the study, the file's entry in the series.
        assert [path for path in synced if path in (root, study, series)] == [root, study, series], synced
        assert (series / f"{dataset.SOPInstanceUID}.dcm").exists()
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
        daemon.stop()


_CALL = re.compile(r"^(\d+) +([\d.]+) (\w+)\((.*?)(?:\) += (-?\d+).*<([\d.]+)>| <unfinished \.\.\.>)$")
_RESUMED = re.compile(r"^(\d+) +([\d.]+) <\.\.\. (\w+) resumed>.*\) += (-?\d+).*<([\d.]+)>$")


@dataclass
class Call:
    thread: int
    name: str
    arguments: str
    began: float
    ended: float = 0.0
    result: int = 0


def traced_calls(trace: str) -> list[Call]:
    """The system calls of an ``strace -f -ttt -T -y`` trace, with when each began and ended, however interleaved."""
    calls: list[Call] = []
    unfinished: dict[tuple[int, str], Call] = {}
    for line in trace.splitlines():
        if match := _CALL.match(line):
            thread, began, name, arguments, result, took = match.groups()
            call = Call(int(thread), name, arguments, float(began))
            if result is None:
                unfinished[(call.thread, name)] = call
            else:
                call.ended, call.result = call.began + float(took), int(result)
            calls.append(call)
        elif match := _RESUMED.match(line):
            thread, ended, name, result, _ = match.groups()
            call = unfinished.pop((int(thread), name))
            call.ended, call.result = float(ended), int(result)
    return calls


def test_concurrent_stores_into_one_series_are_each_answered_after_their_data_and_rename_are_flushed(
    tmp_path: Path,
) -> None:
    """Eight associations store into one series at once, traced: for every object, writeback and fdatasync of its
    spool file, then its rename, then an fsync of the series directory that *began* after that rename and ended
    before the C-STORE response went out, whichever association's thread ran it."""
    assert shutil.which("strace"), "strace is not installed; `make test` installs it"
    daemon = start_daemon(tmp_path)
    study, series = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.1.1"
    batches = [
        [make_instance(tmp_path, pixel_bytes=1024 * 1024, study_uid=study, series_uid=series) for _ in range(4)]
        for _ in range(8)
    ]
    assert storescu_process(daemon, batches[0][0]).wait(timeout=60) == 0  # the directories exist and are durable
    trace = tmp_path / "store.trace"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-ttt", "-T", "-y", "-e", "trace=sync_file_range,fdatasync,rename,fsync,sendto",
         "-o", str(trace), *traced(daemon)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def attached() -> bool:
            assert storescu_process(daemon, make_instance(tmp_path, pixel_bytes=1024)).wait(timeout=60) == 0
            return trace.exists() and "sendto" in trace.read_text()

        wait_for(attached, 30, "strace to attach to the daemon")
        senders = [storescu_process(daemon, *batch) for batch in batches]
        for sender in senders:
            output, _ = sender.communicate(timeout=120)
            assert sender.returncode == 0, output
    finally:
        tracer.terminate()
        tracer.wait(timeout=30)
        daemon.stop()
    calls = traced_calls(trace.read_text())
    series_directory = str(daemon.storage_dir.resolve() / study / series)
    renames = [call for call in calls if call.name == "rename" and series_directory in call.arguments]
    assert len(renames) == 32, "every object sent while traced (the first one a second time)"
    fsyncs = [c for c in calls if c.name == "fsync" and c.arguments.endswith(f"<{series_directory}>")]
    for rename in renames:
        spool_file = rename.arguments.split('"')[1]
        on_thread = [call for call in calls if call.thread == rename.thread]
        (fdatasync,) = [c for c in on_thread if c.name == "fdatasync" and f"<{spool_file}>" in c.arguments]
        writebacks = [c for c in on_thread if c.name == "sync_file_range" and f"<{spool_file}>" in c.arguments]
        assert writebacks and all(c.ended <= fdatasync.began for c in writebacks)
        assert fdatasync.result == 0 and fdatasync.ended <= rename.began and rename.result == 0
        response = min((c for c in on_thread if c.name == "sendto" and c.began >= rename.ended), key=lambda c: c.began)
        assert any(
            c in fsyncs and c.result == 0 and c.began >= rename.ended and c.ended <= response.began for c in calls
        ), f"no fsync of the series directory between the rename and the response: {rename}"
    # Shared or not is the scheduler's choice; never more than one per object.
    assert len(fsyncs) <= len(renames)
