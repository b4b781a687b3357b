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
    """Pool processes for each of ``gpus`` workers on a host: an equal share of the cores, less one
    for the process that drives the GPU (it runs the model, the uploads and the database).

    0 — decode and encode in the driving process's threads — when a GPU's share is a single core: a
    pool there only adds the copying of pixels between processes (``bench/bench_pipeline.py`` on one
    core: 39.6 images/s inline against 33.1 with one pool process)."""
    cores = available_cores() if cores is None else cores
    return max(0, cores // max(1, gpus) - 1)
