"""The life of one job: claimed under a lease, renewed, finished, failed, or recovered.

Every state change is a compare-and-set ``UPDATE … WHERE <expected state> RETURNING id``, so two
workers racing for a job cannot both win, and a worker whose lease was taken over cannot overwrite
the new owner's result. Result rows are inserted with ``ON CONFLICT … DO NOTHING`` on their natural
keys, so a retried transaction is harmless. (psycopg 3 reports ``rowcount`` as -1 for some
statements; never count on it — count what RETURNING returns.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db._sql import chunks, dialect_insert
from common.db.models import Artifact, Batch, Job, JobMetric, JobState, Prediction, utcnow
from common.db.records import (
    ArtifactRecord,
    JobOutcome,
    MetricRecord,
    PredictionRecord,
    QueuedJob,
    WorkerIdentity,
)

__all__ = [
    "claim_jobs",
    "find_reusable",
    "find_reusables",
    "interrupted_jobs",
    "lost_worker_reason",
    "reap_expired",
    "record_failure",
    "record_reuse",
    "record_successes",
    "release_batch",
    "release_jobs",
    "renew_leases",
    "republish_queued",
    "republish_stale",
    "stale_queued_filter",
]


def _compare_and_set(session: Session, where: Sequence[Any], values: dict[str, Any]) -> list[str]:
    stmt = (
        sa.update(Job)
        .where(*where)
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.scalars(stmt).all())


def lost_worker_reason(owner: str | None, attempts: int, interruptions: int) -> str:
    """Why a job failed without a recorded error: its workers kept dying (or going silent) on it."""
    return (
        f"worker died while processing this job {interruptions} time(s) (last: {owner or 'unknown'}); "
        f"gave up after {attempts} attempt(s). An image that crashes the decoder or exhausts memory "
        "does this."
    )


def claim_jobs(
    session: Session,
    job_ids: Sequence[str],
    *,
    worker: WorkerIdentity,
    lease_seconds: float,
    max_attempts: int,
    is_dead: Callable[[str], bool] | None = None,
    reclaim_own: bool = False,
    now: datetime | None = None,
) -> list[Job]:
    """Take ownership of the given jobs that nobody live owns: ``queued → running``.

    Claimable: queued jobs, running jobs whose lease expired, running jobs whose owner is a
    process on this host that ``is_dead(worker_id)`` reports gone — the case of a worker child killed
    mid-chunk whose message the broker redelivers at once; waiting out its lease would stall the chunk.
    Taking over a running job counts an interruption on it (its last attempt ended with its worker
    gone). With ``reclaim_own`` — the caller holds no job, so any it owns was abandoned by an earlier
    chunk of this same process, e.g. after the database dropped mid-chunk — its own running jobs are
    claimable too, without an interruption. Jobs out of attempts are not claimed; those whose owner
    is gone are failed here at once with ``lost_worker_reason`` rather than left for the reaper.
    Returns the claimed jobs in the order asked for.
    """
    now = now or utcnow()
    values = {
        "state": JobState.RUNNING.value,
        "attempts": Job.attempts + 1,
        "interruptions": sa.case(
            (Job.state == JobState.RUNNING, Job.interruptions + 1), else_=Job.interruptions
        ),
        "worker_host": worker.hostname,
        "worker_id": worker.worker_id,
        "started_at": now,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
    }
    claimable = sa.or_(
        Job.state == JobState.QUEUED,
        sa.and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
    )
    claimed: list[str] = []
    for chunk in chunks(list(job_ids)):
        claimed += _compare_and_set(
            session, [Job.id.in_(chunk), Job.attempts < max_attempts, claimable], values
        )
    if reclaim_own:
        own = [Job.state == JobState.RUNNING, Job.worker_id == worker.worker_id, Job.attempts < max_attempts]
        for chunk in chunks(sorted(set(job_ids) - set(claimed))):
            claimed += _compare_and_set(
                session, [Job.id.in_(chunk), *own], values | {"interruptions": Job.interruptions}
            )
    rest = sorted(set(job_ids) - set(claimed))
    gone = _gone_owners(
        session, rest, host=worker.hostname, is_dead=is_dead, now=now, exclude=worker.worker_id
    )
    for job_id, owner, attempts, interruptions in gone:
        where = [Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == owner]
        if attempts < max_attempts:
            claimed += _compare_and_set(session, where, values)
        else:
            _compare_and_set(session, where, _failed_lost(owner, attempts, interruptions + 1, now))
    if not claimed:
        return []
    query = sa.select(Job).where(Job.id.in_(claimed)).execution_options(populate_existing=True)
    order = {job_id: i for i, job_id in enumerate(job_ids)}
    return sorted(session.scalars(query), key=lambda job: order[job.id])


def _gone_owners(
    session: Session,
    job_ids: Sequence[str],
    *,
    host: str,
    is_dead: Callable[[str], bool] | None,
    now: datetime,
    exclude: str | None = None,
) -> list[tuple[str, str | None, int, int]]:
    """(id, owner, attempts, interruptions) of the running jobs among ``job_ids`` whose owner is gone:
    lease expired, or a dead process on ``host``."""
    if not job_ids:
        return []
    gone: list[tuple[str, str | None, int, int]] = []
    for chunk in chunks(list(job_ids)):
        rows = session.execute(
            sa.select(
                Job.id, Job.worker_id, Job.worker_host, Job.lease_expires_at, Job.attempts, Job.interruptions
            ).where(Job.id.in_(chunk), Job.state == JobState.RUNNING)
        ).all()
        for job_id, owner, owner_host, lease, attempts, interruptions in rows:
            if owner == exclude:
                continue
            expired = lease is not None and lease < now
            dead = bool(is_dead is not None and owner_host == host and owner and is_dead(owner))
            if expired or dead:
                gone.append((job_id, owner, attempts, interruptions))
    return gone


def _failed_lost(owner: str | None, attempts: int, interruptions: int, now: datetime) -> dict[str, Any]:
    return {
        "state": JobState.FAILED.value,
        "finished_at": now,
        "lease_expires_at": None,
        "interruptions": interruptions,
        "error_class": "WorkerLostError",
        "error_message": lost_worker_reason(owner, attempts, interruptions),
    }


def interrupted_jobs(
    session: Session,
    job_ids: Sequence[str],
    *,
    host: str,
    is_dead: Callable[[str], bool] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """The unfinished jobs among ``job_ids`` that a worker already died on — counted interruptions,
    or right now running under a gone owner (the chunk a killed worker held, redelivered).

    These are the suspects when a worker keeps dying: the task shell processes them one per message,
    so a poison image spends only its own attempts, not its chunk neighbours'.
    """
    now = now or utcnow()
    suspects = {
        job_id
        for chunk in chunks(list(job_ids))
        for job_id in session.scalars(
            sa.select(Job.id).where(
                Job.id.in_(chunk),
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                Job.interruptions > 0,
            )
        )
    }
    suspects |= {row[0] for row in _gone_owners(session, job_ids, host=host, is_dead=is_dead, now=now)}
    return [job_id for job_id in job_ids if job_id in suspects]


def renew_leases(
    session: Session,
    job_ids: Sequence[str],
    *,
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[str]:
    """Extend the leases this worker still holds; returns the ids it still owns."""
    now = now or utcnow()
    values = {"lease_expires_at": now + timedelta(seconds=lease_seconds)}
    owned: list[str] = []
    for chunk in chunks(list(job_ids)):
        where = [Job.id.in_(chunk), Job.state == JobState.RUNNING, Job.worker_id == worker_id]
        owned += _compare_and_set(session, where, values)
    return owned


def release_jobs(session: Session, job_ids: Sequence[str], *, worker_id: str) -> list[str]:
    """Hand claimed, unfinished jobs back to the queue (graceful shutdown): the attempt does not count."""
    values = {
        "state": JobState.QUEUED.value,
        "requeued_at": utcnow(),
        "attempts": sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
        "lease_expires_at": None,
        "worker_id": None,
    }
    released: list[str] = []
    for chunk in chunks(list(job_ids)):
        where = [Job.id.in_(chunk), Job.state == JobState.RUNNING, Job.worker_id == worker_id]
        released += _compare_and_set(session, where, values)
    return released


def release_batch(session: Session, batch_id: str, *, worker_id: str) -> list[str]:
    """``release_jobs`` for every job of the batch this worker still holds: an interrupted local run
    (Ctrl-C) hands its jobs in hand back to the queue, without charging them an attempt."""
    held = session.scalars(
        sa.select(Job.id).where(
            Job.batch_id == batch_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id
        )
    ).all()
    return release_jobs(session, list(held), worker_id=worker_id)


def reap_expired(
    session: Session,
    *,
    max_attempts: int,
    host: str | None = None,
    is_dead: Callable[[str], bool] | None = None,
    batch_id: str | None = None,
    now: datetime | None = None,
    limit: int = 10_000,
) -> tuple[list[QueuedJob], list[str]]:
    """Recover jobs whose worker vanished: back to queued, or failed after max_attempts.

    Vanished means the lease expired — or, given ``host`` and ``is_dead``, that the owner is a process
    on that host which no longer exists (a restarted worker recovers its predecessor's jobs at once
    instead of after the lease; ``producer resume`` those of a local run killed with SIGKILL). Either
    way it counts an interruption on the job. ``batch_id`` limits it to one batch. Returns (jobs
    requeued — to be published again, ids failed for good).
    """
    now = now or utcnow()
    columns = (Job.id, Job.model, Job.queue, Job.attempts, Job.worker_id, Job.interruptions)
    scope = [Job.state == JobState.RUNNING] + ([Job.batch_id == batch_id] if batch_id is not None else [])
    lost = list(session.execute(sa.select(*columns).where(*scope, Job.lease_expires_at < now).limit(limit)))
    if host is not None and is_dead is not None:
        local = session.execute(
            sa.select(*columns).where(*scope, Job.worker_host == host, Job.lease_expires_at >= now)
        ).all()
        lost += [row for row in local if row.worker_id and is_dead(row.worker_id)]
    requeued: list[QueuedJob] = []
    failed: list[str] = []
    for job_id, model, queue, attempts, owner, interruptions in lost:
        exhausted = attempts >= max_attempts
        if exhausted:
            values = _failed_lost(owner, attempts, interruptions + 1, now)
        else:
            values = {
                "state": JobState.QUEUED.value,
                "lease_expires_at": None,
                "interruptions": interruptions + 1,
                "requeued_at": now,
            }
        where = [Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == owner]
        if _compare_and_set(session, where, values):
            if exhausted:
                failed.append(job_id)
            else:
                requeued.append(QueuedJob(job_id, model, queue))
    return requeued, failed


def stale_queued_filter(older_than_seconds: float, now: datetime | None = None) -> sa.ColumnElement[bool]:
    """Queued jobs of distributed batches with no message published for ``older_than_seconds``.

    A job's last publication is the later of when it was last requeued and when its batch was last
    published (``producer resume`` publishes a whole batch), else — a producer that died before
    publishing — when it was created. Local batches are never published.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_seconds)
    batch = sa.select(Batch.published_at).where(Batch.id == Job.batch_id).scalar_subquery()
    distributed = sa.select(Batch.id).where(Batch.mode == "distributed")
    last_published = sa.case(
        (
            sa.and_(Job.requeued_at.is_not(None), sa.or_(batch.is_(None), Job.requeued_at > batch)),
            Job.requeued_at,
        ),
        else_=sa.func.coalesce(batch, Job.created_at),
    )
    return sa.and_(Job.state == JobState.QUEUED, Job.batch_id.in_(distributed), last_published < cutoff)


def republish_stale(
    session: Session,
    *,
    older_than_seconds: float,
    batch_id: str | None = None,
    now: datetime | None = None,
    limit: int = 10_000,
) -> list[QueuedJob]:
    """Stamp queued jobs whose message was lost (see ``stale_queued_filter``) as requeued now, and
    return them for publishing.

    A queue message can be lost — a broker restarted without persistence, a purged queue, a producer
    killed between commit and publish — and nothing else would ever run such a job. Publishing it
    again is safe even if its message was only slow: claims are compare-and-set, so the second
    message finds the job taken and costs one query. The stamp is itself a compare-and-set on the
    same condition, so of many reapers only one publishes each job.
    """
    now = now or utcnow()
    stale = stale_queued_filter(older_than_seconds, now)
    if batch_id is not None:
        stale = sa.and_(stale, Job.batch_id == batch_id)
    ids = list(session.scalars(sa.select(Job.id).where(stale).limit(limit)))
    found: list[QueuedJob] = []
    for chunk in chunks(ids):
        stmt = (
            sa.update(Job)
            .where(Job.id.in_(chunk), stale)
            .values(requeued_at=now)
            .returning(Job.id, Job.model, Job.queue)
            .execution_options(synchronize_session=False)
        )
        found += [QueuedJob(*row) for row in session.execute(stmt)]
    return found


def republish_queued(
    session: Session, *, exclude: str | None = None, now: datetime | None = None
) -> list[QueuedJob]:
    """Stamp every queued job of the distributed batches that were published as requeued now, and
    return them for publishing: the broker lost its data (``common.publish.broker_lost_data``), so
    none of their messages can be trusted to exist.

    A batch not yet marked published is left out: its producer is publishing it right now (or died
    first, a case ``republish_stale`` covers), and publishing it here too would only double it.
    Duplicates are harmless anyway: claims are compare-and-set. ``exclude``: a batch the caller
    publishes itself.
    """
    now = now or utcnow()
    published = sa.select(Batch.id).where(
        Batch.mode == "distributed", Batch.published_at.is_not(None), Batch.id != (exclude or "")
    )
    where = [Job.state == JobState.QUEUED, Job.batch_id.in_(published)]
    ids = list(session.scalars(sa.select(Job.id).where(*where)))
    found: list[QueuedJob] = []
    for chunk in chunks(ids):
        stmt = (
            sa.update(Job)
            .where(Job.id.in_(chunk), *where)
            .values(requeued_at=now)
            .returning(Job.id, Job.model, Job.queue)
            .execution_options(synchronize_session=False)
        )
        found += [QueuedJob(*row) for row in session.execute(stmt)]
    return sorted(found, key=lambda job: (job.queue, job.model, job.id))


def find_reusable(
    session: Session, image_sha256: str, config_fingerprint: str, *, metrics_config: str | None = None
) -> Job | None:
    """A finished job with the same image and configuration, whose artifacts another job can point at.

    With ``metrics_config`` (the job asks for metrics) the source must also hold metric values made
    with those settings, which ``record_reuse`` then copies; otherwise the job is computed afresh.
    """
    query = sa.select(Job).where(
        Job.image_sha256 == image_sha256,
        Job.config_fingerprint == config_fingerprint,
        Job.state == JobState.SUCCEEDED,
        Job.reused_from.is_(None),
    )
    if metrics_config is not None:
        query = query.where(sa.exists().where(JobMetric.job_id == Job.id, JobMetric.config == metrics_config))
    return session.scalar(query.order_by(Job.finished_at).limit(1))


def find_reusables(session: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Job]:
    """``find_reusable`` for many ``(image_sha256, config_fingerprint)`` pairs in one query per
    thousand pairs: the earliest finished original of each pair that has one."""
    found: dict[tuple[str, str], Job] = {}
    for part in chunks(list(dict.fromkeys(keys))):
        for job in session.scalars(_reusables_statement(), {"keys": part}):
            # Matched on its hash, so the hash is there (the column is NULL only before a fetch).
            found.setdefault((cast(str, job.image_sha256), job.config_fingerprint), job)
    return found


@functools.cache
def _reusables_statement() -> sa.Select[Job]:
    """``find_reusables``'s query, built once: a tuple ``IN`` of literal pairs was rebuilt and
    type-checked pair by pair for every micro-batch."""
    return (
        sa.select(Job)
        .where(
            sa.tuple_(Job.image_sha256, Job.config_fingerprint).in_(sa.bindparam("keys", expanding=True)),
            Job.state == JobState.SUCCEEDED,
            Job.reused_from.is_(None),
        )
        .order_by(Job.finished_at)
    )


def _finish(session: Session, job_id: str, worker_id: str, values: dict[str, Any]) -> bool:
    where = [Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id]
    return bool(_compare_and_set(session, where, values))


def _insert_results(
    session: Session,
    job_id: str,
    artifacts: Iterable[ArtifactRecord],
    predictions: Iterable[PredictionRecord],
    metrics: Iterable[MetricRecord] = (),
    metrics_config: str | None = None,
) -> None:
    _insert_many(session, [_Results(job_id, artifacts, predictions, metrics, metrics_config)])


@dataclasses.dataclass(frozen=True)
class _Results:
    """One job's rows: artifacts, predictions and metric values (made with ``metrics_config``)."""

    job_id: str
    artifacts: Iterable[ArtifactRecord]
    predictions: Iterable[PredictionRecord]
    metrics: Iterable[MetricRecord] = ()
    metrics_config: str | None = None


def _insert_many(session: Session, results: Iterable[_Results]) -> None:
    """The artifact, prediction and metric rows of several jobs, one multi-row statement per table."""
    artifact_rows: list[dict[str, Any]] = []
    prediction_rows: list[dict[str, Any]] = []
    metric_rows: list[dict[str, Any]] = []
    # ``vars``, not ``dataclasses.asdict``: these records are flat, and asdict's recursive copy of an
    # image's ~15 rows took half of this function's time under a profiler.
    for r in results:
        artifact_rows += [{"job_id": r.job_id, **vars(a)} for a in r.artifacts]
        prediction_rows += [{"job_id": r.job_id, **vars(p)} for p in r.predictions]
        metric_rows += [{"job_id": r.job_id, **vars(m), "config": r.metrics_config or ""} for m in r.metrics]
    # The tables, not the mapped classes: a Core ``executemany`` skips the ORM's bulk-insert
    # bookkeeping, which cost more than the statements themselves.
    if artifact_rows:
        stmt = dialect_insert(session, Artifact.__table__).on_conflict_do_nothing(
            index_elements=["job_id", "name"]
        )
        session.execute(stmt, artifact_rows)
    if prediction_rows:
        stmt = dialect_insert(session, Prediction.__table__).on_conflict_do_nothing(
            index_elements=["job_id", "rank"]
        )
        session.execute(stmt, prediction_rows)
    if metric_rows:
        stmt = dialect_insert(session, JobMetric.__table__).on_conflict_do_nothing(
            index_elements=["job_id", "method", "metric"]
        )
        session.execute(stmt, metric_rows)


def record_successes(
    session: Session,
    outcomes: Sequence[tuple[str, JobOutcome]],
    *,
    worker_id: str,
    now: datetime | None = None,
) -> list[str]:
    """``running → succeeded`` with artifacts and predictions for a micro-batch of jobs, in the
    caller's one transaction; returns the ids this worker still owned (and so recorded). A job left
    out lost its claim (the lease expired and another worker took over); this worker's objects are
    under the same deterministic keys as the new owner's, so nothing is orphaned.

    One commit instead of one per job, the state changes as one ``executemany`` of a statement
    built once, and the artifact and prediction rows of all jobs in one statement per table: on
    SQLite a commit is a disk sync, which made recording cost more than computing. Each job's state
    change is still its own compare-and-set (``WHERE id = … AND state = 'running' AND worker_id =
    …``); the winners are read back in one query.
    """
    now = now or utcnow()
    if not outcomes:
        return []
    rows = [
        {
            "b_id": job_id,
            "b_worker": worker_id,
            "v_state": JobState.SUCCEEDED.value,
            "v_finished_at": now,
            "v_image_sha256": outcome.image_sha256,
            "v_target_index": outcome.target_index,
            "v_readout": outcome.readout,
            "v_note": outcome.note,
            "v_device": outcome.device,
            "v_weights_source": outcome.weights_source,
            "v_fetch_seconds": outcome.fetch_seconds,
            "v_compute_seconds": outcome.compute_seconds,
            "v_store_seconds": outcome.store_seconds,
        }
        for job_id, outcome in outcomes
    ]
    session.execute(_finish_many_statement(), rows)
    # Which compare-and-sets won: not the executemany's rowcount (psycopg may report -1), but the
    # rows that now carry this worker's id and this very finishing time.
    ids = [job_id for job_id, _ in outcomes]
    finished: set[str] = set()
    for part in chunks(ids):
        finished.update(
            session.scalars(_finished_by_statement(), {"ids": part, "worker": worker_id, "now": now})
        )
    won = [(job_id, outcome) for job_id, outcome in outcomes if job_id in finished]
    _insert_many(
        session,
        [_Results(job_id, o.artifacts, o.predictions, o.metrics, o.metrics_config) for job_id, o in won],
    )
    return [job_id for job_id, _ in won]


@functools.cache
def _finish_many_statement() -> sa.Update:
    """``running → succeeded`` of one job, as one statement executed for a whole micro-batch
    (``executemany``): built and compiled once. One ORM ``UPDATE … RETURNING`` per job, each with
    its own fourteen values, cost more CPU than the rest of recording together."""
    jobs = cast(sa.Table, Job.__table__)
    values: dict[str, sa.BindParameter[Any]] = {
        name: sa.bindparam(f"v_{name}")
        for name in (
            "state",
            "finished_at",
            "image_sha256",
            "target_index",
            "readout",
            "note",
            "device",
            "weights_source",
            "fetch_seconds",
            "compute_seconds",
            "store_seconds",
        )
    }
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == sa.bindparam("b_id"),
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.worker_id == sa.bindparam("b_worker"),
        )
        .values(**values, lease_expires_at=None, error_class=None, error_message=None)
    )


@functools.cache
def _finished_by_statement() -> sa.Select[str]:
    """The ids among ``ids`` that ``worker`` finished at ``now``: the compare-and-sets it won."""
    return sa.select(Job.id).where(
        Job.id.in_(sa.bindparam("ids", expanding=True)),
        Job.state == JobState.SUCCEEDED,
        Job.worker_id == sa.bindparam("worker"),
        Job.finished_at == sa.bindparam("now"),
    )


def record_reuse(
    session: Session,
    job_id: str,
    *,
    worker_id: str,
    source: Job,
    fetch_seconds: float | None = None,
    now: datetime | None = None,
) -> bool:
    """``running → succeeded`` by pointing at an earlier job's artifacts (and copying its predictions
    and metric values) instead of recomputing."""
    now = now or utcnow()
    values = {
        "state": JobState.SUCCEEDED.value,
        "finished_at": now,
        "lease_expires_at": None,
        "image_sha256": source.image_sha256,
        "target_index": source.target_index,
        "readout": source.readout,
        "note": source.note,
        "device": source.device,
        "weights_source": source.weights_source,
        "reused_from": source.id,
        "fetch_seconds": fetch_seconds,
        "compute_seconds": 0.0,
        "store_seconds": 0.0,
        "error_class": None,
        "error_message": None,
    }
    won = _finish(session, job_id, worker_id, values)
    if won:
        artifacts = [
            ArtifactRecord(
                name=a.name,
                uri=a.uri,
                content_type=a.content_type,
                bytes=a.bytes,
                checksum=a.checksum,
                shape=a.shape,
                dtype=a.dtype,
                shard_uri=a.shard_uri,
                shard_offset=a.shard_offset,
                shard_length=a.shard_length,
            )
            for a in session.scalars(sa.select(Artifact).where(Artifact.job_id == source.id))
        ]
        predictions = [
            PredictionRecord(rank=p.rank, class_index=p.class_index, prob=p.prob, label=p.label)
            for p in session.scalars(sa.select(Prediction).where(Prediction.job_id == source.id))
        ]
        metrics = session.execute(
            sa.select(JobMetric.method, JobMetric.metric, JobMetric.value, JobMetric.config).where(
                JobMetric.job_id == source.id
            )
        ).all()
        _insert_results(
            session,
            job_id,
            artifacts,
            predictions,
            [MetricRecord(method, metric, value) for method, metric, value, _ in metrics],
            metrics[0].config if metrics else None,
        )
    return won


def record_failure(
    session: Session,
    job_id: str,
    *,
    worker_id: str,
    error_class: str,
    message: str,
    retryable: bool,
    max_attempts: int,
    now: datetime | None = None,
) -> JobState | None:
    """A failed attempt: back to queued when retryable and attempts remain, else failed for good.

    Returns the new state, or None when this worker no longer owns the job.
    """
    now = now or utcnow()
    attempts = session.scalar(sa.select(Job.attempts).where(Job.id == job_id))
    if attempts is None:
        return None
    again = retryable and attempts < max_attempts
    state = JobState.QUEUED if again else JobState.FAILED
    values: dict[str, Any] = {
        "state": state.value,
        "lease_expires_at": None,
        "error_class": error_class[:100],
        "error_message": message[:4000],
    }
    if again:
        values["requeued_at"] = now
    else:
        values["finished_at"] = now
    return state if _finish(session, job_id, worker_id, values) else None
