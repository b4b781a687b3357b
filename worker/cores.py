"""How many processes a worker's CPU pool gets: its GPU's share of the host's cores (no torch here,
so ``worker start`` can size pools without importing it)."""

from __future__ import annotations

import os
import sys
import threading

__all__ = [
    "PIPELINE_NICENESS",
    "WAIT_POLICY",
    "available_cores",
    "cpu_workers_per_gpu",
    "decode_threads",
    "wait_passively_in_openmp",
    "yield_cores_to_the_model",
]

# The OpenMP wait policy of the processes that run the pipeline (``wait_passively_in_openmp``).
WAIT_POLICY = "PASSIVE"
# How far a CPU worker's pipeline threads step back for the model's threads (``nice`` units).
PIPELINE_NICENESS = 10


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


def decode_threads(cpu_workers: int, cores: int) -> int:
    """Images decoded at once by a worker whose ``cores`` also run ``cpu_workers`` pool processes:
    the cores the pool leaves, at least one.

    Decoding is CPU-bound (GIL released): a thread more than the free cores only contends with the
    pool for them. Measured with ``bench/bench_pipeline.py --modes null --cores 2 --images 1024
    --repeat 5`` (SQLite, one pool process): one image at a time 230.2 images/s (226.7-234.1), two
    214.8 (203.9-228.9), eight (every fetch thread) 194.4.
    """
    return max(1, cores - cpu_workers)


def yield_cores_to_the_model() -> None:
    """Lower the calling thread's scheduling priority by ``PIPELINE_NICENESS``: the initializer of
    the fetch, store and record threads of a worker whose model runs on the CPU.

    There the model's OpenMP threads and the pipeline's threads (decoding, drawing, uploading,
    recording) share the same cores, and a parallel region ends only when its slowest thread does:
    each time a pipeline thread takes one of the cores, the whole forward or backward pass waits.
    At a lower priority the pipeline runs when a model thread sleeps, and the bounded queues between
    the stages keep it from falling behind. Measured with one Celery worker on S3 + PostgreSQL on two
    cores (deit_tiny, 128 images, five interleaved pairs): +3 to +8 % images/s, every pair faster.
    On a GPU worker the model's threads mostly wait for the device, so nothing changes there.

    Linux only (per-thread ``nice`` values); elsewhere, or where it is refused, a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PIPELINE_NICENESS)
        )
    except OSError:
        pass


def wait_passively_in_openmp() -> None:
    """Make this process's OpenMP threads sleep at once after each parallel region, unless the
    environment already names a policy (``OMP_WAIT_POLICY``). For entry points only, before torch
    loads (OpenMP reads the variable when it starts): ``worker start`` (and so the Celery workers it
    execs or spawns) and ``producer submit --local`` / ``producer resume`` of a local batch.

    By default an OpenMP thread spins for a while after each parallel region of the model's CPU
    kernels, burning a core the pipeline's decoding, encoding and uploading threads need: on two
    cores, ``producer submit --local`` of deit_tiny kept 84 % of the compute-alone rate with
    spinning threads and 93-100 % with passive ones (``bench/bench_end_to_end.py``). Passive threads
    cost the compute core alone 15-20 % when nothing else runs, which is why importing the worker
    (a notebook using ``vitscope.explain_image``, say) does not set it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
