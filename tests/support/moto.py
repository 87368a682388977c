"""A real moto_server process on a free loopback port, standing in for S3, DynamoDB and Step Functions."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.waits import free_port, wait_for

# moto_server itself, with DynamoDB's conditional writes atomic as in AWS; -P keeps this directory (and its
# moto.py) off the script's import path.
ATOMIC_SERVER = Path(__file__).with_name("moto_server_atomic.py")

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@dataclass
class MotoServer:
    endpoint: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """Environment for a child process that should talk to this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def reset(self) -> None:
        urllib.request.urlopen(
            urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10
        ).read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _alive(endpoint: str) -> bool:
    with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2) as response:
        return bool(response.status == 200)


def start_moto_server(port: int | None = None, settings: Mapping[str, str] | None = None) -> MotoServer:
    """Start moto_server on 127.0.0.1 and wait until it answers; ``settings`` are moto's own environment variables
    (INITIAL_NO_AUTH_ACTION_COUNT: after that many requests, each is authenticated and authorized by its IAM)."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-P", str(ATOMIC_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS, **(settings or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is None and _alive(endpoint), 30, "moto_server to answer")
    except AssertionError:
        process.kill()
        raise
    return MotoServer(endpoint=endpoint, process=process)


@contextmanager
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()
