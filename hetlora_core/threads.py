"""How many torch threads a task should use: the CPUs it may run on, shared by the tasks that run
at the same time.

A pod's CPU limit is a cgroup quota, not a smaller CPU set: torch's default (one thread per visible
core) then oversubscribes it; two kfp.local tasks running at once on one machine each take every
core too. ``training.threads: 0`` (the default) means "decide here": CPUs from the cgroup quota
(v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``) and the affinity mask, divided by the number of tasks
the executor runs at once (``HETLORA_CONCURRENT_TASKS``, which the kfp.local executor sets on its
tasks; unset = 1, as for one pod). A runner that decides for its tasks (the bench's ``--threads``)
sets ``HETLORA_TASK_THREADS`` instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CONCURRENT_TASKS_ENV = "HETLORA_CONCURRENT_TASKS"
TASK_THREADS_ENV = "HETLORA_TASK_THREADS"


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota, or None when there is no quota."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q, p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if q.is_file() and p.is_file():
            quota_us = int(q.read_text())
            return None if quota_us <= 0 else quota_us / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> float:
    cpus = float(len(os.sched_getaffinity(0)))
    quota = cgroup_cpu_quota(root)
    return min(cpus, quota) if quota else cpus


def task_threads(requested: int, concurrent: int | None = None, cpus: float | None = None) -> int:
    """``requested`` (training.threads) when set, else ``HETLORA_TASK_THREADS`` when set, else
    floor(CPUs / concurrent tasks), at least 1."""
    if requested:
        return requested
    try:
        fixed = int(os.environ.get(TASK_THREADS_ENV, "0"))
    except ValueError:
        fixed = 0
    if fixed > 0:
        return fixed
    if concurrent is None:
        try:
            concurrent = max(1, int(os.environ.get(CONCURRENT_TASKS_ENV, "1")))
        except ValueError:
            concurrent = 1
    return max(1, math.floor((available_cpus() if cpus is None else cpus) / concurrent))
