"""`make bench`: DCMTK storescu sends one corpus to each receiver at 1, 4, 16 and 64 associations, then to this
daemon in S3 mode at 1, 16 and 64; the time to HealthImaging by StoreDICOM forwarding and by the import job; report
and chart.

Settings (environment): BENCH_FILES (slices, default 400), BENCH_REPEATS (default 3), BENCH_CONCURRENCY
(default 1,4,16,64), BENCH_RECEIVERS (comma-separated name prefixes, default all), BENCH_LARGE (default 1: also
one 256 MiB and one 1 GiB multi-frame object, sent alone to this daemon to measure peak memory; 0 skips them),
BENCH_PROFILE (default 1: py-spy profile of this daemon at 16 associations), BENCH_HELD (associations held at
once, default 300), BENCH_SOURCE (the tree whose daemon is measured), BENCH_S3 (default 1: the S3 mode; 0 skips
it), BENCH_S3_FILES (default 200), BENCH_S3_CONCURRENCY (default 1,16,64), BENCH_S3_LATENCY (seconds added to
every S3 request, default 0.05; bench/s3.py gives its source), BENCH_FORWARDING (default 1: the time to
HealthImaging, 4 to 5 minutes; 0 skips it; bench/forwarding.py gives its own settings). The daemon's own settings
(the README's configuration table) in the environment reach every daemon the bench starts, so a setting under
evaluation is measured by exporting it.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench import corpus, forwarding, read_path, report, s3
from bench.receivers import AE_TITLE, REPOSITORY, Receiver, ThisDaemon, all_receivers

BUILD = REPOSITORY / "build" / "bench"
RESULTS = REPOSITORY / "bench" / "results"
SAMPLE_SECONDS = 0.05


@dataclass
class Run:
    receiver: str
    concurrency: int
    files: int
    megabytes: float
    seconds: float
    cpu_seconds: float
    peak_pss_mib: float
    verified: bool
    problem: str = ""

    @property
    def files_per_second(self) -> float:
        return self.files / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.megabytes / self.seconds


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _memory(process: psutil.Process) -> int:
    """The process's proportional set size: its own pages, and each page it shares divided among the processes
    sharing it. Summed over a tree of forked processes (this daemon's receivers, storescp --fork) the pages they
    share since the fork count once, as the container's memory is charged; summed RSS would count them in each."""
    return int(process.memory_full_info().pss)


def _cpu(process: psutil.Process) -> float:
    """The receiver's own CPU seconds plus those of the children it has reaped (storescp --fork)."""
    times = process.cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def _send(receiver: Receiver, files: list[corpus.CorpusFile], concurrency: int) -> tuple[float, float, float, str]:
    """storescu processes, one association each; returns (wall seconds, CPU seconds, peak tree PSS MiB, errors)."""
    assert receiver.process is not None
    root = psutil.Process(receiver.process.pid)
    slices = [files[n::concurrency] for n in range(concurrency)]
    cpu_before = _cpu(root)
    live_cpu: dict[int, float] = {}
    peak = 0.0
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", AE_TITLE, "-to", "60", "127.0.0.1", str(receiver.port),
             *(str(f.path) for f in part)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        for part in slices
        if part
    ]
    while any(sender.poll() is None for sender in senders):
        memory = 0
        for process in _tree(root):
            try:
                memory += _memory(process)
                if process.pid != root.pid:
                    live_cpu[process.pid] = _cpu(process)
            except psutil.NoSuchProcess:
                continue
        peak = max(peak, memory / 2**20)
        time.sleep(SAMPLE_SECONDS)
    seconds = time.monotonic() - started
    errors = "; ".join(
        sender.stderr.read().decode(errors="replace").strip()[-300:]
        for sender in senders
        if sender.returncode != 0 and sender.stderr
    )
    for sender in senders:
        if sender.stderr:
            sender.stderr.close()
    time.sleep(0.3)  # let a forking receiver reap its last children
    reaped = _cpu(root) - cpu_before
    unreaped = sum(cpu for pid, cpu in live_cpu.items() if psutil.pid_exists(pid))
    return seconds, reaped + unreaped, peak, errors


def measure(receiver: Receiver, files: list[corpus.CorpusFile], concurrency: int) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=BUILD))
    try:
        receiver.start(workdir)
        try:
            seconds, cpu, peak, errors = _send(receiver, files, concurrency)
        finally:
            receiver.stop()
        received = receiver.received()
        expected = {f.sop_instance_uid: f.pixel_sha256 for f in files}
        verified = received == expected
        problem = errors
        if not verified:
            missing = len(set(expected) - set(received))
            differing = sum(1 for uid, digest in received.items() if expected.get(uid) not in (None, digest))
            problem = f"{missing} missing, {differing} differ; {errors}"[:400]
        megabytes = sum(f.size for f in files) / 1e6
        return Run(receiver.name, concurrency, len(files), megabytes, seconds, cpu, peak, verified, problem)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def median_run(runs: list[Run]) -> Run:
    good = [run for run in runs if run.verified] or runs
    ordered = sorted(good, key=lambda run: run.seconds)
    middle = ordered[len(ordered) // 2]
    return Run(
        middle.receiver, middle.concurrency, middle.files, middle.megabytes,
        statistics.median(run.seconds for run in good), statistics.median(run.cpu_seconds for run in good),
        statistics.median(run.peak_pss_mib for run in good), all(run.verified for run in runs),
        "; ".join(run.problem for run in runs if run.problem)[:400],
    )  # fmt: skip


# Frames of the large objects: 512 KiB each, so 256 MiB and 1 GiB.
LARGE_FRAMES = (512, 2048)


def large_objects(source: Path) -> list[Run]:
    files = corpus.build(BUILD / "corpus-large", 0, LARGE_FRAMES)
    return [measure(ThisDaemon(source), [file], 1) for file in files]


def _report_line(result: Run) -> None:
    print(f"{result.receiver:24} x{result.concurrency:<3} {result.files_per_second:7.1f} files/s "
          f"{result.cpu_seconds:6.1f} CPU s {result.peak_pss_mib:7.1f} MiB "
          f"{'ok' if result.verified else 'NOT VERIFIED ' + result.problem}", flush=True)  # fmt: skip


def s3_mode(
    source: Path, files: list[corpus.CorpusFile], levels: list[int], repeats: int, latency: float, large: bool
) -> tuple[list[tuple[Run, float]], list[Run]]:
    """This daemon storing to S3 through the latency proxy: the corpus at each level (with the median CPU seconds
    of the stand-in), then the 256 MiB object alone."""
    results, large_runs = [], []
    with s3.stand_in(latency) as stand_in:
        receiver = s3.S3Daemon(stand_in, source)
        for concurrency in levels:
            receiver.stand_in_cpu.clear()
            result = median_run([measure(receiver, files, concurrency) for _ in range(repeats)])
            results.append((result, statistics.median(receiver.stand_in_cpu)))
            _report_line(result)
        if large:
            large_file = corpus.build(BUILD / "corpus-large", 0, LARGE_FRAMES[:1])[0]
            large_runs.append(measure(receiver, [large_file], 1))
    return results, large_runs


def held_associations(source: Path, count: int) -> tuple[int, float, float]:
    """``count`` associations established and held at once: (how many were accepted, seconds, peak tree PSS MiB)."""
    from tests.robustness.wire import A_ASSOCIATE_AC, Peer, associate_rq

    receiver = ThisDaemon(source)
    workdir = Path(tempfile.mkdtemp(prefix="bench-held-", dir=BUILD))
    receiver.start(workdir)
    assert receiver.process is not None
    root = psutil.Process(receiver.process.pid)
    peers: list[Peer] = []
    try:
        started = time.monotonic()
        for _ in range(count):
            peer = Peer(receiver.port, timeout=120)
            peer.send(associate_rq(called=AE_TITLE))
            peers.append(peer)
        accepted = sum(1 for peer in peers if (answer := peer.receive(120)) and answer.pdu_type == A_ASSOCIATE_AC)
        seconds = time.monotonic() - started
        peak = 0.0
        for _ in range(5):
            peak = max(peak, sum(_memory(process) for process in _tree(root)) / 2**20)
            time.sleep(0.2)
        return accepted, seconds, peak
    finally:
        for peer in peers:
            peer.close()
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def profile(source: Path, files: list[corpus.CorpusFile], concurrency: int) -> Path | None:
    """py-spy samples this daemon while it receives the corpus; returns the collapsed stacks file."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return None
    receiver = ThisDaemon(source)
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-", dir=BUILD))
    stacks = BUILD / "profile.collapsed"
    receiver.start(workdir)
    assert receiver.process is not None
    sampler = subprocess.Popen(
        [py_spy, "record", "--pid", str(receiver.process.pid), "--format", "raw", "--output", str(stacks),
         "--rate", "200", "--subprocesses", "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    try:
        _send(receiver, files, concurrency)
    finally:
        sampler.send_signal(2)
        sampler.wait(timeout=60)
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return stacks if stacks.exists() else None


def _label(source: Path) -> str:
    """The measured tree: its commit when it is a git checkout (with a mark when it has local changes)."""
    commit = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return f"commit {commit}" if commit else str(source)


def machine() -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    disk = subprocess.run(["df", "-h", str(BUILD)], capture_output=True, text=True, check=False).stdout.splitlines()
    versions = {
        "dcmtk": subprocess.run(["storescp", "--version"], capture_output=True, text=True, check=False).stdout,
        "orthanc": subprocess.run(["Orthanc", "--version"], capture_output=True, text=True, check=False).stdout
        if shutil.which("Orthanc") else "not installed",
    }  # fmt: skip
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores",
        "Memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "Kernel": platform.release(),
        "Python": platform.python_version(),
        "Filesystem": disk[-1] if disk else "",
        "DCMTK": next((line for line in versions["dcmtk"].splitlines() if "dcmtk" in line.lower()), "?").strip(),
        "Orthanc": versions["orthanc"].splitlines()[0] if versions["orthanc"] else "?",
    }


def main() -> None:
    count = int(os.environ.get("BENCH_FILES", "400"))
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    levels = [int(n) for n in os.environ.get("BENCH_CONCURRENCY", "1,4,16,64").split(",")]
    wanted = [w.strip().lower() for w in os.environ.get("BENCH_RECEIVERS", "").split(",") if w.strip()]
    source = Path(os.environ.get("BENCH_SOURCE", REPOSITORY)).resolve()
    BUILD.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    files = corpus.build(BUILD / "corpus", count)
    receivers = [r for r in all_receivers(source) if not wanted or any(r.name.lower().startswith(w) for w in wanted)]
    results: list[Run] = []
    started = time.monotonic()
    for concurrency in levels:
        for receiver in receivers:
            if not receiver.available:
                continue
            runs = []
            for _ in range(repeats):
                try:
                    runs.append(measure(receiver, files, concurrency))
                except RuntimeError as error:
                    receiver.note = f"could not run: {error}"[:200]
                    break
            if runs:
                result = median_run(runs)
                results.append(result)
                _report_line(result)
    with_large = os.environ.get("BENCH_LARGE", "1") == "1"
    large = large_objects(source) if with_large else []
    for run in large:
        print(f"large object {run.megabytes:.0f} MB: peak PSS {run.peak_pss_mib:.1f} MiB, verified {run.verified}")
    sections = [read_path.compare()]
    if os.environ.get("BENCH_S3", "1") == "1":
        latency = float(os.environ.get("BENCH_S3_LATENCY", str(s3.DEFAULT_LATENCY_SECONDS)))
        s3_levels = [int(n) for n in os.environ.get("BENCH_S3_CONCURRENCY", "1,16,64").split(",")]
        s3_files = files[: int(os.environ.get("BENCH_S3_FILES", "200"))]
        s3_results, s3_large = s3_mode(source, s3_files, s3_levels, repeats, latency, with_large)
        for run in s3_large:
            print(f"S3, large object {run.megabytes:.0f} MB: {run.seconds:.1f} s, peak PSS {run.peak_pss_mib:.1f} MiB,"
                  f" verified {run.verified}")  # fmt: skip
        sections.insert(0, report.s3_section(s3_results, s3_large, latency, repeats))
    if os.environ.get("BENCH_FORWARDING", "1") == "1":
        parameters = forwarding.Parameters.from_env()
        sections.append(report.forwarding_section(*forwarding.run(parameters), parameters))
    held = held_associations(source, int(os.environ.get("BENCH_HELD", "300")))
    print(f"held associations: {held[0]} accepted in {held[1]:.1f} s, peak PSS {held[2]:.0f} MiB")
    stacks = profile(source, files, 16) if os.environ.get("BENCH_PROFILE", "1") == "1" else None
    report.write(
        RESULTS, results, large, receivers, machine(), stacks, sections,
        {"files": count, "repeats": repeats, "levels": levels, "minutes": (time.monotonic() - started) / 60,
         "source": _label(source), "held": held},
    )  # fmt: skip
    print(f"report: {RESULTS / 'REPORT.md'}")


if __name__ == "__main__":
    main()
