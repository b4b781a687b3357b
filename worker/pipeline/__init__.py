"""The worker's pipeline: one chunk of jobs, claim → prepare → compute → store → record.

Each stage is a module of its own; ``flow`` reads the whole path top to bottom; ``cpu`` holds the
CPU-bound work a pool of processes runs, ``artifacts`` the writing of an image's artifacts by that
pool, ``shard`` the shards layout's one write per few dozen jobs, ``clock`` the CPU time per stage. The public surface is
what the shells (``worker.tasks``, ``worker.local``, the producer's ``--local``) use.
"""

from worker.pipeline.flow import process_chunks, process_jobs
from worker.pipeline.record import ChunkReport, JobCallback
from worker.pipeline.runtime import Runtime

__all__ = ["ChunkReport", "JobCallback", "Runtime", "process_chunks", "process_jobs"]
