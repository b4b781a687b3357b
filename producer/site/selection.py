"""What goes into a report, read from the database as a stream: images with their jobs, and the summary.

A report is about images: one CSV row, explained by one or more models. ``iter_images`` groups the
job stream of ``iter_job_results`` (ordered by row, then model) into one ``ImageEntry`` per row, so
a 100,000-image batch is read a page of rows at a time and never held in memory. The summary
(``model_summaries``, ``top1_agreement``) is computed by SQL aggregates over the same selection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from common.db._sql import chunks
from common.db.models import Job, JobMetric, JobState, Prediction
from common.db.reports import iter_job_results
from common.storage.uri import uri_scheme

__all__ = [
    "AgreementRow",
    "ImageEntry",
    "ModelSummary",
    "Selection",
    "count_images",
    "image_name",
    "iter_images",
    "model_summaries",
    "top1_agreement",
]


@dataclass(frozen=True)
class Selection:
    """Which jobs of a batch a report shows: some models, some states, the first ``limit`` images.

    ``last_row`` is the CSV line of the ``limit``-th selected image (``resolve`` fills it in), so the
    summary aggregates cover exactly the images the pages show.
    """

    batch_id: str
    models: tuple[str, ...] | None = None
    states: tuple[JobState, ...] | None = None
    limit: int | None = None
    last_row: int | None = None

    def where(self, job: Any = Job) -> list[sa.ColumnElement[bool]]:
        """SQL conditions on ``job`` (the ``Job`` entity or an alias of it) for this selection."""
        conditions = [job.batch_id == self.batch_id]
        if self.models is not None:
            conditions.append(job.model.in_(self.models))
        if self.states is not None:
            conditions.append(job.state.in_(self.states))
        if self.last_row is not None:
            conditions.append(job.row_number <= self.last_row)
        return conditions

    def resolve(self, session: Session) -> Selection:
        """This selection with ``last_row`` set from ``limit`` (one indexed query)."""
        if self.limit is None:
            return self
        last = session.scalar(
            sa.select(Job.row_number)
            .where(*self.where())
            .group_by(Job.row_number)
            .order_by(Job.row_number)
            .offset(max(self.limit - 1, 0))
            .limit(1)
        )
        return Selection(self.batch_id, self.models, self.states, self.limit, last_row=last)


@dataclass
class ImageEntry:
    """One CSV row (one image) and its selected jobs, one per model, as ``iter_job_results`` dicts."""

    row: int
    row_id: str | None
    image_uri: str
    name: str
    jobs: list[dict[str, Any]] = field(default_factory=list)


def image_name(uri: str) -> str:
    """The file name of an image URI, readable: ``file:///d/%C3%A9t%C3%A9.png`` -> ``été.png``.

    Only the last segment is kept, so a report never shows the folder of the machine that made it.
    S3 keys are kept as written (a key may contain ``%`` literally); URLs and file URIs are decoded.
    """
    last = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    if uri_scheme(uri) in ("file", "http", "https", ""):
        last = unquote(last.split("?", 1)[0])
    return last


def count_images(session: Session, selection: Selection) -> int:
    """How many images (CSV rows with at least one selected job) the report will show."""
    rows = sa.select(Job.row_number).where(*selection.where()).group_by(Job.row_number).subquery()
    return session.scalar(sa.select(sa.func.count()).select_from(rows)) or 0


def iter_images(session: Session, selection: Selection, *, page_size: int = 500) -> Iterator[ImageEntry]:
    """The selected images in CSV order, each with its jobs in model order, streamed from the DB.

    Each job dict also gets ``"metrics"``: its faithfulness scores as ``{method: {metric: value}}``
    (empty without ``--metrics``), read with one query per ``page_size`` images.
    """
    entries: list[ImageEntry] = []
    for entry in _iter_entries(session, selection, page_size):
        entries.append(entry)
        if len(entries) == page_size:
            yield from _with_metrics(session, entries)
            entries = []
    yield from _with_metrics(session, entries)


def _with_metrics(session: Session, entries: list[ImageEntry]) -> list[ImageEntry]:
    jobs = {job["job_id"]: job for entry in entries for job in entry.jobs}
    for job in jobs.values():
        job["metrics"] = {}
    for ids in chunks(list(jobs)):
        rows = sa.select(JobMetric.job_id, JobMetric.method, JobMetric.metric, JobMetric.value).where(
            JobMetric.job_id.in_(ids)
        )
        for job_id, method, metric, value in session.execute(rows):
            jobs[job_id]["metrics"].setdefault(method, {})[metric] = value
    return entries


def _iter_entries(session: Session, selection: Selection, page_size: int) -> Iterator[ImageEntry]:
    jobs = iter_job_results(
        session,
        selection.batch_id,
        models=selection.models,
        states=selection.states,
        page_size=page_size,
    )
    current: ImageEntry | None = None
    for job in jobs:
        if selection.last_row is not None and job["row_number"] > selection.last_row:
            break
        if current is None or job["row_number"] != current.row:
            if current is not None:
                yield current
            current = ImageEntry(
                job["row_number"], job["row_id"], job["image_uri"], image_name(job["image_uri"])
            )
        current.jobs.append(job)
    if current is not None:
        yield current


@dataclass(frozen=True)
class ModelSummary:
    """One model's jobs in the selection: counts by outcome and mean seconds per stage."""

    model: str
    jobs: int
    succeeded: int  # computed here (not reused)
    reused: int
    failed: int
    pending: int  # queued or running: the batch is not finished
    fetch_seconds: float | None
    compute_seconds: float | None
    store_seconds: float | None


def model_summaries(session: Session, selection: Selection) -> list[ModelSummary]:
    """Per model: jobs, succeeded / reused / failed, and the mean time per stage of computed jobs.

    Reused jobs did no work (their timings are those of the job they point at), so the means are
    over jobs that were computed, as in the "where is the time going" query of docs/results.md.
    """
    reused = Job.reused_from.is_not(None)
    computed = sa.and_(Job.state == JobState.SUCCEEDED, Job.reused_from.is_(None))

    def count_if(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
        return sa.func.sum(sa.case((condition, 1), else_=0))

    def mean_if(column: Any) -> sa.ColumnElement[float]:
        return sa.func.avg(sa.case((computed, column), else_=None))

    query = (
        sa.select(
            Job.model,
            sa.func.count(),
            count_if(computed),
            count_if(sa.and_(Job.state == JobState.SUCCEEDED, reused)),
            count_if(Job.state == JobState.FAILED),
            count_if(Job.state.in_((JobState.QUEUED, JobState.RUNNING))),
            mean_if(Job.fetch_seconds),
            mean_if(Job.compute_seconds),
            mean_if(Job.store_seconds),
        )
        .where(*selection.where())
        .group_by(Job.model)
        .order_by(Job.model)
    )
    return [
        ModelSummary(
            model=row[0],
            jobs=row[1],
            succeeded=int(row[2] or 0),
            reused=int(row[3] or 0),
            failed=int(row[4] or 0),
            pending=int(row[5] or 0),
            fetch_seconds=_float(row[6]),
            compute_seconds=_float(row[7]),
            store_seconds=_float(row[8]),
        )
        for row in session.execute(query)
    ]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class AgreementRow:
    """How often two models give the same top-1 class on the images both explained."""

    model_a: str
    model_b: str
    images: int
    agree: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.images if self.images else None


def top1_agreement(session: Session, selection: Selection) -> list[AgreementRow]:
    """For every pair of models: images with a top-1 prediction from both, and how many agree.

    Compares class indices, so models with different class sets (custom heads) only agree by index.
    """
    a, b = aliased(Job), aliased(Job)
    pa, pb = aliased(Prediction), aliased(Prediction)
    query = (
        sa.select(
            a.model,
            b.model,
            sa.func.count(),
            sa.func.sum(sa.case((pa.class_index == pb.class_index, 1), else_=0)),
        )
        .select_from(a)
        .join(b, sa.and_(b.batch_id == a.batch_id, b.row_number == a.row_number, a.model < b.model))
        .join(pa, sa.and_(pa.job_id == a.id, pa.rank == 1))
        .join(pb, sa.and_(pb.job_id == b.id, pb.rank == 1))
        .where(*selection.where(a), *selection.where(b))
        .group_by(a.model, b.model)
        .order_by(a.model, b.model)
    )
    return [AgreementRow(row[0], row[1], row[2], int(row[3] or 0)) for row in session.execute(query)]
