"""How much of this machine imgtune may use."""

from __future__ import annotations

import os


def default_workers(cap: int = 8) -> int:
    """Worker processes for the CPUs this process may run on (cgroup/affinity aware), at most `cap`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cap, cpus))
