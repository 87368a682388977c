"""Fixtures that start the real daemon; every test gets its own process, port and storage directory (and in S3
mode its own bucket on the session's moto_server)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, start_daemon
from tests.support.forwarded_bucket import ForwardedBucket
from tests.support.moto import MotoServer
from tests.support.s3 import new_bucket
from tests.support.stow import StowStandIn
from tests.support.sweeper import Sweeper, load_sweeper


@pytest.fixture(scope="session", autouse=True)
def _dcmtk() -> None:
    missing = [tool for tool in ("echoscu", "storescu", "storescp") if shutil.which(tool) is None]
    assert not missing, f"DCMTK is not installed ({', '.join(missing)}); `make test` installs it"


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(storage_dir: Path | None = None, **settings: str | None) -> Daemon:
        daemon = start_daemon(tmp_path, storage_dir=storage_dir, **settings)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    return new_bucket(moto)


@pytest.fixture
def s3_daemon(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, moto: MotoServer, bucket: str
) -> Callable[..., Daemon]:
    """Starts daemons storing to ``bucket``, each with a receive spool of its own unless given one."""
    spools = itertools.count()

    def start(server: MotoServer = moto, storage_dir: Path | None = None, **settings: str | None) -> Daemon:
        storage_dir = storage_dir or tmp_path / f"spool-{next(spools)}"
        return daemon_factory(storage_dir=storage_dir, **{"DICOM_BUCKET": bucket, **server.env(), **settings})

    return start


@pytest.fixture
def standin() -> Iterator[StowStandIn]:
    """HealthImaging's StoreDICOM in moto's Region: one AWS_REGION for both clients, as in a task."""
    server = StowStandIn(region="us-east-1").start()
    yield server
    server.stop()


@pytest.fixture
def forwarding_daemon(standin: StowStandIn, s3_daemon: Callable[..., Daemon], tmp_path: Path) -> Callable[..., Daemon]:
    """Starts S3-mode daemons that also forward to ``standin`` (torn down after them: it is set up first)."""

    def start(storage_dir: Path | None = None, **settings: str | None) -> Daemon:
        # The stand-in's credentials; moto_server accepts any.
        credentials = {**standin.daemon_settings(tmp_path), "AWS_SESSION_TOKEN": None}
        return s3_daemon(storage_dir=storage_dir, **{**credentials, **settings})

    return start


@pytest.fixture
def forwarded(
    forwarding_daemon: Callable[..., Daemon], moto: MotoServer, bucket: str, standin: StowStandIn, tmp_path: Path
) -> ForwardedBucket:
    return ForwardedBucket(forwarding_daemon, moto, bucket, standin, tmp_path)


@pytest.fixture
def sweeper(aws_env: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Sweeper:
    return load_sweeper(bucket, monkeypatch)
