"""The benchmark's report: each goal is judged against the reference's figure at the same concurrency, and the
S3-mode table sets each rate against the bound the request latency allows; a receiver counts as started only once
its own process tree listens on its port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from bench.__main__ import Run
from bench.receivers import REFERENCE, free_port, listens_on
from bench.report import GOALS, THIS, _targets, s3_section


def _run(receiver: str, concurrency: int, files_per_second: float) -> Run:
    return Run(receiver, concurrency, files=100, megabytes=52.0, seconds=100 / files_per_second, cpu_seconds=1.0,
               peak_pss_mib=60.0, verified=True)  # fmt: skip


def test_each_goal_is_a_ratio_to_the_reference_at_its_own_concurrency() -> None:
    assert GOALS == {1: 0.7, 16: 1.0, 64: 1.3}
    results = [
        _run(THIS, 1, 80), _run(REFERENCE, 1, 100),  # 0.80x, goal 0.7x
        _run(THIS, 16, 90), _run(REFERENCE, 16, 100),  # 0.90x, goal 1.0x
        _run(THIS, 64, 140), _run(REFERENCE, 64, 100),  # 1.40x, goal 1.3x
        _run("DCMTK storescp +B --fork", 16, 10),  # not the reference: never judged against
    ]  # fmt: skip
    lines = _targets(results, [], None)
    rows = {line.split(" | ")[0]: line for line in lines if "throughput" in line}
    assert rows["| throughput >= 0.7x DCMTK storescp +B at 1 association"].endswith("(0.80x) | yes |")
    assert rows["| throughput >= 1.0x DCMTK storescp +B at 16 associations"].endswith("(0.90x) | no |")
    assert rows["| throughput >= 1.3x DCMTK storescp +B at 64 associations"].endswith("(1.40x) | yes |")


def test_a_goal_without_both_figures_says_so() -> None:
    lines = _targets([_run(THIS, 1, 80)], [], None)
    assert any("at 1 association | not measured in this run" in line for line in lines)


def test_s3_rates_are_set_against_associations_over_latency() -> None:
    section = s3_section([(_run("this daemon, S3", 16, 80), 2.0)], [], latency=0.05, repeats=1)
    row = next(line for line in section.splitlines() if line.startswith("| 16 |"))
    # 16 associations / 0.05 s = 320 files/s at most; 80 of them is a quarter; moto's 2 s over 100 objects.
    assert row.split(" | ")[1:5] == ["80.0", "320", "25%", "10.0"]
    assert row.split(" | ")[5] == "20.0"


def test_a_receiver_counts_as_started_only_when_its_own_process_tree_listens_on_the_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as own:
        assert listens_on(os.getpid(), own.getsockname()[1])
    child = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys; s = socket.create_server(('127.0.0.1', 0));"
         " print(s.getsockname()[1], flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert listens_on(os.getpid(), port)  # a child's listener is the receiver's (storescp --fork)
        assert not listens_on(os.getpid(), free_port())  # a port this tree does not listen on
    finally:
        child.kill()
        child.wait()
