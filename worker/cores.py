"""How many processes a worker's CPU pool gets: its GPU's share of the host's cores (no torch here,
so ``worker start`` can size pools without importing it)."""

from __future__ import annotations

import os

__all__ = ["available_cores", "cpu_workers_per_gpu"]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, as ``taskset`` or a container sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_workers_per_gpu(gpus: int, cores: int | None = None) -> int:
    """Pool processes for each of ``gpus`` workers on a host: half the cores of its equal share, or
    none — everything in the driving process's threads — when the share is a single core.

    The other half is the driving process's: its fetch threads decode and resize every image
    (GIL released) and it records the jobs, which costs as much CPU per image as the pool's
    drawing, encoding and writing. Measured with ``bench/bench_pipeline.py --cores 1,2
    --cpu-workers auto,1,2`` (null compute, SQLite, in memory): on two cores 196.7 images/s with one
    pool process against 178.6 with two (two pool processes and the driving one oversubscribe two
    cores: each image costs 11 ms of CPU instead of 8.6); on one core 122.3 with no pool against
    118.4 with one. Shares above two cores could not be measured on the 2-core test machine; the
    setting (``VITSCOPE_CPU_WORKERS``, ``worker start --cpu-workers``) overrides the sizing.
    """
    cores = available_cores() if cores is None else cores
    share = cores // max(1, gpus)
    return share // 2 if share > 1 else 0
