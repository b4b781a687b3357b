"""What users ask of a batch: how far it is, what failed and why, and every job's results."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db.jobs import stale_queued_filter
from common.db.models import Artifact, Batch, Job, JobState, Prediction, utcnow

__all__ = ["BatchStatus", "FailureSummary", "batch_status", "iter_job_results"]


@dataclass(frozen=True)
class FailureSummary:
    error_class: str
    message: str
    count: int
    example_uri: str


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    name: str | None
    total: int
    counts: dict[str, int]
    reused: int
    models: dict[str, dict[str, int]]
    started_at: datetime | None
    last_finished_at: datetime | None
    jobs_per_second: float | None
    eta_seconds: float | None
    failures: list[FailureSummary]
    # Queued jobs with no message published for the reaper's threshold: their message was lost and a
    # worker's reaper publishes them again (None: not asked).
    stale_queued: int | None = None

    @property
    def done(self) -> int:
        return self.counts[JobState.SUCCEEDED] + self.counts[JobState.FAILED]

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def batch_status(
    session: Session,
    batch: Batch,
    *,
    now: datetime | None = None,
    stale_after_seconds: float | None = None,
) -> BatchStatus:
    """Counts by state and model, throughput since the first job started, ETA, and failures by reason;
    with ``stale_after_seconds``, also how many queued jobs have had no message published that long."""
    now = now or utcnow()
    counts: Counter[str] = Counter()
    models: dict[str, Counter[str]] = {}
    by_model_state = (
        sa.select(Job.model, Job.state, sa.func.count())
        .where(Job.batch_id == batch.id)
        .group_by(Job.model, Job.state)
    )
    for model, state, count in session.execute(by_model_state):
        counts[JobState(state)] += count
        models.setdefault(model, Counter())[JobState(state)] += count
    reused = session.scalar(
        sa.select(sa.func.count()).where(Job.batch_id == batch.id, Job.reused_from.is_not(None))
    )
    started, last_finished = session.execute(
        sa.select(sa.func.min(Job.started_at), sa.func.max(Job.finished_at)).where(Job.batch_id == batch.id)
    ).one()
    done = counts[JobState.SUCCEEDED] + counts[JobState.FAILED]
    total = sum(counts.values())
    rate = eta = None
    if started is not None and done:
        end = now if done < total else (last_finished or now)
        rate = done / max((end - started).total_seconds(), 1e-3)
        eta = (total - done) / rate
    failures = [
        FailureSummary(error_class=row[0] or "", message=row[1] or "", count=row[2], example_uri=row[3])
        for row in session.execute(
            sa.select(Job.error_class, Job.error_message, sa.func.count(), sa.func.min(Job.image_uri))
            .where(Job.batch_id == batch.id, Job.state == JobState.FAILED)
            .group_by(Job.error_class, Job.error_message)
            .order_by(sa.func.count().desc())
            .limit(20)
        )
    ]
    stale = None
    if stale_after_seconds is not None:
        stale = session.scalar(
            sa.select(sa.func.count())
            .select_from(Job)
            .where(Job.batch_id == batch.id, stale_queued_filter(stale_after_seconds, now))
        )
    return BatchStatus(
        stale_queued=stale,
        batch_id=batch.id,
        name=batch.name,
        total=total,
        counts={state.value: counts[state] for state in JobState},
        reused=reused or 0,
        models={m: {state.value: c[state] for state in JobState} for m, c in sorted(models.items())},
        started_at=started,
        last_finished_at=last_finished,
        jobs_per_second=rate,
        eta_seconds=eta,
        failures=failures,
    )


def iter_job_results(
    session: Session,
    batch_id: str,
    *,
    model: str | None = None,
    state: JobState | None = None,
    models: Collection[str] | None = None,
    states: Collection[JobState] | None = None,
    page_size: int = 1000,
) -> Iterator[dict[str, Any]]:
    """One JSON-able dict per job, in CSV order, paged so a 100,000-job batch streams in constant memory.

    ``model``/``state`` keep one value, ``models``/``states`` any of several (the report's selection).
    """
    last: tuple[int, str] = (-1, "")
    while True:
        query = (
            sa.select(Job)
            .where(Job.batch_id == batch_id, sa.tuple_(Job.row_number, Job.model) > sa.tuple_(*last))
            .order_by(Job.row_number, Job.model)
            .limit(page_size)
        )
        if model is not None:
            query = query.where(Job.model == model)
        if state is not None:
            query = query.where(Job.state == state)
        if models is not None:
            query = query.where(Job.model.in_(list(models)))
        if states is not None:
            query = query.where(Job.state.in_(list(states)))
        jobs = session.scalars(query).all()
        if not jobs:
            return
        ids = [job.id for job in jobs]
        predictions: dict[str, list[dict[str, Any]]] = {}
        prediction_rows = sa.select(Prediction).where(Prediction.job_id.in_(ids)).order_by(Prediction.rank)
        for p in session.scalars(prediction_rows):
            predictions.setdefault(p.job_id, []).append(
                {"index": p.class_index, "label": p.label, "prob": p.prob}
            )
        artifacts: dict[str, dict[str, str]] = {}
        for a in session.scalars(sa.select(Artifact).where(Artifact.job_id.in_(ids)).order_by(Artifact.name)):
            artifacts.setdefault(a.job_id, {})[a.name] = a.uri
        for job in jobs:
            yield _job_dict(job, predictions.get(job.id, []), artifacts.get(job.id, {}))
        last = (jobs[-1].row_number, jobs[-1].model)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _job_dict(job: Job, predictions: list[dict[str, Any]], artifacts: dict[str, str]) -> dict[str, Any]:
    error = None
    if job.error_class or job.error_message:
        error = f"{job.error_class}: {job.error_message}" if job.error_class else job.error_message
    return {
        "job_id": job.id,
        "batch_id": job.batch_id,
        "row": job.row_number,
        "id": job.row_id,
        "image_uri": job.image_uri,
        "image_sha256": job.image_sha256,
        "model": job.model,
        "status": JobState(job.state).value,
        "error": error,
        "target": job.target,
        "target_index": job.target_index,
        "readout": job.readout,
        "note": job.note,
        "predictions": predictions,
        "artifacts": artifacts,
        "attempts": job.attempts,
        "worker_host": job.worker_host,
        "device": job.device,
        "weights_source": job.weights_source,
        "reused_from": job.reused_from,
        "metadata": job.row_metadata,
        "timings": {
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "fetch_seconds": job.fetch_seconds,
            "compute_seconds": job.compute_seconds,
            "store_seconds": job.store_seconds,
        },
    }
