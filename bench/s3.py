"""The benchmark's S3 mode: this daemon with DICOM_BUCKET, S3 answered by moto_server behind a proxy that holds
every answer back by a fixed request latency and keeps connections alive between requests, as S3 does.

The latency (BENCH_S3_LATENCY, seconds, default 0.05) follows AWS's whitepaper "Best Practices Design Patterns:
Optimizing Amazon S3 Performance", section "Timeouts and Retries for Latency-Sensitive Applications": requests
under 512 KB, a CT slice's size, have median latencies "often in the range of tens of milliseconds"; the S3 User
Guide's "Optimizing S3 Express One Zone performance" puts S3 Express's single-digit milliseconds at "up to 10x
faster than S3 Standard". A modality waits for each answer before it sends the next object, so one association
stores at most 1 / latency objects a second and ``n`` associations ``n`` / latency: the bound each row is set
against.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psutil
import pydicom

from bench.receivers import REPOSITORY, Receiver, daemon_environment, receiver_processes
from tests.support.moto import CREDENTIALS, MotoServer, start_moto_server
from tests.support.s3_faults import FaultProxy

DEFAULT_LATENCY_SECONDS = 0.05
NAME = "this daemon, S3"
_buckets = itertools.count()


@dataclass
class StandIn:
    moto: MotoServer
    proxy: subprocess.Popen[str]  # a process of its own, so its CPU is counted and the bench's sampling is not slowed
    endpoint: str
    latency_seconds: float

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by moto_server and the proxy."""
        total = 0.0
        for pid in (self.moto.process.pid, self.proxy.pid):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        return total

    def client(self) -> Any:
        """A client straight to moto_server: the bench's own reads do not pay the latency."""
        return boto3.client("s3", endpoint_url=self.moto.endpoint, region_name=CREDENTIALS["AWS_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


@contextmanager
def stand_in(latency_seconds: float) -> Iterator[StandIn]:
    moto = start_moto_server()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.s3", moto.endpoint, str(latency_seconds)],
        # A request the daemon gave up on (its own timeout) is a traceback in the proxy: the run's check tells.
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPOSITORY,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None
        yield StandIn(moto, proxy, proxy.stdout.readline().strip(), latency_seconds)
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        moto.stop()


class S3Daemon(Receiver):
    """This daemon storing to a fresh bucket per run; the receive spool is the run's output directory."""

    def __init__(self, s3: StandIn, source: Path = REPOSITORY) -> None:
        self._note = f"S3 store through a proxy adding {s3.latency_seconds * 1000:.0f} ms to every request"
        super().__init__(NAME, available=True, note=self._note)
        self.s3 = s3
        self.source = source
        self.bucket = ""
        # The stand-in's CPU seconds during each run's receive: on a shared machine it can be the ceiling.
        self.stand_in_cpu: list[float] = []
        self._cpu_at_start = 0.0

    def start(self, workdir: Path) -> None:
        super().start(workdir)
        assert self.process is not None
        self.note = f"{self._note}, {receiver_processes(self.process.pid)}"
        self._cpu_at_start = self.s3.cpu_seconds()

    def stop(self) -> None:
        super().stop()  # the daemon writes its last manifest before it exits
        self.stand_in_cpu.append(self.s3.cpu_seconds() - self._cpu_at_start)

    def command(self, workdir: Path) -> tuple[list[str], dict[str, str]]:
        self.bucket = f"bench-{next(_buckets)}"
        self.s3.client().create_bucket(Bucket=self.bucket)
        return [sys.executable, "-m", "scp"], {
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "DICOM_BUCKET": self.bucket,
            **daemon_environment(self.source, self.port, self.output),
        }

    def received(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 of the pixel data, for every object under a batch prefix of the bucket.

        Each object is deleted once read, so a large one does not stay in moto_server's memory for the next run.
        """
        client = self.s3.client()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                if not item["Key"].endswith(".dcm"):
                    continue  # a manifest
                body = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                dataset = pydicom.dcmread(io.BytesIO(body))
                found[str(dataset.SOPInstanceUID)] = hashlib.sha256(dataset.PixelData).hexdigest()
                client.delete_object(Bucket=self.bucket, Key=item["Key"])
        return found


def _serve_proxy(upstream: str, latency_seconds: float) -> None:
    """`python -m bench.s3 <moto endpoint> <latency>`: the latency proxy, its endpoint on stdout, until SIGTERM."""
    proxy = FaultProxy(upstream, latency_seconds, keep_alive=True)
    sys.stdout.write(proxy.endpoint + "\n")
    sys.stdout.flush()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    proxy.stop()


if __name__ == "__main__":
    _serve_proxy(sys.argv[1], float(sys.argv[2]))
