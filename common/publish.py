"""Putting jobs on the queue: by task name, in chunks of one model, after the rows are committed.

Used by the producer (new batches, retries) and by workers (re-enqueueing jobs whose worker died).

A message carries the ids of up to ``chunk_size`` jobs of the same model, sent to that model's
queue, so a worker can fill a GPU batch from one message; the producer never imports worker code.
One broker connection is reused for every message, which is what makes a 100,000-job submit take
seconds.
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
    """Publish every job; returns the number of messages sent."""
    chunks = chunk_jobs(jobs, chunk_size)
    with app.producer_or_acquire() as producer:
        for queue, ids in chunks:
            app.send_task(TASK_PROCESS_JOBS, args=[ids], queue=queue, producer=producer)
            if on_published is not None:
                on_published(ids)
    return len(chunks)
