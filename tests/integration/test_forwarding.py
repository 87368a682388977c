"""StoreDICOM forwarding against the real daemon: DCMTK storescu as the modality, a local STOW-RS stand-in as
HealthImaging, the status command reading the daemon's forwarding database."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.corpus import PYDICOM_CORPUS, comparable, make_instance, read
from tests.support.daemon import Daemon, start_daemon
from tests.support.stow import StowStandIn
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def standin() -> Iterator[StowStandIn]:
    server = StowStandIn().start()
    yield server
    server.stop()


def forwarding_daemon(tmp_path: Path, standin: StowStandIn, **settings: str) -> Daemon:
    return start_daemon(tmp_path, **standin.daemon_settings(tmp_path), **settings)


def storescu(daemon: Daemon, *files: Path, options: tuple[str, ...] = ()) -> None:
    result = subprocess.run(
        ["storescu", *options, "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def status(daemon: Daemon, study: str, *options: str) -> tuple[int, str]:
    environment = {k: v for k, v in daemon.env.items() if k != "IMPORT_TABLE_NAME"}
    result = subprocess.run(
        [sys.executable, "-m", "scp", "status", "--study", study, *options],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    assert result.returncode in (0, 1, 2, 3), result.stderr
    return result.returncode, result.stdout


def status_json(daemon: Daemon, study: str) -> tuple[int, dict[str, Any]]:
    code, output = status(daemon, study, "--json")
    return code, json.loads(output)


def states(report: dict[str, Any]) -> dict[str, str]:
    return {instance["sopInstanceUid"]: instance["state"] for instance in report["instances"]}


def uid_of(path: Path) -> str:
    return str(read(path).SOPInstanceUID)


def waiting(daemon: Daemon) -> int:
    """Instances the daemon has not yet brought to an end state (read as the status command would)."""
    database = daemon.storage_dir / ".forwarding" / "forwarding.sqlite"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        (count,) = connection.execute("SELECT COUNT(*) FROM instances WHERE status = 'forwarding'").fetchone()
    return int(count)


def stored_file(daemon: Daemon, sop_instance_uid: str) -> Path:
    (found,) = [p for p in daemon.stored_files() if p.name == f"{sop_instance_uid}.dcm"]
    return found


def test_every_acknowledged_instance_arrives_byte_identical(tmp_path: Path, standin: StowStandIn) -> None:
    # Service latency lets a backlog form, so some requests carry several instances (multipart/related).
    standin.latency_seconds = 0.2
    daemon = forwarding_daemon(tmp_path, standin)
    study = "1.2.826.0.1.3680043.8.498.13001"
    generated = [make_instance(tmp_path, pixel_bytes=96 * 1024, study_uid=study) for _ in range(24)]
    storescu(daemon, *generated)
    for corpus_file in PYDICOM_CORPUS:
        storescu(daemon, corpus_file.path, options=corpus_file.storescu_options)
    acknowledged = {uid_of(path) for path in generated} | {uid_of(f.path) for f in PYDICOM_CORPUS}

    wait_for(lambda: set(standin.arrivals()) == acknowledged, 60, "every acknowledged instance at StoreDICOM")
    # Some corpus files share a SOP Instance UID: each receipt replaces the stored file and is sent again.
    wait_for(lambda: waiting(daemon) == 0, 60, "the last receipt of each instance to be sent")
    assert standin.problems == []
    for sop_instance_uid in acknowledged:
        assert standin.last_bytes(sop_instance_uid) == stored_file(daemon, sop_instance_uid).read_bytes()
    for path in generated:
        arrived = read(stored_file(daemon, uid_of(path)))
        assert comparable(arrived) == comparable(read(path))
    assert standin.content_types["multipart/related"] >= 1, standin.content_types
    assert max(standin.instances_per_request) > 1

    wait_for(lambda: status(daemon, study)[0] == 0, 30, "the status command to report the study imported")
    code, report = status_json(daemon, study)
    assert code == 0
    assert report["counts"] == {"received": 24, "forwarding": 0, "imported": 24, "warning": 0, "failed": 0}
    assert report["imageSets"] == [{"imageSetId": standin.image_set_id(study), "instances": 24}]
    assert daemon.stop() == 0


def test_through_503_and_429_nothing_is_lost_and_receiving_goes_on(tmp_path: Path, standin: StowStandIn) -> None:
    daemon = forwarding_daemon(tmp_path, standin)
    study = "1.2.826.0.1.3680043.8.498.13002"
    standin.answer_status = 503
    during_503 = [make_instance(tmp_path, pixel_bytes=32 * 1024, study_uid=study) for _ in range(10)]
    storescu(daemon, *during_503)  # acknowledged while HealthImaging is down
    wait_for(lambda: standin.requests["503"] >= 2, 30, "StoreDICOM to be tried while it answers 503")

    code, report = status_json(daemon, study)
    assert code == 2, "on its way, nothing failed"
    assert report["counts"]["forwarding"] == 10
    assert all("503" in (instance["lastError"] or "") for instance in report["instances"] if instance["attempts"])
    code, text = status(daemon, study)
    assert "forwarding" in text and "Result: PENDING (exit 2)" in text

    standin.answer_status = 429
    during_429 = [make_instance(tmp_path, pixel_bytes=32 * 1024, study_uid=study) for _ in range(10)]
    storescu(daemon, *during_429)
    wait_for(lambda: standin.requests["429"] >= 2, 60, "StoreDICOM to be tried while it throttles")
    assert not standin.received

    standin.answer_status = None
    acknowledged = {uid_of(path) for path in during_503 + during_429}
    wait_for(lambda: set(standin.arrivals()) == acknowledged, 120, "every instance stored once StoreDICOM is back")
    assert standin.problems == []
    wait_for(lambda: status(daemon, study)[0] == 0, 30, "the status command to report the study imported")
    code, report = status_json(daemon, study)
    assert report["counts"]["imported"] == 20 and report["counts"]["failed"] == 0

    assert daemon.stop() == 0
    assert daemon.log_messages("StoreDICOM failing; instances wait in the local store and are sent again")
    assert daemon.log_messages("StoreDICOM answering again")
    metrics = [entry for entry in daemon.log_messages("metrics") if "ForwardRetries" in entry]
    assert sum(entry["ForwardRetries"] for entry in metrics) >= 4
    assert sum(entry["ForwardStored"] for entry in metrics) == 20


def test_sigkill_mid_forwarding_then_restart_loses_nothing(tmp_path: Path, standin: StowStandIn) -> None:
    standin.latency_seconds = 0.5  # requests are in flight when the daemon dies
    daemon = forwarding_daemon(tmp_path, standin)
    study = "1.2.826.0.1.3680043.8.498.13003"
    files = [make_instance(tmp_path, pixel_bytes=32 * 1024, study_uid=study) for _ in range(60)]
    storescu(daemon, *files)
    wait_for(lambda: sum(standin.requests.values()) >= 1, 30, "the first StoreDICOM answer")
    daemon.signal(signal.SIGKILL)
    daemon.wait(timeout=10)

    assert waiting(daemon) > 0, "the kill came after forwarding had finished: the test proves nothing"

    standin.latency_seconds = 0.0
    restarted = start_daemon(tmp_path, storage_dir=daemon.storage_dir, **standin.daemon_settings(tmp_path))
    acknowledged = {uid_of(path) for path in files}
    wait_for(lambda: set(standin.arrivals()) == acknowledged, 60, "every instance after the restart")
    wait_for(lambda: waiting(restarted) == 0, 30, "every instance in an end state")
    assert restarted.log_messages("StoreDICOM forwarding resumes")
    wait_for(lambda: status(restarted, study)[0] == 0, 30, "the status command to report the study imported")
    assert status_json(restarted, study)[1]["counts"]["imported"] == 60
    report = status_json(restarted, study)[1]
    # At least once: an instance may arrive twice (its answer was lost with the process); each such store is
    # counted as a duplicate, never missed.
    arrived_twice = sum(count - 1 for count in standin.arrivals().values())
    assert arrived_twice <= report["duplicates"]
    for sop_instance_uid in acknowledged:
        assert standin.last_bytes(sop_instance_uid) == stored_file(restarted, sop_instance_uid).read_bytes()
    assert standin.problems == []
    assert restarted.stop() == 0


def test_a_refused_instance_is_recorded_and_the_rest_go_on(tmp_path: Path, standin: StowStandIn) -> None:
    study = "1.2.826.0.1.3680043.8.498.13004"
    files = [make_instance(tmp_path, pixel_bytes=32 * 1024, study_uid=study) for _ in range(12)]
    refused_http, refused_dicom, warned = (uid_of(path) for path in files[:3])
    standin.refuse_http.add(refused_http)
    standin.refuse_dicom[refused_dicom] = 0xA900
    standin.warn[warned] = 0xB000
    standin.latency_seconds = 0.2  # so the refused instances share requests with others
    daemon = forwarding_daemon(tmp_path, standin)
    storescu(daemon, *files)

    wait_for(lambda: status(daemon, study)[0] == 1, 60, "every instance in an end state, one failure at least")
    wait_for(lambda: status_json(daemon, study)[1]["counts"]["forwarding"] == 0, 30, "nothing left on its way")
    code, report = status_json(daemon, study)
    assert code == 1
    assert report["counts"] == {"received": 12, "forwarding": 0, "imported": 9, "warning": 1, "failed": 2}
    by_uid = {instance["sopInstanceUid"]: instance for instance in report["instances"]}
    assert "HTTP 400" in by_uid[refused_http]["reason"] and "refuses this instance" in by_uid[refused_http]["reason"]
    assert "0xA900" in by_uid[refused_dicom]["reason"]
    assert by_uid[warned]["state"] == "warning" and "0xB000" in by_uid[warned]["reason"]
    assert set(standin.arrivals()) == {uid_of(path) for path in files} - {refused_http, refused_dicom}

    code, text = status(daemon, study)
    assert f"Failed: {refused_http}: StoreDICOM refused it: HTTP 400" in text
    assert f"Failed: {refused_dicom}: StoreDICOM failure 0xA900" in text
    assert f"Warning: {warned}: warning 0xB000" in text
    assert "Result: ATTENTION (exit 1)" in text
    assert standin.problems == []
    assert daemon.stop() == 0
    assert len(daemon.log_messages("not stored in HealthImaging")) == 2


def test_rows_a_power_loss_took_are_found_again_from_the_store(tmp_path: Path, standin: StowStandIn) -> None:
    standin.answer_status = 503  # nothing reaches HealthImaging before the machine goes down
    daemon = forwarding_daemon(tmp_path, standin)
    study = "1.2.826.0.1.3680043.8.498.13005"
    files = [make_instance(tmp_path, pixel_bytes=16 * 1024, study_uid=study) for _ in range(4)]
    storescu(daemon, *files[:1])
    wait_for(lambda: standin.requests["503"] >= 1, 30, "a first request")
    daemon.signal(signal.SIGKILL)
    daemon.wait(timeout=10)
    # What a power loss leaves: the first object's row checkpointed long ago, then three objects fsync'd and
    # acknowledged whose rows were still only in the page cache, and a different boot.
    daemon = forwarding_daemon(tmp_path, standin)
    storescu(daemon, *files[1:])
    daemon.signal(signal.SIGKILL)
    daemon.wait(timeout=10)
    lost = [uid_of(path) for path in files[1:]]
    database = daemon.storage_dir / ".forwarding" / "forwarding.sqlite"
    with sqlite3.connect(database) as connection:
        (stored_at,) = connection.execute(
            "SELECT MIN(enqueued_at) FROM instances WHERE sop_instance_uid IN (?, ?, ?)", lost
        ).fetchone()
        connection.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(uid,) for uid in lost])
        connection.execute("UPDATE meta SET value = 'the-boot-before' WHERE key = 'boot_id'")
        connection.execute("UPDATE meta SET value = ? WHERE key = 'durable_until'", (repr(stored_at - 1),))

    standin.answer_status = None
    restarted = start_daemon(tmp_path, storage_dir=daemon.storage_dir, **standin.daemon_settings(tmp_path))
    (recovered,) = restarted.log_messages("forwarding outbox recovered after the machine went down")
    assert recovered["instances_recorded"] == 3
    acknowledged = {uid_of(path) for path in files}
    wait_for(lambda: set(standin.arrivals()) == acknowledged, 60, "every acknowledged instance, the lost rows too")
    wait_for(lambda: waiting(restarted) == 0, 30, "every instance in an end state")
    code, report = status_json(restarted, study)
    assert code == 0 and report["counts"]["imported"] == 4
    assert {i["callingAETitle"] for i in report["instances"]} == {"STORESCU"}
    assert restarted.stop() == 0

    # A clean stop leaves nothing to recover, and a kill on a machine that stays up loses no row.
    again = start_daemon(tmp_path, storage_dir=daemon.storage_dir, **standin.daemon_settings(tmp_path))
    again.signal(signal.SIGKILL)
    again.wait(timeout=10)
    last = start_daemon(tmp_path, storage_dir=daemon.storage_dir, **standin.daemon_settings(tmp_path))
    assert not again.log_messages("forwarding outbox recovered after the machine went down")
    assert not last.log_messages("forwarding outbox recovered after the machine went down")
    assert last.stop() == 0


def rss_mib(pid: int) -> float:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024


def test_a_large_instance_is_streamed_from_disk_in_bounded_memory(tmp_path: Path, standin: StowStandIn) -> None:
    standin.answer_status = 503  # receive first, then measure the forwarding alone
    daemon = forwarding_daemon(tmp_path, standin)
    large = make_instance(tmp_path, pixel_bytes=160 * 1024 * 1024)
    storescu(daemon, large)
    wait_for(lambda: standin.requests["503"] >= 1, 30, "a first request")
    baseline = rss_mib(daemon.process.pid)
    standin.answer_status = None
    peak = baseline
    uid = uid_of(large)

    def arrived() -> bool:
        nonlocal peak
        peak = max(peak, rss_mib(daemon.process.pid))
        return uid in standin.arrivals()

    wait_for(arrived, 120, "the large instance at StoreDICOM", interval=0.02)
    assert standin.last_sha256(uid) == hashlib.sha256(stored_file(daemon, uid).read_bytes()).hexdigest()
    assert peak < baseline + 32, (baseline, peak)
    assert standin.problems == []
    assert daemon.stop() == 0
