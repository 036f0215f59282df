"""Per-core accounting of the input benchmarks: pinning to cores, the CPU seconds a
process and its worker processes used, and the rates of one table row."""

from __future__ import annotations

import os
import time


def pin_cores(count: int) -> int:
    """Narrows the CPU affinity to `count` cores (call before JAX starts).

    Args:
      count: cores to keep; 0 leaves the affinity as it is.

    Returns:
      The number of cores in the affinity set afterwards.
    """
    cores = sorted(os.sched_getaffinity(0))
    if count > len(cores):
        raise ValueError(f"--cores {count} asks for more than the {len(cores)} cores available")
    if count > 0:
        os.sched_setaffinity(0, cores[:count])
    return len(os.sched_getaffinity(0))


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found + [g for c in found for g in _children(c)]


def _proc_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # the process ended; its time is lost to us, not counted twice
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live child processes.

    Returns:
      User + system time; children (Grain workers) are read from /proc on Linux.
    """
    return time.process_time() + sum(_proc_cpu_seconds(c) for c in _children(os.getpid()))


def rate_row(bench: str, config: str, clips: int, wall: float, cpu: float, cores: int) -> dict:
    """One table row: `clips` in `wall` seconds, per second, per core and per CPU-second."""
    rate = clips / wall
    return {"bench": bench, "config": config, "clips_per_s": rate, "cores": cores,
            "clips_per_s_per_core": rate / cores,
            "clips_per_cpu_s": clips / cpu if cpu > 0 else float("nan")}
