"""The console script as an admin meets it: help, configuration errors, health check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scp.config import Settings
from tests.support.daemon import Daemon
from tests.support.waits import free_port

pytestmark = pytest.mark.integration


def run(*arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scp", *arguments], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def test_help_documents_every_setting() -> None:
    result = run("--help")
    assert result.returncode == 0
    for name, default, _ in Settings.documentation():
        assert name in result.stdout
        if default:
            assert f"default: {default}" in result.stdout


def test_invalid_configuration_names_every_bad_variable_and_exits_2(tmp_path: Path) -> None:
    result = run(SCP_PORT="0", AE_TITLE="WAY_TOO_LONG_AE_TITLE", STORAGE_DIR=str(tmp_path))
    assert result.returncode == 2
    assert "SCP_PORT: expected 1-65535, got '0'" in result.stderr
    assert "AE_TITLE:" in result.stderr
    assert not (tmp_path / ".incoming").exists(), "nothing starts with a bad configuration"


def test_healthcheck_reports_a_running_daemon(daemon: Daemon) -> None:
    result = run("healthcheck", SCP_PORT=str(daemon.port), BIND_ADDRESS="127.0.0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("healthy")


def test_healthcheck_counts_a_rejection_as_alive(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(REQUIRE_CALLING_AE_TITLE="CT_ONLY")
    result = run("healthcheck", SCP_PORT=str(daemon.port), BIND_ADDRESS="127.0.0.1")
    assert result.returncode == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = run("healthcheck", SCP_PORT=str(free_port()), BIND_ADDRESS="127.0.0.1")
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy")


def test_port_in_use_is_one_clear_error(daemon: Daemon, tmp_path: Path) -> None:
    result = run(SCP_PORT=str(daemon.port), BIND_ADDRESS="127.0.0.1", STORAGE_DIR=str(tmp_path / "other"))
    assert result.returncode == 1
    assert '"message": "cannot start"' in result.stdout


def test_network_timeout_alone_starts(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    # ACSE_TIMEOUT's default follows a NETWORK_TIMEOUT below 30 s instead of contradicting it.
    daemon = daemon_factory(NETWORK_TIMEOUT="10")
    assert daemon.echo_ok()


def test_a_conflict_with_a_default_names_the_variable_to_set(tmp_path: Path) -> None:
    result = run(ACSE_TIMEOUT="120", STORAGE_DIR=str(tmp_path))
    assert result.returncode == 2
    assert "NETWORK_TIMEOUT (90, its default); set NETWORK_TIMEOUT to at least 120" in result.stderr
