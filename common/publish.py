"""Putting jobs on the queue: by task name, in chunks of one model, after the rows are committed.

Used by the producer (new batches, retries) and by workers (re-enqueueing jobs whose worker died).
A message carries the ids of up to ``chunk_size`` jobs of the same model, sent to that model's
queue, so a worker can fill a GPU batch from one message; the producer never imports worker code.
Publishing costs about half a millisecond of Python per message (Celery builds each message and
kombu opens a Redis client per publish); the work holds the GIL, so threads do not speed it up —
larger chunks do (``VITSCOPE_CHUNK_SIZE``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import groupby

from celery import Celery

from common.celery_app import TASK_PROCESS_JOBS
from common.db.records import QueuedJob

__all__ = ["chunk_jobs", "publish_jobs"]


def chunk_jobs(jobs: Iterable[QueuedJob], chunk_size: int) -> list[tuple[str, list[str]]]:
    """Group jobs into (queue, ids) chunks of one model and at most ``chunk_size`` ids."""
    chunks: list[tuple[str, list[str]]] = []
    ordered = sorted(jobs, key=lambda job: (job.queue, job.model))
    for (queue, _model), group in groupby(ordered, key=lambda job: (job.queue, job.model)):
        ids = [job.id for job in group]
        chunks += [(queue, ids[i : i + chunk_size]) for i in range(0, len(ids), chunk_size)]
    return chunks


def publish_jobs(
    app: Celery,
    jobs: Iterable[QueuedJob],
    *,
    chunk_size: int,
    on_published: Callable[[list[str]], None] | None = None,
) -> int:
    """Publish every job over one broker connection; returns the number of messages sent."""
    chunks = chunk_jobs(jobs, chunk_size)
    with app.producer_or_acquire() as producer:
        for queue, ids in chunks:
            # argsrepr: the ids are in the message anyway; Celery's safe repr of them costs more than
            # the rest of publishing.
            app.send_task(
                TASK_PROCESS_JOBS, args=[ids], queue=queue, producer=producer, argsrepr="", kwargsrepr=""
            )
            if on_published is not None:
                on_published(ids)
    return len(chunks)
