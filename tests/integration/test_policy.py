"""Association policy a hospital admin configures: AE titles, the association limit, timeouts."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.support.daemon import Daemon
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration


def reject_code(daemon: Daemon, calling: str = "TESTSCU", called: str | None = None) -> tuple[int, int, int]:
    association = daemon.associate(calling=calling, called=called)
    assert association.is_rejected, "expected an A-ASSOCIATE-RJ"
    primitive = association.acceptor.primitive
    return (primitive.result, primitive.result_source, primitive.diagnostic)


def test_any_called_ae_title_is_accepted_by_default(daemon: Daemon) -> None:
    association = daemon.associate(called="ANYTHING")
    assert association.is_established
    association.release()


def test_wrong_called_ae_title_is_rejected_when_required(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(AE_TITLE="HOSPITAL_PACS", REQUIRE_CALLED_AE_TITLE="true")
    assert reject_code(daemon, called="STORESCP") == (1, 1, 7)
    line = [e for e in daemon.log_messages("association rejected") if e["called_ae"] == "STORESCP"][-1]
    assert line["reason"] == "called AE title not recognised" and line["called_ae"] == "STORESCP"
    # echoscu, as a modality engineer would try it, sees the same.
    result = subprocess.run(
        ["echoscu", "-aec", "WRONG", "127.0.0.1", str(daemon.port)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    right = daemon.associate(called="HOSPITAL_PACS")
    assert right.is_established
    right.release()


def test_calling_ae_title_allow_list(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(REQUIRE_CALLING_AE_TITLE="CT_ROOM1, MR_ROOM2")
    assert reject_code(daemon, calling="INTRUDER") == (1, 1, 3)
    for allowed in ("CT_ROOM1", "MR_ROOM2"):
        association = daemon.associate(calling=allowed)
        assert association.is_established, allowed
        association.release()
    intruder = [e for e in daemon.log_messages("association rejected") if e["calling_ae"] == "INTRUDER"]
    assert intruder[0]["reason"] == "calling AE title not recognised"


def test_association_limit_rejects_promptly_and_frees_slots(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(MAXIMUM_ASSOCIATIONS="2")
    held = [daemon.associate(), daemon.associate()]
    assert all(a.is_established for a in held)
    started = time.monotonic()
    assert reject_code(daemon) == (2, 3, 2)
    assert time.monotonic() - started < 5, "a rejection must be prompt, never a hang"
    held[0].release()
    wait_for(daemon.echo_ok, 10, "a freed slot to accept a new association")
    held[1].release()


def test_silent_connection_is_dropped_after_the_association_request_timeout(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(ACSE_TIMEOUT="1", NETWORK_TIMEOUT="2")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as silent:
        started = time.monotonic()
        while silent.recv(1024):  # the daemon closes, possibly after sending an A-ABORT
            pass
        assert time.monotonic() - started < 8
    assert daemon.echo_ok()


def test_idle_association_is_aborted_after_the_network_timeout(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(ACSE_TIMEOUT="1", NETWORK_TIMEOUT="2")
    association = daemon.associate()
    assert association.is_established
    wait_for(lambda: association.is_aborted or not association.is_alive(), 10, "the idle association to be dropped")
    wait_for(lambda: daemon.log_messages("association aborted"), 5, "the abort to be logged")
    assert daemon.echo_ok()


def test_silent_connections_do_not_take_association_slots(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(MAXIMUM_ASSOCIATIONS="2", ACSE_TIMEOUT="20")
    silent = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(5)]
    try:
        held = [daemon.associate(), daemon.associate()]
        assert all(a.is_established for a in held)
        assert reject_code(daemon) == (2, 3, 2)
        for association in held:
            association.release()
    finally:
        for connection in silent:
            connection.close()
