"""`python -m bench.forwarding`: seconds from the C-STORE acknowledgement to "stored in HealthImaging" through
StoreDICOM forwarding, at 1 and 16 associations, and the receive rate with forwarding on and off.

HealthImaging is the test suite's STOW-RS stand-in with a fixed service latency per request (BENCH_STOW_LATENCY,
seconds, default 0.25: no latency is published for StoreDICOM; a quarter second is a synchronous store that parses
and persists the instances before it answers, on the order of an S3 PUT plus processing). Settings: BENCH_FILES
(default 200), BENCH_KIB (size of each object, default 256), BENCH_CONCURRENCY (default 1,16).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support.corpus import make_instance
from tests.support.daemon import Daemon, start_daemon
from tests.support.stow import StowStandIn
from tests.support.waits import wait_for


def _send(daemon: Daemon, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` storescu processes to send ``files`` between them."""
    shares = [files[index::associations] for index in range(associations)]
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", daemon.ae_title, "127.0.0.1", str(daemon.port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        for share in shares
        if share
    ]
    assert all(sender.wait(timeout=600) == 0 for sender in senders)
    return time.monotonic() - started


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _forward_latencies(daemon: Daemon) -> list[float]:
    return [value / 1000 for entry in daemon.log_messages("metrics") for value in (entry.get("ForwardLatency") or [])]


def measure(workdir: Path, files: list[Path], associations: int, latency: float) -> dict[str, float]:
    for name in (f"on-{associations}", f"off-{associations}"):
        (workdir / name).mkdir()
    standin = StowStandIn(latency_seconds=latency).start()
    try:
        forwarding = start_daemon(workdir / f"on-{associations}", **standin.daemon_settings(workdir))
        started = time.monotonic()
        idle_cpu = _cpu_seconds(forwarding)
        seconds = _send(forwarding, files, associations)
        wait_for(lambda: len(standin.arrivals()) == len(files), 600, "every instance at the stand-in", interval=0.2)
        stored_at = time.monotonic()
        forwarding_cpu = _cpu_seconds(forwarding) - idle_cpu
        forwarding.stop()
        latencies = _forward_latencies(forwarding)
        plain = start_daemon(workdir / f"off-{associations}")
        idle_cpu = _cpu_seconds(plain)
        plain_seconds = _send(plain, files, associations)
        plain_cpu = _cpu_seconds(plain) - idle_cpu
        plain.stop()
    finally:
        standin.stop()
    return {
        "associations": associations,
        "p50_seconds": statistics.median(latencies),
        "p99_seconds": _percentile(latencies, 0.99),
        "forwarded_per_second": len(files) / (stored_at - started),
        "received_per_second_forwarding": len(files) / seconds,
        "received_per_second_plain": len(files) / plain_seconds,
        "instances_per_request": statistics.mean(standin.instances_per_request),
        # The daemon's own CPU per object, receiving and forwarding: on a shared machine the stand-in's work
        # (verifying every signature, parsing every instance) competes for the same cores, HealthImaging's not.
        "cpu_ms_per_object_forwarding": forwarding_cpu * 1000 / len(files),
        "cpu_ms_per_object_plain": plain_cpu * 1000 / len(files),
    }


def _cpu_seconds(daemon: Daemon) -> float:
    times = psutil.Process(daemon.process.pid).cpu_times()
    return float(times.user + times.system)


def main() -> int:
    count = int(os.environ.get("BENCH_FILES", "200"))
    size = int(os.environ.get("BENCH_KIB", "256")) * 1024
    latency = float(os.environ.get("BENCH_STOW_LATENCY", "0.25"))
    concurrency = [int(n) for n in os.environ.get("BENCH_CONCURRENCY", "1,16").split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-forwarding-") as directory:
        workdir = Path(directory)
        corpus = workdir / "corpus"
        corpus.mkdir()
        study = "2.25.27182818284590452353602874713526"
        files = [make_instance(corpus, pixel_bytes=size, study_uid=study) for _ in range(count)]
        sys.stdout.write(
            f"StoreDICOM stand-in latency {latency:g} s per request; {count} objects of {size // 1024} KiB\n"
            "associations  p50 s  p99 s  instances/request  forwarded/s  received/s on  received/s off"
            "  daemon CPU ms/object on  off\n"
        )
        for associations in concurrency:
            row = measure(workdir, files, associations, latency)
            sys.stdout.write(
                f"{associations:>12}  {row['p50_seconds']:5.2f}  {row['p99_seconds']:5.2f}  "
                f"{row['instances_per_request']:17.1f}  {row['forwarded_per_second']:11.0f}  "
                f"{row['received_per_second_forwarding']:13.0f}  {row['received_per_second_plain']:14.0f}"
                f"  {row['cpu_ms_per_object_forwarding']:23.2f}  {row['cpu_ms_per_object_plain']:3.2f}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
