"""Putting jobs on the queue: by task name, in chunks of one model, after the rows are committed.

Used by the producer (new batches, retries) and by workers (re-enqueueing jobs whose worker died).
A message carries the ids of up to ``chunk_size`` jobs of the same model, sent to that model's
queue, so a worker can fill a GPU batch from one message; the producer never imports worker code.
Publishing costs about half a millisecond of Python per message (Celery builds each message and
kombu opens a Redis client per publish); the work holds the GIL, so threads do not speed it up —
larger chunks do (``VITSCOPE_CHUNK_SIZE``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import groupby

from celery import Celery
from kombu.exceptions import KombuError
from kombu.utils.url import maybe_sanitize_url

from common.celery_app import TASK_PROCESS_JOBS
from common.db.records import QueuedImageJob, QueuedJob
from common.errors import BrokerUnavailableError

__all__ = ["check_broker", "chunk_jobs", "publish_jobs"]


def _broker_errors(app: Celery) -> tuple[type[BaseException], ...]:
    """What the broker's client raises when it is down or refuses a message (transport-specific)."""
    with app.connection_for_write() as connection:
        return (KombuError, OSError, *connection.connection_errors, *connection.channel_errors)


def _describe(app: Celery, exc: BaseException) -> str:
    where = maybe_sanitize_url(app.conf.broker_url)  # the password masked
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"message broker {where} unavailable: {reason}"


def check_broker(app: Celery, *, timeout: float = 5.0) -> None:
    """Connect to the broker once (within ``timeout`` seconds) or raise ``BrokerUnavailableError``.

    The producer asks before committing a batch, so an unreachable broker costs nothing to undo.
    """
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(
                max_retries=1, interval_start=0.5, interval_step=0.5, timeout=timeout
            )
        except _broker_errors(app) as exc:
            raise BrokerUnavailableError(_describe(app, exc)) from exc


# A run of jobs repeating one image may stretch a chunk to this many times ``chunk_size``.
MAX_STRETCH = 4


def chunk_jobs(
    jobs: Iterable[QueuedJob | QueuedImageJob], chunk_size: int
) -> Iterator[tuple[str, list[str]]]:
    """(queue, ids) chunks of one model, from jobs grouped by model; the input is a stream.

    A chunk holds ``chunk_size`` ids, except that a run of consecutive jobs naming the same image
    (``QueuedImageJob``s; plain ``QueuedJob``s carry no URI) is not split across two messages (two workers would each compute it) until the chunk reaches
    ``MAX_STRETCH`` times that size, which bounds a message however repetitive the dataset.
    """
    for (queue, _model), group in groupby(jobs, key=lambda job: (job.queue, job.model)):
        ids: list[str] = []
        previous: str | None = None
        for job in group:
            image_uri = job.image_uri if isinstance(job, QueuedImageJob) else None
            repeats = image_uri is not None and image_uri == previous
            if len(ids) >= chunk_size and (not repeats or len(ids) >= MAX_STRETCH * chunk_size):
                yield queue, ids
                ids = []
            ids.append(job.id)
            previous = image_uri
        if ids:
            yield queue, ids


def publish_jobs(
    app: Celery,
    jobs: Iterable[QueuedJob | QueuedImageJob],
    *,
    chunk_size: int,
    on_published: Callable[[list[str]], None] | None = None,
    grouped: bool = False,
) -> int:
    """Publish every job over one broker connection; returns the number of messages sent.

    Jobs are sorted by model first unless ``grouped`` says they arrive grouped already (a stream
    from the database in model order, which sorting would have to hold in memory).
    ``BrokerUnavailableError`` when the broker is down or refuses a message (Celery has already
    retried the publish a few times by then); earlier chunks may have been sent.
    """
    if not grouped:
        jobs = sorted(jobs, key=lambda job: (job.queue, job.model))
    messages = 0
    try:
        with app.producer_or_acquire() as producer:
            for queue, ids in chunk_jobs(jobs, chunk_size):
                # argsrepr: the ids are in the message anyway; Celery's safe repr of them costs more
                # than the rest of publishing.
                app.send_task(
                    TASK_PROCESS_JOBS, args=[ids], queue=queue, producer=producer, argsrepr="", kwargsrepr=""
                )
                messages += 1
                if on_published is not None:
                    on_published(ids)
    except _broker_errors(app) as exc:
        raise BrokerUnavailableError(_describe(app, exc)) from exc
    return messages
