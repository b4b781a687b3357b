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
    """Pool processes for each of ``gpus`` workers on a host: one per core of its equal share, or
    none — decode and encode in the driving process's threads — when the share is a single core.

    Measured with ``bench/bench_pipeline.py --cpu-workers 0,1,2`` (null compute, SQLite): on one
    core 41.3 images/s with no pool against 33.2 with one process (a pool there only copies pixels
    between processes); on two cores 53.6 with two processes against 45.8 with one (one process
    serializes all decoding and encoding while the driving process waits for it).
    """
    cores = available_cores() if cores is None else cores
    share = cores // max(1, gpus)
    return share if share > 1 else 0
