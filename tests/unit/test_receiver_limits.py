"""The counts several receiver processes share, and how many CPUs a process may use."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from scp.cpus import usable_cpus
from scp.limits import HEALTH_CHECK_RESERVE, REGULAR, RESERVED, SPARE_CONNECTIONS, Counts, Limits


def test_admissions_in_two_processes_count_against_one_limit() -> None:
    counts = Counts(2, shared=True)
    counts.starting(0)
    counts.starting(1)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # receiver 1 takes two of the three
        limits = Limits(3, counts, 1)
        admitted = [limits.admit(), limits.admit()]
        os.write(write, bytes(admitted))
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    assert os.read(read, 2) == b"\x01\x01"
    here = Limits(3, counts, 0)
    assert here.admit() and not here.admit()
    counts.ended(1)  # receiver 1 died: its admissions are free again
    assert here.admit() and here.admit() and not here.admit()


def test_a_process_killed_holding_the_lock_does_not_keep_it() -> None:
    counts = Counts(2, shared=True)
    child = os.fork()
    if child == 0:
        with counts.locked():
            time.sleep(60)
        os._exit(0)
    time.sleep(0.3)  # the child holds the lock by now
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    started = time.monotonic()
    assert Limits(1, counts, 0).admit()
    assert time.monotonic() - started < 1


def test_connections_beyond_the_limit_and_the_health_check_reserve_are_the_task_s() -> None:
    counts = Counts(2, shared=True)
    first, second = Limits(1, counts, 0), Limits(1, counts, 1)
    slots = [(first if n % 2 else second).take_connection("10.0.0.1") for n in range(1 + SPARE_CONNECTIONS)]
    assert slots == [REGULAR] * (1 + SPARE_CONNECTIONS)
    assert first.take_connection("10.0.0.1") is None and second.take_connection("10.0.0.1") is None
    reserved = [second.take_connection("127.0.0.1") for _ in range(HEALTH_CHECK_RESERVE)]
    assert reserved == [RESERVED] * HEALTH_CHECK_RESERVE
    assert first.take_connection("127.0.0.1") is None
    first.connection_ended(RESERVED)
    assert first.take_connection("127.0.0.1") == RESERVED


def test_the_least_loaded_live_receiver_accepts_next() -> None:
    counts = Counts(2, shared=True)
    counts.starting(0)
    counts.starting(1)
    first, second = Limits(8, counts, 0), Limits(8, counts, 1)
    first.serving()
    first.take_connection("10.0.0.1")
    assert first.least_loaded(), "the other is still starting"
    second.serving()
    assert not first.least_loaded() and second.least_loaded()
    first.connection_ended(REGULAR)
    assert first.least_loaded() and second.least_loaded()
    first.take_connection("10.0.0.1")
    assert not first.least_loaded() and second.least_loaded()
    counts.ended(1)  # a dead receiver's empty row is no reason to wait
    assert first.least_loaded()


def test_the_task_s_open_associations_for_the_gauge() -> None:
    counts = Counts(2, shared=True)
    assert Limits(8, counts, 0).open_associations(3) == 3
    assert Limits(8, counts, 1).open_associations(2) == 5


def write_cgroup(root: Path, relative: str, cpu_max: str) -> Path:
    directory = root / relative
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(cpu_max + "\n")
    return directory


def test_the_cgroup_quota_bounds_the_cpus(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    membership = tmp_path / "cgroup"
    membership.write_text("0::/task/container\n")
    root = tmp_path / "sys"
    write_cgroup(root, "task/container", "max 100000")
    assert usable_cpus(root, membership) == affinity
    # An ECS task's quota sits on the task's cgroup, above the container's.
    write_cgroup(root, "task", "100000 100000")
    assert usable_cpus(root, membership) == 1
    write_cgroup(root, "task", "150000 100000")
    assert usable_cpus(root, membership) == min(affinity, 1)
    write_cgroup(root, "task", "50000 100000")
    assert usable_cpus(root, membership) == 1, "a fraction of a CPU is still one process"
    write_cgroup(root, "task", "6400000 100000")
    assert usable_cpus(root, membership) == affinity


def test_the_cgroup_v1_quota_and_no_cgroup_at_all(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "nothing", tmp_path / "no-membership") == affinity
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path / "v1", tmp_path / "no-membership") == affinity
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(tmp_path / "v1", tmp_path / "no-membership") == 1
