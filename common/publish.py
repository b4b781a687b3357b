"""Putting jobs on the queue: by task name, in chunks of one model, after the rows are committed.

Used by the producer (new batches, retries) and by workers (re-enqueueing jobs whose worker died).
A message carries the ids of up to ``chunk_size`` jobs of the same model, sent to that model's
queue, so a worker can fill a GPU batch from one message; the producer never imports worker code.
Publishing costs about half a millisecond of Python per message (Celery builds each message and
kombu opens a Redis client per publish); the work holds the GIL, so threads do not speed it up —
larger chunks do (``VITSCOPE_CHUNK_SIZE``).

A broker can lose its data — a Redis restarted without persistence, a managed failover, a
``FLUSHALL``, an eviction policy dropping keys under memory pressure — and with it every message
waiting on the queues, while the database still says those jobs are queued. So the broker holds a
marker key (``BROKER_MARKER_KEY``, no expiry) whose absence means it was emptied (or is new). Each
worker's reaper round, and each producer's publication of a batch, asks ``broker_lost_data``: the
one caller whose ``SET … NX`` recreates the marker publishes again every queued job of the
published distributed batches (``common.db.jobs.republish_queued``). A producer's publication
therefore never hides a loss from the workers: it only writes the marker where it also heals the
loss. Duplicates of messages that did survive cost a claim query each (claims are compare-and-set).
``eviction_warning`` tells ``worker start`` when Redis's ``maxmemory-policy`` could evict the queues
themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import groupby
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError
from kombu.utils.url import maybe_sanitize_url

from common.celery_app import TASK_PROCESS_JOBS
from common.db.records import QueuedImageJob, QueuedJob
from common.errors import BrokerUnavailableError

__all__ = [
    "BROKER_MARKER_KEY",
    "broker_lost_data",
    "check_broker",
    "chunk_jobs",
    "eviction_warning",
    "publish_jobs",
]

log = logging.getLogger(__name__)

# Created (never expired) by whoever first publishes to an empty broker; missing means the broker lost
# its data since. A ":" in the name keeps it apart from the queues (``vitscope.<family>`` lists).
BROKER_MARKER_KEY = "vitscope:broker-marker"
# Redis policies that may evict any key, queues and their messages included, under memory pressure.
EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def _redis_client(channel: object) -> Any | None:
    """The redis-py client of a kombu Redis channel; None for other transports (no marker there)."""
    return getattr(channel, "client", None) if type(channel).__module__ == "kombu.transport.redis" else None


def broker_lost_data(app: Celery) -> bool:
    """True when the broker's marker key was gone — the broker lost its data, or is new — and this
    caller recreated it (``SET NX``: of many callers at once, exactly one gets True, and it must publish
    every queued job again). False when the marker is there, or the transport is not Redis.
    ``BrokerUnavailableError`` when the broker cannot be reached or refuses the write.
    """
    try:
        with app.connection_for_write() as connection:
            _connect_once(connection)  # never kombu's minutes of retries: a reaper round must not stall
            client = _redis_client(connection.default_channel)
            if client is None:
                return False
            return bool(client.set(BROKER_MARKER_KEY, f"{time.time():.0f}", nx=True))
    except _broker_errors(app) as exc:
        raise BrokerUnavailableError(_describe(app, exc)) from exc


def _connect_once(connection: Any, timeout: float = 5.0) -> None:
    connection.ensure_connection(max_retries=1, interval_start=0.5, interval_step=0.5, timeout=timeout)


def eviction_warning(app: Celery) -> str | None:
    """A warning when the broker is a Redis whose ``maxmemory-policy`` may evict queue keys; None when
    it is safe, not Redis, or cannot be asked (unreachable: the worker will say so itself)."""
    try:
        with app.connection_for_write() as connection:
            _connect_once(connection)
            client = _redis_client(connection.default_channel)
            if client is None:
                return None
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except Exception as exc:  # CONFIG renamed or refused (managed Redis), or Redis down
        log.debug("could not read the broker's maxmemory-policy: %s", exc)
        return None
    if policy not in EVICTING_POLICIES:
        return None
    return (
        f"the broker's Redis has maxmemory-policy {policy}: under memory pressure it may evict the queues "
        "and their messages. Set maxmemory-policy noeviction (Redis then refuses new messages instead, and "
        "producer submit says so); workers publish lost jobs again, but only after noticing the loss."
    )


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
