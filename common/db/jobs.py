"""The life of one job: claimed under a lease, renewed, finished, failed, or recovered.

Every state change is a compare-and-set ``UPDATE … WHERE <expected state> RETURNING id``, so two
workers racing for a job cannot both win, and a worker whose lease was taken over cannot overwrite
the new owner's result. Result rows are inserted with ``ON CONFLICT … DO NOTHING`` on their natural
keys, so a retried transaction is harmless. (psycopg 3 reports ``rowcount`` as -1 for some
statements; never count on it — count what RETURNING returns.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db._sql import chunks, dialect_insert
from common.db.models import Artifact, Job, JobState, Prediction, utcnow
from common.db.records import ArtifactRecord, JobOutcome, PredictionRecord, QueuedJob, WorkerIdentity

__all__ = [
    "claim_jobs",
    "find_reusable",
    "reap_expired",
    "record_failure",
    "record_reuse",
    "record_success",
    "release_jobs",
    "renew_leases",
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


def claim_jobs(
    session: Session,
    job_ids: Sequence[str],
    *,
    worker: WorkerIdentity,
    lease_seconds: float,
    max_attempts: int,
    is_dead: Callable[[str], bool] | None = None,
    now: datetime | None = None,
) -> list[Job]:
    """Take ownership of the given jobs that nobody live owns: ``queued → running``.

    Claimable: queued jobs, running jobs whose lease expired, running jobs whose owner is a
    process on this host that ``is_dead(worker_id)`` reports gone — the case of a worker child killed
    mid-chunk whose message the broker redelivers at once; waiting out its lease would stall the chunk —
    and running jobs this very process claimed before. A process runs one chunk at a time, so those
    were left behind by a chunk that stopped on a transient error (the database gone mid-chunk); its
    retry takes them back at once instead of after the lease and the reaper.
    Jobs that already used ``max_attempts`` are left for ``reap_expired`` to fail. Returns the claimed
    jobs in the order asked for.
    """
    now = now or utcnow()
    values = {
        "state": JobState.RUNNING.value,
        "attempts": Job.attempts + 1,
        "worker_host": worker.hostname,
        "worker_id": worker.worker_id,
        "started_at": now,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
    }
    claimable = sa.or_(
        Job.state == JobState.QUEUED,
        sa.and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
        sa.and_(Job.state == JobState.RUNNING, Job.worker_id == worker.worker_id),
    )
    claimed: list[str] = []
    for chunk in chunks(list(job_ids)):
        claimed += _compare_and_set(
            session, [Job.id.in_(chunk), Job.attempts < max_attempts, claimable], values
        )
    if is_dead is not None:
        rest = sorted(set(job_ids) - set(claimed))
        orphans = session.execute(
            sa.select(Job.id, Job.worker_id).where(
                Job.id.in_(rest),
                Job.state == JobState.RUNNING,
                Job.worker_host == worker.hostname,
                Job.worker_id != worker.worker_id,
                Job.attempts < max_attempts,
            )
        ).all()
        for job_id, owner in orphans:
            if owner and is_dead(owner):
                where = [Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == owner]
                claimed += _compare_and_set(session, where, values)
    if not claimed:
        return []
    query = sa.select(Job).where(Job.id.in_(claimed)).execution_options(populate_existing=True)
    order = {job_id: i for i, job_id in enumerate(job_ids)}
    return sorted(session.scalars(query), key=lambda job: order[job.id])


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
        "attempts": sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
        "lease_expires_at": None,
        "worker_id": None,
    }
    released: list[str] = []
    for chunk in chunks(list(job_ids)):
        where = [Job.id.in_(chunk), Job.state == JobState.RUNNING, Job.worker_id == worker_id]
        released += _compare_and_set(session, where, values)
    return released


def reap_expired(
    session: Session,
    *,
    max_attempts: int,
    host: str | None = None,
    is_dead: Callable[[str], bool] | None = None,
    now: datetime | None = None,
    limit: int = 10_000,
) -> tuple[list[QueuedJob], list[str]]:
    """Recover jobs whose worker vanished: back to queued, or failed after max_attempts.

    Vanished means the lease expired — or, given ``host`` and ``is_dead``, that the owner is a process
    on that host which no longer exists (a restarted worker recovers its predecessor's jobs at once
    instead of after the lease). Returns (jobs requeued — to be published again, ids failed for good).
    """
    now = now or utcnow()
    columns = (Job.id, Job.model, Job.queue, Job.attempts, Job.worker_id)
    lost = session.execute(
        sa.select(*columns).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now).limit(limit)
    ).all()
    if host is not None and is_dead is not None:
        local = session.execute(
            sa.select(*columns).where(
                Job.state == JobState.RUNNING, Job.worker_host == host, Job.lease_expires_at >= now
            )
        ).all()
        lost += [row for row in local if row.worker_id and is_dead(row.worker_id)]
    requeued: list[QueuedJob] = []
    failed: list[str] = []
    for job_id, model, queue, attempts, owner in lost:
        exhausted = attempts >= max_attempts
        values: dict[str, Any] = {"lease_expires_at": None}
        if exhausted:
            values |= {
                "state": JobState.FAILED.value,
                "finished_at": now,
                "error_class": "WorkerLostError",
                "error_message": f"worker {owner} stopped responding; gave up after {attempts} attempt(s)",
            }
        else:
            values |= {"state": JobState.QUEUED.value}
        where = [Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == owner]
        if _compare_and_set(session, where, values):
            if exhausted:
                failed.append(job_id)
            else:
                requeued.append(QueuedJob(job_id, model, queue))
    return requeued, failed


def find_reusable(session: Session, image_sha256: str, config_fingerprint: str) -> Job | None:
    """A finished job with the same image and configuration, whose artifacts another job can point at."""
    return session.scalar(
        sa.select(Job)
        .where(
            Job.image_sha256 == image_sha256,
            Job.config_fingerprint == config_fingerprint,
            Job.state == JobState.SUCCEEDED,
            Job.reused_from.is_(None),
        )
        .order_by(Job.finished_at)
        .limit(1)
    )


def _finish(session: Session, job_id: str, worker_id: str, values: dict[str, Any]) -> bool:
    where = [Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id]
    return bool(_compare_and_set(session, where, values))


def _insert_results(
    session: Session,
    job_id: str,
    artifacts: Iterable[ArtifactRecord],
    predictions: Iterable[PredictionRecord],
) -> None:
    artifact_rows = [{"job_id": job_id, **dataclasses.asdict(a)} for a in artifacts]
    if artifact_rows:
        stmt = dialect_insert(session, Artifact).on_conflict_do_nothing(index_elements=["job_id", "name"])
        session.execute(stmt, artifact_rows)
    prediction_rows = [{"job_id": job_id, **dataclasses.asdict(p)} for p in predictions]
    if prediction_rows:
        stmt = dialect_insert(session, Prediction).on_conflict_do_nothing(index_elements=["job_id", "rank"])
        session.execute(stmt, prediction_rows)


def record_success(
    session: Session, job_id: str, *, worker_id: str, outcome: JobOutcome, now: datetime | None = None
) -> bool:
    """``running → succeeded`` with artifacts and predictions, if this worker still owns the job.

    False means the claim was lost (the lease expired and another worker took over); this worker's
    objects are under the same deterministic keys as the new owner's, so nothing is orphaned.
    """
    now = now or utcnow()
    values = {
        "state": JobState.SUCCEEDED.value,
        "finished_at": now,
        "lease_expires_at": None,
        "image_sha256": outcome.image_sha256,
        "target_index": outcome.target_index,
        "readout": outcome.readout,
        "note": outcome.note,
        "device": outcome.device,
        "weights_source": outcome.weights_source,
        "fetch_seconds": outcome.fetch_seconds,
        "compute_seconds": outcome.compute_seconds,
        "store_seconds": outcome.store_seconds,
        "error_class": None,
        "error_message": None,
    }
    won = _finish(session, job_id, worker_id, values)
    if won:
        _insert_results(session, job_id, outcome.artifacts, outcome.predictions)
    return won


def record_reuse(
    session: Session,
    job_id: str,
    *,
    worker_id: str,
    source: Job,
    fetch_seconds: float | None = None,
    now: datetime | None = None,
) -> bool:
    """``running → succeeded`` by pointing at an earlier job's artifacts instead of recomputing."""
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
            )
            for a in session.scalars(sa.select(Artifact).where(Artifact.job_id == source.id))
        ]
        predictions = [
            PredictionRecord(rank=p.rank, class_index=p.class_index, prob=p.prob, label=p.label)
            for p in session.scalars(sa.select(Prediction).where(Prediction.job_id == source.id))
        ]
        _insert_results(session, job_id, artifacts, predictions)
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
    if not again:
        values["finished_at"] = now
    return state if _finish(session, job_id, worker_id, values) else None
