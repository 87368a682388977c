"""`python -m bench.forwarding` (and a section of `make bench`): seconds from the C-STORE acknowledgement to "stored
in HealthImaging" by both paths, at 1 and 16 associations, and the receive rate with forwarding on and off.

Both paths run the real daemon in S3 mode, as the stack does: S3 is moto_server behind the latency proxy of the S3
table (bench/s3.py, BENCH_S3_LATENCY), and a pynetdicom modality, one thread per association, notes when each
C-STORE response arrives.

- StoreDICOM forwarding: HealthImaging is the test suite's STOW-RS stand-in with a fixed service latency per request
  (BENCH_STOW_LATENCY, seconds, default 0.25: no latency is published for StoreDICOM; a quarter second is a
  synchronous store that parses and persists the instances before it answers, on the order of an S3 PUT plus
  processing). An instance is stored when StoreDICOM's answer came, the time its batch's manifest records for it.
  Its batch closes after FORWARDING_WINDOW_SECONDS of quiet so that the bench can read the manifest soon; the
  window does not move the answer's time, and an instance the batch closed on before its answer is counted as left
  to the import job.
- The import job: the daemon with its default batch window (BATCH_WINDOW_SECONDS as the template deploys it, unless
  the environment sets it), measured from the acknowledgement until the batch's manifest is seen in the bucket,
  plus the modelled time of the job and the workflow's polling (bench/import_workflow.py, BENCH_IMPORT_JOB_SECONDS).

The receive rate with forwarding on and off comes from those two runs, with the CPU per object that the daemon, the
S3 stand-in and the StoreDICOM stand-in each spent while the modality sent (all share this machine's cores; in the
stack, S3's and HealthImaging's work is theirs, so the daemon's own figures are what forwarding costs a task), and
again from the local store (the standalone gateway, DCMTK storescu as the modality, medians of
BENCH_FORWARD_REPEATS), where the forwarding rate, the daemon's CPU per object and its own ForwardLatency metric
(from the stored object to StoreDICOM's answer) are reported too.

Settings: BENCH_FORWARD_FILES (default 200), BENCH_FORWARD_KIB (size of each object, default 256),
BENCH_FORWARD_CONCURRENCY (default 1,16), BENCH_FORWARD_REPEATS (local-store runs, on and off, whose medians are
reported; default 3), BENCH_STOW_LATENCY, BENCH_S3_LATENCY, BENCH_IMPORT_JOB_SECONDS. The daemon measured is this
checkout's (BENCH_SOURCE does not reach this section).
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import psutil
import pydicom
from pynetdicom import AE

from batch_contract.layout import MANIFESTS_PREFIX, batch_id_from_manifest_key
from batch_contract.manifest import Manifest, parse_manifest
from bench import import_workflow, s3
from bench.receivers import REPOSITORY
from scp.config import Settings
from tests.support.corpus import make_instance
from tests.support.daemon import Daemon, start_daemon
from tests.support.stow import StowStandIn
from tests.support.waits import wait_for

DEFAULT_STOW_LATENCY_SECONDS = 0.25
# The forwarding run's batch window: short, so that its manifest (which holds every answer's time) comes soon.
FORWARDING_WINDOW_SECONDS = 5
# The goals: acknowledged to stored under 2 s at the median; the receive rate unchanged by forwarding, judged as
# at least 95 % of the rate without it (the bench's own tolerance; on a loaded machine runs spread wider).
GOAL_P50_SECONDS = 2.0
GOAL_RECEIVE_RATIO = 0.95
_MANIFEST_POLL_SECONDS = 0.2


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``share`` of the values at or below it; NaN
    for none (a path that stored nothing shows as such rather than stopping the report)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else math.nan


@dataclass(frozen=True)
class Latencies:
    """Seconds from each instance's acknowledgement to stored, and how many took the other path."""

    seconds: list[float]
    left_to_import: int = 0

    @property
    def p50(self) -> float:
        return percentile(self.seconds, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.seconds, 0.99)


@dataclass(frozen=True)
class CpuPerObject:
    """Milliseconds of CPU per object while the modality sent, by process, in one S3-mode run."""

    daemon: float
    s3_stand_in: float  # moto_server and the latency proxy: PUTs, and the tags of what StoreDICOM stored
    stow_stand_in: float = 0.0  # verifying each signature and parsing each instance; nothing without forwarding


@dataclass(frozen=True)
class PathRow:
    """One association count: the forwarding path, and the import path's measured window and modelled rest."""

    associations: int
    forwarding: Latencies
    to_manifest: Latencies
    after_manifest: float  # modelled: the job and the workflow's checks, the same for every instance
    received_per_second_forwarding: float
    received_per_second_plain: float
    forwarded_per_second: float
    cpu_forwarding: CpuPerObject | None = None
    cpu_plain: CpuPerObject | None = None

    @property
    def import_job(self) -> Latencies:
        return Latencies([seconds + self.after_manifest for seconds in self.to_manifest.seconds])


@dataclass(frozen=True)
class LocalRow:
    """The local store: receive rates with forwarding on and off, and the forwarder's own figures."""

    associations: int
    forward_latency: Latencies  # the daemon's ForwardLatency metric, from the stored object to the answer
    forwarded_per_second: float
    received_per_second_forwarding: float
    received_per_second_plain: float
    instances_per_request: float
    cpu_ms_per_object_forwarding: float
    cpu_ms_per_object_plain: float


@dataclass(frozen=True)
class Parameters:
    files: int
    kib: int
    levels: list[int]
    repeats: int
    stow_latency: float
    s3_latency: float
    job_seconds: float
    batch_window: float
    default_batch_window: float  # the daemon's, which the template's BatchWindowSeconds also defaults to
    workflow: import_workflow.Workflow

    @classmethod
    def from_env(cls) -> Parameters:
        return cls(
            files=int(os.environ.get("BENCH_FORWARD_FILES", "200")),
            kib=int(os.environ.get("BENCH_FORWARD_KIB", "256")),
            levels=[int(n) for n in os.environ.get("BENCH_FORWARD_CONCURRENCY", "1,16").split(",")],
            repeats=int(os.environ.get("BENCH_FORWARD_REPEATS", "3")),
            stow_latency=float(os.environ.get("BENCH_STOW_LATENCY", str(DEFAULT_STOW_LATENCY_SECONDS))),
            s3_latency=float(os.environ.get("BENCH_S3_LATENCY", str(s3.DEFAULT_LATENCY_SECONDS))),
            job_seconds=float(os.environ.get("BENCH_IMPORT_JOB_SECONDS", str(import_workflow.DEFAULT_JOB_SECONDS))),
            # What the daemon the bench starts will use: its default, or the environment's BATCH_WINDOW_SECONDS.
            batch_window=Settings.from_env(
                {k: v for k, v in os.environ.items() if k == "BATCH_WINDOW_SECONDS"}
            ).batch_window_seconds,
            default_batch_window=Settings.from_env({}).batch_window_seconds,
            workflow=import_workflow.product_workflow(),
        )


# -- the modality -------------------------------------------------------------------------------------------------


def _send_noting_answers(
    daemon: Daemon, files: dict[str, Path], associations: int, stand_in: s3.StandIn, stow_pid: int | None = None
) -> tuple[dict[str, float], float, CpuPerObject]:
    """pynetdicom, one association per thread: (SOP Instance UID -> wall-clock time its C-STORE Success arrived,
    objects received per second, the CPU per object each process spent meanwhile)."""
    uids = list(files)
    answered: dict[str, float] = {}
    problems: list[str] = []

    def association(share: list[str]) -> None:
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        link = ae.associate("127.0.0.1", daemon.port, ae_title=daemon.ae_title)
        if not link.is_established:
            problems.append("association not established")
            return
        try:
            for uid in share:
                status = link.send_c_store(files[uid])
                if not status or status.Status != 0:
                    problems.append(f"{uid}: {status}")
                    continue
                answered[uid] = time.time()
        finally:
            link.release()

    threads = [threading.Thread(target=association, args=(uids[n::associations],)) for n in range(associations)]
    before = _process_cpu(daemon.process.pid), stand_in.cpu_seconds(), _process_cpu(stow_pid)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    after = _process_cpu(daemon.process.pid), stand_in.cpu_seconds(), _process_cpu(stow_pid)
    if problems:
        raise RuntimeError(f"{len(problems)} not stored: {problems[:3]}")
    cpu = CpuPerObject(*((end - start) * 1000 / len(files) for start, end in zip(before, after, strict=True)))
    return answered, len(files) / seconds, cpu


def _process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# -- the bucket ---------------------------------------------------------------------------------------------------


class ManifestWatch:
    """Lists the bucket's manifests every 0.2 s (straight to moto_server, paying no latency); notes when each
    first appeared."""

    def __init__(self, stand_in: s3.StandIn, bucket: str) -> None:
        self.client = stand_in.client()
        self.bucket = bucket
        self.seen: dict[str, tuple[float, Manifest]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ManifestWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(_MANIFEST_POLL_SECONDS):
            listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=MANIFESTS_PREFIX).get("Contents", [])
            for item in listed:
                if item["Key"] in self.seen:
                    continue
                seen_at = time.time()
                batch_id = batch_id_from_manifest_key(item["Key"])
                body = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                self.seen[item["Key"]] = (seen_at, parse_manifest(body, batch_id, self.bucket))

    def listed(self) -> set[str]:
        return {item.sop_instance_uid for _, manifest in list(self.seen.values()) for item in manifest.objects}


@contextmanager
def _s3_daemon(workdir: Path, stand_in: s3.StandIn, **settings: str) -> Iterator[tuple[Daemon, ManifestWatch]]:
    bucket = f"forwarding-{len(list(workdir.iterdir()))}"
    stand_in.client().create_bucket(Bucket=bucket)
    spool = workdir / bucket
    spool.mkdir()
    environment = {
        # moto_server accepts any credentials; a forwarding run gives the STOW-RS stand-in's, which it checks.
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        **settings,
        "AWS_ENDPOINT_URL": stand_in.endpoint, "DICOM_BUCKET": bucket, "LOG_LEVEL": "WARNING",
    }  # fmt: skip
    daemon = start_daemon(spool, storage_dir=spool / "spool", **environment)
    try:
        with ManifestWatch(stand_in, bucket) as watch:
            yield daemon, watch
    finally:
        daemon.stop()


def _iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@contextmanager
def _stow_process(latency: float, workdir: Path) -> Iterator[tuple[dict[str, str], int]]:
    """The STOW-RS stand-in in a process of its own, so that verifying and parsing every instance does not hold
    the modality's interpreter; yields the settings a daemon needs to forward to it, and its process id."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.forwarding", "--stow-stand-in", str(latency), str(workdir)],
        stdout=subprocess.PIPE, text=True, cwd=REPOSITORY,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        yield json.loads(process.stdout.readline()), process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


def _serve_stow(latency: float, workdir: Path) -> None:
    """`python -m bench.forwarding --stow-stand-in <latency> <dir>`: the daemon's settings on stdout, until SIGTERM."""
    standin = StowStandIn(region="us-east-1", latency_seconds=latency).start()
    sys.stdout.write(json.dumps(standin.daemon_settings(workdir)) + "\n")
    sys.stdout.flush()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    standin.stop()


def forwarding_path(
    workdir: Path, stand_in: s3.StandIn, files: dict[str, Path], n: int, stow: float
) -> tuple[Latencies, float, float, CpuPerObject]:
    """Acknowledgement to StoreDICOM's answer, from the time the manifest records for each instance; the receive
    rate; the forwarding rate, from the first acknowledgement to the last answer; and the CPU per object."""
    with _stow_process(stow, workdir) as (forwarding, stow_pid):
        settings = {**forwarding, "BATCH_WINDOW_SECONDS": str(FORWARDING_WINDOW_SECONDS)}
        with _s3_daemon(workdir, stand_in, **settings) as (daemon, watch):
            answered, rate, cpu = _send_noting_answers(daemon, files, n, stand_in, stow_pid)
            wait_for(lambda: watch.listed() >= set(files), 300, "every instance in a manifest", interval=0.5)
            manifests = [manifest for _, manifest in list(watch.seen.values())]
    stored = {
        item.sop_instance_uid: _iso_seconds(item.stored_by_storedicom.stored_at)
        for manifest in manifests
        for item in manifest.objects
        if item.stored_by_storedicom is not None
    }
    latencies = Latencies(
        [stored[uid] - answered[uid] for uid in files if uid in stored],
        left_to_import=sum(1 for uid in files if uid not in stored),
    )
    span = max(stored.values(), default=math.nan) - min(answered.values())
    return latencies, rate, len(stored) / span if stored else math.nan, cpu


def to_manifest(
    workdir: Path, stand_in: s3.StandIn, files: dict[str, Path], n: int
) -> tuple[Latencies, float, CpuPerObject]:
    """Acknowledgement to the manifest of the instance's batch seen in the bucket, the daemon's batch window as
    deployed (no forwarding); the receive rate; and the CPU per object."""
    with _s3_daemon(workdir, stand_in) as (daemon, watch):
        answered, rate, cpu = _send_noting_answers(daemon, files, n, stand_in)
        wait_for(lambda: watch.listed() >= set(files), 3600, "every instance in a manifest", interval=0.5)
        seen = {item.sop_instance_uid: at for at, manifest in list(watch.seen.values()) for item in manifest.objects}
    return Latencies([seen[uid] - answered[uid] for uid in files]), rate, cpu


# -- the local store ----------------------------------------------------------------------------------------------


def _storescu(daemon: Daemon, files: list[Path], associations: int) -> float:
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


def _cpu_seconds(daemon: Daemon) -> float:
    times = psutil.Process(daemon.process.pid).cpu_times()
    return float(times.user + times.system)


def _local_once(workdir: Path, files: list[Path], associations: int, stow: float) -> LocalRow:
    on, off = workdir / "on", workdir / "off"
    on.mkdir(parents=True)
    off.mkdir()
    standin = StowStandIn(latency_seconds=stow).start()
    try:
        forwarding = start_daemon(on, **standin.daemon_settings(workdir))
        started = time.monotonic()
        idle_cpu = _cpu_seconds(forwarding)
        seconds = _storescu(forwarding, files, associations)
        wait_for(lambda: len(standin.arrivals()) == len(files), 600, "every instance at the stand-in", interval=0.2)
        stored_at = time.monotonic()
        forwarding_cpu = _cpu_seconds(forwarding) - idle_cpu
        forwarding.stop()
        latencies = [
            value / 1000
            for entry in forwarding.log_messages("metrics")
            for value in (entry.get("ForwardLatency") or [])
        ]
        plain = start_daemon(off)
        idle_cpu = _cpu_seconds(plain)
        plain_seconds = _storescu(plain, files, associations)
        plain_cpu = _cpu_seconds(plain) - idle_cpu
        plain.stop()
    finally:
        standin.stop()
    return LocalRow(
        associations=associations,
        forward_latency=Latencies(latencies),
        forwarded_per_second=len(files) / (stored_at - started),
        received_per_second_forwarding=len(files) / seconds,
        received_per_second_plain=len(files) / plain_seconds,
        instances_per_request=statistics.mean(standin.instances_per_request),
        # The daemon's own CPU per object, receiving and forwarding: on a shared machine the stand-in's work
        # (verifying every signature, parsing every instance) competes for the same cores, HealthImaging's not.
        cpu_ms_per_object_forwarding=forwarding_cpu * 1000 / len(files),
        cpu_ms_per_object_plain=plain_cpu * 1000 / len(files),
    )


_RATES = (
    "forwarded_per_second",
    "received_per_second_forwarding",
    "received_per_second_plain",
    "instances_per_request",
    "cpu_ms_per_object_forwarding",
    "cpu_ms_per_object_plain",
)


def local_store(workdir: Path, files: list[Path], associations: int, stow: float, repeats: int) -> LocalRow:
    """Forwarding on, then off, ``repeats`` times: the medians, and every ForwardLatency of the runs."""
    runs = [_local_once(workdir / f"local-{associations}-{n}", files, associations, stow) for n in range(repeats)]
    return LocalRow(
        associations=associations,
        forward_latency=Latencies([value for run in runs for value in run.forward_latency.seconds]),
        **{name: statistics.median(getattr(run, name) for run in runs) for name in _RATES},
    )


# -- the run ------------------------------------------------------------------------------------------------------


def _warm_up(stand_in: s3.StandIn, files: list[Path]) -> None:
    """PUT every object once through the latency proxy, so that moto_server's and the proxy's first requests are
    not paid by whichever path is measured first."""
    client = boto3.client(
        "s3", endpoint_url=stand_in.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    client.create_bucket(Bucket="warm-up")
    for index, path in enumerate(files):
        client.put_object(Bucket="warm-up", Key=f"{index}.dcm", Body=path.read_bytes())
        client.delete_object(Bucket="warm-up", Key=f"{index}.dcm")


def run(parameters: Parameters) -> tuple[list[PathRow], list[LocalRow]]:
    paths, local = [], []
    after_manifest = parameters.workflow.recorded_after(parameters.job_seconds)
    with tempfile.TemporaryDirectory(prefix="bench-forwarding-") as directory:
        workdir = Path(directory)
        corpus = workdir / "corpus"
        corpus.mkdir()
        study = "2.25.27182818284590452353602874713526"
        paths_by_uid = {}
        for _ in range(parameters.files):
            path = make_instance(corpus, pixel_bytes=parameters.kib * 1024, study_uid=study)
            paths_by_uid[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
        runs = workdir / "runs"
        runs.mkdir()
        with s3.stand_in(parameters.s3_latency) as stand_in:
            _warm_up(stand_in, list(paths_by_uid.values()))
            for n in parameters.levels:
                forwarded, rate_on, forward_rate, cpu_on = forwarding_path(
                    runs, stand_in, paths_by_uid, n, parameters.stow_latency
                )
                window, rate_off, cpu_off = to_manifest(runs, stand_in, paths_by_uid, n)
                paths.append(
                    PathRow(n, forwarded, window, after_manifest, rate_on, rate_off, forward_rate, cpu_on, cpu_off)
                )
                print(f"x{n}: forwarding p50 {forwarded.p50:.2f} s, import job p50 {paths[-1].import_job.p50:.0f} s",
                      flush=True)  # fmt: skip
        for n in parameters.levels:
            local.append(
                local_store(workdir, list(paths_by_uid.values()), n, parameters.stow_latency, parameters.repeats)
            )
    return paths, local


def main() -> int:
    from bench.report import forwarding_section

    if sys.argv[1:2] == ["--stow-stand-in"]:
        _serve_stow(float(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parameters = Parameters.from_env()
    paths, local = run(parameters)
    sys.stdout.write(forwarding_section(paths, local, parameters) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
