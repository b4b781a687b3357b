"""Creating batches and their jobs, finding them again, and putting failed jobs back in the queue."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import islice
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db._sql import dialect_insert
from common.db.models import Batch, Job, JobState, utcnow
from common.db.records import NewJob, QueuedImageJob, QueuedJob
from common.errors import NotFoundError, PermanentError
from common.keys import new_job_id

__all__ = [
    "add_jobs",
    "check_name_free",
    "create_batch",
    "get_batch",
    "iter_queued_jobs",
    "mark_published",
    "queued_jobs",
    "retry_failed",
]


def check_name_free(session: Session, name: str) -> None:
    """Raise ``PermanentError`` if a batch already has ``name`` (names are unique, ids and names share
    one namespace for ``get_batch``); the producer asks before reading a dataset."""
    if session.scalar(sa.select(Batch.id).where(Batch.name == name)) is not None:
        raise PermanentError(f"a batch named {name!r} already exists; choose another --name")


def create_batch(
    session: Session,
    *,
    batch_id: str,
    name: str | None,
    source: str,
    mode: str,
    settings: dict[str, Any],
    models: dict[str, Any],
) -> Batch:
    if name is not None:
        check_name_free(session, name)
    batch = Batch(
        id=batch_id, name=name, source=source, mode=mode, settings=settings, models=models, total_jobs=0
    )
    session.add(batch)
    session.flush()
    return batch


_JOB_COLUMNS = (
    "id",
    "batch_id",
    "row_number",
    "row_id",
    "image_uri",
    "model",
    "queue",
    "target",
    "config_fingerprint",
    "row_metadata",
    "state",
    "attempts",
    "created_at",
)


def add_jobs(
    session: Session, batch_id: str, jobs: Iterable[NewJob], *, ids: Iterable[str] | None = None
) -> int:
    """Insert a batch's jobs in bulk; a job already present (same batch, line, model) is left alone.

    ``jobs`` may be a stream (a million-row CSV is never a list here); ``ids`` default to fresh job
    ids. Returns how many rows were inserted, counted with RETURNING (psycopg 3's rowcount is -1
    here). On PostgreSQL the rows travel by COPY into a temporary table and one INSERT … SELECT … ON
    CONFLICT DO NOTHING: 100,000 jobs take about a second instead of half a minute of multi-row
    INSERTs. Elsewhere they go in multi-row INSERTs of 2,000.
    """
    now = utcnow()
    if ids is None:
        pairs: Iterable[tuple[str, NewJob]] = ((new_job_id(), job) for job in jobs)
    else:
        pairs = zip(ids, jobs, strict=True)
    rows = (
        (
            job_id,
            batch_id,
            job.row_number,
            job.row_id,
            job.image_uri,
            job.model,
            job.queue,
            job.target,
            job.config_fingerprint,
            job.row_metadata,
            JobState.QUEUED.value,
            0,
            now,
        )
        for job_id, job in pairs
    )
    if session.get_bind().dialect.name == "postgresql":
        inserted = _copy_jobs(session, rows)
    else:
        inserted = 0
        while chunk := list(islice(rows, 2000)):
            stmt = (
                dialect_insert(session, Job)
                .on_conflict_do_nothing(index_elements=["batch_id", "row_number", "model"])
                .returning(Job.id)
            )
            inserted += len(
                session.scalars(stmt, [dict(zip(_JOB_COLUMNS, row, strict=True)) for row in chunk]).all()
            )
    total = sa.select(sa.func.count(Job.id)).where(Job.batch_id == batch_id).scalar_subquery()
    session.execute(sa.update(Batch).where(Batch.id == batch_id).values(total_jobs=total))
    return inserted


def _copy_jobs(session: Session, rows: Iterable[tuple]) -> int:
    from psycopg.types.json import Jsonb

    columns = ", ".join(_JOB_COLUMNS)
    metadata = _JOB_COLUMNS.index("row_metadata")
    driver = session.connection().connection.driver_connection
    assert driver is not None  # a live connection checked out of the pool for this session
    cursor = driver.cursor()
    try:
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_jobs (LIKE jobs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(f"COPY new_jobs ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((*row[:metadata], Jsonb(row[metadata]), *row[metadata + 1 :]))
        cursor.execute(
            f"WITH inserted AS (INSERT INTO jobs ({columns}) SELECT {columns} FROM new_jobs "
            "ON CONFLICT (batch_id, row_number, model) DO NOTHING RETURNING 1) SELECT count(*) FROM inserted"
        )
        inserted = cursor.fetchone()[0]
        cursor.execute("DELETE FROM new_jobs")
        return inserted
    finally:
        cursor.close()


def get_batch(session: Session, ref: str) -> Batch:
    """A batch by id, or by name (names are unique)."""
    batch = session.get(Batch, ref) or session.scalar(sa.select(Batch).where(Batch.name == ref))
    if batch is None:
        bind = session.get_bind()
        database = (bind if isinstance(bind, sa.Engine) else bind.engine).url.render_as_string(
            hide_password=True
        )
        raise NotFoundError(f"no batch with id or name {ref!r} in the database {database}")
    return batch


def queued_jobs(session: Session, batch_id: str) -> list[QueuedJob]:
    """The batch's queued jobs, grouped by model for chunked publishing."""
    return [QueuedJob(job.id, job.model, job.queue) for job in iter_queued_jobs(session, batch_id)]


def iter_queued_jobs(session: Session, batch_id: str, *, buffer: int = 10_000) -> Iterator[QueuedImageJob]:
    """The batch's queued jobs as a stream, grouped by model, then by image URI, then in row order.

    Grouping by URI puts rows that repeat an image next to each other, so they share a message
    and are computed once. Rows are fetched ``buffer`` at a time (a server-side cursor on
    PostgreSQL), so publishing a million jobs holds ten thousand in memory, not a million. Consume
    it inside the session.
    """
    rows = session.execute(
        sa.select(Job.id, Job.model, Job.queue, Job.image_uri)
        .where(Job.batch_id == batch_id, Job.state == JobState.QUEUED)
        .order_by(Job.model, Job.image_uri, Job.row_number)
        .execution_options(yield_per=buffer)
    )
    for row in rows:
        yield QueuedImageJob(*row)


def mark_published(session: Session, batch_id: str, *, now: datetime | None = None) -> None:
    """Record that the batch's queued jobs are on the queue (one row, whatever the batch's size)."""
    session.execute(sa.update(Batch).where(Batch.id == batch_id).values(published_at=now or utcnow()))


def retry_failed(session: Session, batch_id: str, *, now: datetime | None = None) -> list[QueuedJob]:
    """``failed → queued`` for a batch, with a fresh attempt budget; returns the jobs to publish."""
    now = now or utcnow()
    stmt = (
        sa.update(Job)
        .where(Job.batch_id == batch_id, Job.state == JobState.FAILED)
        .values(
            state=JobState.QUEUED.value,
            attempts=0,
            interruptions=0,
            requeued_at=now,
            finished_at=None,
            worker_id=None,
            error_class=None,
            error_message=None,
        )
        .returning(Job.id, Job.model, Job.queue)
        .execution_options(synchronize_session=False)
    )
    return sorted((QueuedJob(*row) for row in session.execute(stmt)), key=lambda job: (job.model, job.id))
