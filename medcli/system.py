"""What this process may use of the machine it runs on (stdlib only).

`os.cpu_count()` is the host's core count. In a container or a batch job the process may be
pinned to fewer cores (affinity) or throttled to a CPU quota (cgroup `cpu.max` in v2,
`cpu.cfs_quota_us` / `cpu.cfs_period_us` in v1). One thread per usable core is the right
thread count; more threads than that spin-wait for cores the quota never grants.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup(root: Path, proc_cgroup: Path) -> list[Path]:
    """Candidate directories holding this process's CPU limits: its own cgroup, every one
    above it (a limit on a parent binds its children), and the root.

    A limit set outside a container is invisible from inside it (the container sees its
    cgroup as the root), so the root's files are read too."""
    candidates: list[Path] = []
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].strip("/")
        chain = [Path(*rel.split("/")[:depth]) for depth in range(len(rel.split("/")) if rel else 0, 0, -1)]
        if controllers == "":  # v2 unified hierarchy
            candidates += [root / folder for folder in chain]
        elif "cpu" in controllers.split(","):  # v1 cpu controller
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                candidates += [root / mount / folder for folder in chain]
                candidates.append(root / mount)
    candidates.append(root)
    seen: list[Path] = []
    for path in candidates:
        if path not in seen:
            seen.append(path)
    return seen


def _quota(directory: Path) -> float | None:
    """CPUs granted by the quota files in one cgroup directory, or None when unlimited."""
    v2 = _read(directory / "cpu.max")
    if v2:
        fields = v2.split()
        if fields[0] == "max":
            return None
        try:
            quota, period = float(fields[0]), float(fields[1]) if len(fields) > 1 else 100000.0
        except ValueError:  # not what the kernel writes: no limit we can read
            return None
        return quota / period if quota > 0 and period > 0 else None
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota and period:
        try:
            q, p = float(quota), float(period)
        except ValueError:
            return None
        if q > 0 and p > 0:
            return q / p
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup, its parents and the root, or None."""
    limits = [q for q in (_quota(d) for d in _own_cgroup(root, proc_cgroup)) if q is not None]
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Cores this process may run on: its affinity set, capped by the cgroup quota (rounded
    up: a 1.5-CPU quota keeps 2 threads busy), never less than 1."""
    cpus = _affinity()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
