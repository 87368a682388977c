"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.daemon import STARTED
from tests.support.moto import MotoServer, moto_server


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    before = len(STARTED)
    yield
    for daemon in STARTED[before:]:
        daemon.stop()
    del STARTED[before:]


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """One moto_server for the session; tests isolate themselves by unique bucket and table names."""
    with moto_server() as server:
        yield server


@pytest.fixture
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """Point boto3 in this process at the shared moto_server."""
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto


def pytest_configure(config: pytest.Config) -> None:
    # Never let a test reach a real AWS account through the developer's own credentials.
    os.environ.pop("AWS_PROFILE", None)
