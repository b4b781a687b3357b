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

__all__ = [
    "RESULT_COLUMNS",
    "BatchStatus",
    "BatchSummary",
    "FailureSummary",
    "artifact_column",
    "batch_contents",
    "batch_status",
    "iter_job_results",
    "job_error",
    "recent_batches",
]

# Every result's scalar fields, in the order and with the names of the ``job_results`` SQL view
# (migrations 0001-0002): the CSV, JSON and JSON-lines exports and the view use one set of names.
# A result dict (``iter_job_results``) has these keys plus ``predictions`` (the top-k, best first),
# ``artifacts`` (artifact name -> URI) and ``metadata`` (the dataset's other columns).
RESULT_COLUMNS: tuple[str, ...] = (
    "job_id",
    "batch_id",
    "row_number",
    "row_id",
    "image_uri",
    "image_sha256",
    "model",
    "state",
    "target",
    "target_index",
    "readout",
    "note",
    "top1_index",
    "top1_label",
    "top1_prob",
    "error_class",
    "error_message",
    "attempts",
    "worker_host",
    "device",
    "weights_source",
    "reused_from",
    "created_at",
    "started_at",
    "finished_at",
    "fetch_seconds",
    "compute_seconds",
    "store_seconds",
)


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
    # Jobs that ran the model (succeeded, not reused), and those per second over the same span as
    # ``jobs_per_second``: the throughput of the compute, which reused and failed jobs would inflate.
    computed: int = 0
    images_per_second: float | None = None

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
    computed = (
        session.scalar(
            sa.select(sa.func.count()).where(
                Job.batch_id == batch.id, Job.state == JobState.SUCCEEDED, Job.reused_from.is_(None)
            )
        )
        or 0
    )
    rate = eta = images_rate = None
    if started is not None and done:
        end = now if done < total else (last_finished or now)
        seconds = max((end - started).total_seconds(), 1e-3)
        rate = done / seconds
        eta = (total - done) / rate
        images_rate = computed / seconds
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
        computed=computed,
        images_per_second=images_rate,
    )


@dataclass(frozen=True)
class BatchSummary:
    """One line of ``producer batches``: a batch and how many of its jobs are in each state."""

    batch_id: str
    name: str | None
    mode: str
    created_at: datetime
    models: list[str]
    total: int
    counts: dict[str, int]


def recent_batches(session: Session, *, limit: int = 20) -> list[BatchSummary]:
    """The ``limit`` newest batches, newest first, with their jobs counted by state (one grouped query
    over the batches shown, so a database of a million jobs answers as fast as its index allows)."""
    batches = session.scalars(
        sa.select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    ).all()
    counts: dict[str, Counter[str]] = {batch.id: Counter() for batch in batches}
    if batches:
        by_state = (
            sa.select(Job.batch_id, Job.state, sa.func.count())
            .where(Job.batch_id.in_(list(counts)))
            .group_by(Job.batch_id, Job.state)
        )
        for batch_id, state, count in session.execute(by_state):
            counts[batch_id][JobState(state)] += count
    return [
        BatchSummary(
            batch_id=batch.id,
            name=batch.name,
            mode=batch.mode,
            created_at=batch.created_at,
            models=list((batch.models or {}).get("names") or []),
            total=sum(counts[batch.id].values()),
            counts={state.value: counts[batch.id][state] for state in JobState},
        )
        for batch in batches
    ]


def batch_contents(session: Session, batch_id: str) -> tuple[list[str], dict[str, int]]:
    """A batch's models and its job counts by state (non-zero ones), for saying what a filter that
    matched nothing could have matched."""
    models = sorted(session.scalars(sa.select(Job.model).where(Job.batch_id == batch_id).distinct()))
    counts = dict(
        session.execute(
            sa.select(Job.state, sa.func.count()).where(Job.batch_id == batch_id).group_by(Job.state)
        ).all()
    )
    return models, {state.value: counts[state] for state in JobState if counts.get(state)}


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
    """One JSON-able dict per job (``RESULT_COLUMNS`` and three nested fields), in CSV order, paged so a 100,000-job batch streams in constant memory.

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
    top = predictions[0] if predictions else {}
    return {
        "job_id": job.id,
        "batch_id": job.batch_id,
        "row_number": job.row_number,
        "row_id": job.row_id,
        "image_uri": job.image_uri,
        "image_sha256": job.image_sha256,
        "model": job.model,
        "state": JobState(job.state).value,
        "target": job.target,
        "target_index": job.target_index,
        "readout": job.readout,
        "note": job.note,
        "top1_index": top.get("index"),
        "top1_label": top.get("label"),
        "top1_prob": top.get("prob"),
        "error_class": job.error_class,
        "error_message": job.error_message,
        "attempts": job.attempts,
        "worker_host": job.worker_host,
        "device": job.device,
        "weights_source": job.weights_source,
        "reused_from": job.reused_from,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "fetch_seconds": job.fetch_seconds,
        "compute_seconds": job.compute_seconds,
        "store_seconds": job.store_seconds,
        "predictions": predictions,
        "artifacts": artifacts,
        "metadata": job.row_metadata,
    }


def job_error(job: dict[str, Any]) -> str | None:
    """A result's ``error_class: error_message`` in one line, for display; None when it did not fail."""
    error_class, message = job.get("error_class"), job.get("error_message")
    if not (error_class or message):
        return None
    return f"{error_class}: {message}" if error_class and message else error_class or message


def artifact_column(name: str) -> str:
    """The result column holding an artifact's URI, named as in the ``job_results`` view:
    ``rollout.npy`` -> ``rollout_uri``, ``rollout.png`` -> ``rollout_png_uri``."""
    stem, _, suffix = name.rpartition(".")
    return f"{stem}_uri" if suffix == "npy" else f"{stem}_{suffix}_uri"
