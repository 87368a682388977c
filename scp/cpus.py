"""How many CPUs this process may use: its CPU affinity, bounded by the cgroup's CPU quota (what a container or an
ECS task is given, which may be less than the machine shows)."""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = _CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int:
    """At least 1. Without CPU affinity (not Linux) the answer is 1: several receiver processes need Linux."""
    if not hasattr(os, "sched_getaffinity"):
        return 1
    cpus = len(os.sched_getaffinity(0))
    quota = _quota(cgroup_root, membership)
    if quota is not None:
        # 1.5 CPUs of quota keep two processes busy only half the time each; round down, never below one.
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _quota(cgroup_root: Path, membership: Path) -> float | None:
    """The tightest CPU quota, in CPUs, of this process's cgroup and its ancestors (cgroup v2 ``cpu.max``, or v1's
    ``cpu.cfs_quota_us``); None when nothing limits it or nothing can be read."""
    quotas = [_v2_quota(directory) for directory in _v2_directories(cgroup_root, membership)]
    quotas.append(_v1_quota(cgroup_root / "cpu"))
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _v2_directories(cgroup_root: Path, membership: Path) -> list[Path]:
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return [cgroup_root]
    path = next((line[3:] for line in lines if line.startswith("0::")), "/")
    directory = cgroup_root / path.lstrip("/")
    # In a cgroup namespace (a container) the process's own cgroup is the root, and its parents are out of sight.
    directories = [directory, *directory.parents]
    return [d for d in directories if d == cgroup_root or cgroup_root in d.parents]


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    if quota.startswith("-"):  # -1: no quota
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        value = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None
