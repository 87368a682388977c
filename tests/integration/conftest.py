"""Fixtures that start the real daemon; every test gets its own process, port and storage directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, start_daemon


@pytest.fixture(scope="session", autouse=True)
def _dcmtk() -> None:
    missing = [tool for tool in ("echoscu", "storescu", "storescp") if shutil.which(tool) is None]
    assert not missing, f"DCMTK is not installed ({', '.join(missing)}); `make test` installs it"


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(**settings: str) -> Daemon:
        daemon = start_daemon(tmp_path, **settings)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()
