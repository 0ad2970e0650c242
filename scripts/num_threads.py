#!/usr/bin/env python3
"""Print how many threads one torch process should use here: half the CPUs this process may run on (at least 1),
fewer under a cgroup CPU quota. The Makefile exports it as OMP_NUM_THREADS for `make run` and `make demo`.

torch starts one thread per CPU it sees. On 2 cores shared with other work that oversubscribes them: `make run` was
stopped after 20 minutes at 3-15 s a step, and took 3:43 with one thread. The small models of those targets gain
little from more threads, so half the CPUs leaves the rest to the machine's other work.

Standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import os
import sys


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (``cpu.max``) where one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as quota_file:
            quota, period = quota_file.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def suggested_threads(cpus: int) -> int:
    """Half of ``cpus``, at least 1: ``suggested_threads(2) == 1``, ``suggested_threads(16) == 8``."""
    return max(1, cpus // 2)


if __name__ == "__main__":
    print(suggested_threads(available_cpus()))
    sys.exit(0)
