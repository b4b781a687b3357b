"""One chunk of jobs, end to end: claim → fetch → preprocess → compute → render → store → record.

The same code runs inside a Celery worker and in ``producer submit --local``; only the shell that
hands it job ids differs. Work overlaps so the device is not left waiting: images are fetched and
decoded by a thread pool while earlier micro-batches compute, and rendering/uploading happens on
another pool while the next micro-batch computes. Every failure is recorded on its own job
(permanent → failed, transient → back to the queue for a retry); one bad image never fails the rest.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
import torch
from PIL import Image

from common.db import Database, open_database
from common.db.jobs import claim_jobs, find_reusable, record_failure, record_reuse, record_success
from common.db.models import Batch, Job, JobState
from common.db.records import ArtifactRecord, JobOutcome, PredictionRecord, QueuedJob
from common.errors import PermanentError, TransientError
from common.fetch import DefaultFetcher, FetchPolicy, ImageFetcher, content_sha256
from common.keys import artifact_key
from common.methods import MethodSettings
from common.modelspec import ModelSpec
from common.settings import Settings
from common.storage import ObjectStore, open_store
from worker.attention import Explanation, check_supported, explain_in_batches
from worker.device import autocast_dtype, select_device
from worker.keeper import LeaseKeeper, current_identity, is_dead_local_process
from worker.labels import resolve_target
from worker.models import LoadedModel, ModelCache
from worker.preprocess import decode_image
from worker.render import render_artifacts

__all__ = ["ChunkReport", "Runtime", "process_jobs"]

log = logging.getLogger(__name__)

JobCallback = Callable[[str, JobState], None]


@dataclass
class Runtime:
    """What one worker process keeps between chunks: connections, thread pools, warm models."""

    settings: Settings
    db: Database
    store: ObjectStore
    fetcher: ImageFetcher
    models: ModelCache
    device: torch.device
    autocast: torch.dtype | None
    keeper: LeaseKeeper
    fetch_pool: ThreadPoolExecutor
    render_pool: ThreadPoolExecutor

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        db: Database | None = None,
        store: ObjectStore | None = None,
        fetcher: ImageFetcher | None = None,
        node: str | None = None,
        queues: str | None = None,
        on_requeued: Callable[[list[QueuedJob]], None] | None = None,
    ) -> Runtime:
        db = db or open_database(settings)
        device = select_device(settings.device)
        return cls(
            settings=settings,
            db=db,
            store=store
            or open_store(settings.resolved_storage_url(), upload_threads=settings.upload_threads),
            fetcher=fetcher or DefaultFetcher(FetchPolicy.from_settings(settings)),
            models=ModelCache(device=device, weights_dir=settings.weights_dir),
            device=device,
            autocast=autocast_dtype(settings.autocast, device),
            keeper=LeaseKeeper(
                db, settings, node=node, queues=queues, device=str(device), on_requeued=on_requeued
            ),
            fetch_pool=ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="vitscope-fetch"),
            render_pool=ThreadPoolExecutor(
                min(4, settings.upload_threads), thread_name_prefix="vitscope-store"
            ),
        )

    def close(self) -> None:
        self.keeper.stop()
        self.fetch_pool.shutdown(wait=True, cancel_futures=True)
        self.render_pool.shutdown(wait=True, cancel_futures=True)
        self.db.dispose()


@dataclass
class ChunkReport:
    """What happened to each job id of a chunk. ``retry`` went back to the queue (transient errors);
    ``skipped`` were not claimable (done already, or owned by a live worker)."""

    succeeded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Ticket:
    """A claimed job, detached from its database session."""

    job_id: str
    image_uri: str
    model: str
    spec: ModelSpec
    settings: MethodSettings
    target: str | None
    config: str


@dataclass
class _Prepared:
    ticket: _Ticket
    sha256: str
    tensor: torch.Tensor
    crop: np.ndarray
    target_index: int | None
    fetch_seconds: float


class _Chunk:
    """Bookkeeping for one ``process_jobs`` call: records outcomes and reports them."""

    def __init__(self, runtime: Runtime, report: ChunkReport, on_job: JobCallback | None) -> None:
        self.runtime = runtime
        self.report = report
        self.on_job = on_job
        self.worker_id = current_identity().worker_id

    def _done(self, job_id: str, state: JobState) -> None:
        self.runtime.keeper.release([job_id], done=state != JobState.QUEUED)
        if self.on_job is not None:
            self.on_job(job_id, state)

    def fail(self, ticket: _Ticket, exc: BaseException) -> None:
        settings = self.runtime.settings
        retryable = isinstance(exc, TransientError)
        message = str(exc) or repr(exc)
        log.warning(
            "job %s (%s, %s) failed: %s: %s",
            ticket.job_id,
            ticket.image_uri,
            ticket.model,
            type(exc).__name__,
            message,
        )
        with self.runtime.db.session() as session:
            state = record_failure(
                session,
                ticket.job_id,
                worker_id=self.worker_id,
                error_class=type(exc).__name__,
                message=message,
                retryable=retryable,
                max_attempts=settings.max_attempts,
            )
        if state is JobState.QUEUED:
            self.report.retry.append(ticket.job_id)
        elif state is JobState.FAILED:
            self.report.failed.append(ticket.job_id)
        if state is not None:
            self._done(ticket.job_id, state)

    def succeed(self, ticket: _Ticket, outcome: JobOutcome) -> None:
        with self.runtime.db.session() as session:
            won = record_success(session, ticket.job_id, worker_id=self.worker_id, outcome=outcome)
        if won:
            self.report.succeeded.append(ticket.job_id)
            self._done(ticket.job_id, JobState.SUCCEEDED)

    def try_reuse(self, prepared: _Prepared) -> bool:
        """Point the job at an earlier identical job's artifacts, if there is one."""
        ticket = prepared.ticket
        with self.runtime.db.session() as session:
            source = find_reusable(session, prepared.sha256, ticket.config)
            if source is None:
                return False
            won = record_reuse(
                session,
                ticket.job_id,
                worker_id=self.worker_id,
                source=source,
                fetch_seconds=prepared.fetch_seconds,
            )
        if won:
            self.report.reused.append(ticket.job_id)
            self._done(ticket.job_id, JobState.SUCCEEDED)
        return True


def process_jobs(
    runtime: Runtime, job_ids: Sequence[str], *, on_job: JobCallback | None = None
) -> ChunkReport:
    """Process the claimable jobs among ``job_ids``; every claimed job ends succeeded, failed or queued.

    Raises only for failures of the whole chunk that are worth retrying as a whole (the database or
    the object store unreachable while claiming or recording): ``TransientError``.
    """
    report = ChunkReport()
    tickets = _claim(runtime, job_ids)
    claimed = {t.job_id for t in tickets}
    report.skipped = [job_id for job_id in job_ids if job_id not in claimed]
    if not tickets:
        return report
    runtime.keeper.hold(claimed)
    chunk = _Chunk(runtime, report, on_job)
    groups: dict[tuple[str, MethodSettings], list[_Ticket]] = {}
    for ticket in tickets:
        groups.setdefault((ticket.spec.fingerprint(), ticket.settings), []).append(ticket)
    try:
        for group in groups.values():
            _process_group(chunk, group)
    finally:
        runtime.keeper.release(claimed, done=False)
        runtime.keeper.current_model = None
    return report


def _claim(runtime: Runtime, job_ids: Sequence[str]) -> list[_Ticket]:
    settings = runtime.settings
    with runtime.db.session() as session:
        jobs = claim_jobs(
            session,
            job_ids,
            worker=current_identity(),
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            is_dead=is_dead_local_process,
        )
        batches = session.scalars(sa.select(Batch).where(Batch.id.in_({job.batch_id for job in jobs})))
        by_id = {batch.id: batch for batch in batches}
        return [_ticket(job, by_id[job.batch_id]) for job in jobs]


def _ticket(job: Job, batch: Batch) -> _Ticket:
    """The job with its model spec and method settings, which its batch records once for all its jobs."""
    return _Ticket(
        job_id=job.id,
        image_uri=job.image_uri,
        model=job.model,
        spec=ModelSpec.from_dict(batch.models["specs"][job.model]),
        settings=MethodSettings.from_dict(batch.settings),
        target=job.target,
        config=job.config_fingerprint,
    )


def _process_group(chunk: _Chunk, tickets: list[_Ticket]) -> None:
    """Jobs that share a model and settings: fetch all concurrently, compute in micro-batches."""
    runtime = chunk.runtime
    spec = tickets[0].spec
    runtime.keeper.current_model = spec.name
    try:
        loaded = runtime.models.get(spec)
        check_supported(loaded.model, spec.name)
    except (PermanentError, TransientError) as exc:
        for ticket in tickets:
            chunk.fail(ticket, exc)
        return
    fetches = [runtime.fetch_pool.submit(_prepare, runtime, loaded, ticket) for ticket in tickets]
    stores: list[tuple[_Ticket, Future[JobOutcome]]] = []
    in_flight: dict[tuple[str, str], list[_Prepared]] = {}  # identical (image, config) inside this chunk
    pending: list[_Prepared] = []
    for ticket, fetch in zip(tickets, fetches, strict=True):
        try:
            prepared = fetch.result()
        except Exception as exc:  # recorded on this job only; the rest of the chunk goes on
            chunk.fail(ticket, exc)
            continue
        duplicate_of = in_flight.get((prepared.sha256, ticket.config))
        if duplicate_of is not None:
            duplicate_of.append(prepared)
            continue
        if chunk.try_reuse(prepared):
            continue
        in_flight[(prepared.sha256, ticket.config)] = []
        pending.append(prepared)
        if len(pending) == runtime.settings.batch_size:
            stores += _compute(chunk, loaded, pending)
            pending = []
    if pending:
        stores += _compute(chunk, loaded, pending)
    _record(chunk, stores)
    for followers in in_flight.values():
        for prepared in followers:
            if not chunk.try_reuse(prepared):  # the original failed: compute this one on its own
                _record(chunk, _compute(chunk, loaded, [prepared]))


def _record(chunk: _Chunk, stores: list[tuple[_Ticket, Future[JobOutcome]]]) -> None:
    """Wait for each job's rendering and upload, then record it as succeeded, or failed with the reason."""
    for ticket, store in stores:
        try:
            chunk.succeed(ticket, store.result())
        except Exception as exc:
            chunk.fail(ticket, exc)


def _prepare(runtime: Runtime, loaded: LoadedModel, ticket: _Ticket) -> _Prepared:
    """Fetch, hash, decode and preprocess one image; resolve its target. Runs on the fetch pool."""
    start = time.perf_counter()
    data = runtime.fetcher.fetch(ticket.image_uri)
    image = decode_image(data, max_pixels=runtime.settings.max_image_pixels)
    num_classes = loaded.model.num_classes
    cropped = loaded.preprocessor.crop(image)
    return _Prepared(
        ticket=ticket,
        sha256=content_sha256(data),
        tensor=loaded.preprocessor.normalize(cropped),
        crop=np.array(cropped, dtype=np.uint8),
        target_index=resolve_target(ticket.target, loaded.labels, num_classes),
        fetch_seconds=time.perf_counter() - start,
    )


def _compute(
    chunk: _Chunk, loaded: LoadedModel, batch: list[_Prepared]
) -> list[tuple[_Ticket, Future[JobOutcome]]]:
    """One forward + backward for the micro-batch; rendering and upload go to the store pool."""
    runtime = chunk.runtime
    settings = batch[0].ticket.settings
    start = time.perf_counter()
    try:
        images = torch.stack([p.tensor for p in batch]).to(runtime.device, non_blocking=True)
        explanations = explain_in_batches(
            loaded.model,
            images,
            settings,
            [p.target_index for p in batch],
            batch_size=len(batch),
            autocast_dtype=runtime.autocast,
        )
    except Exception as exc:
        if len(batch) == 1:
            chunk.fail(batch[0].ticket, exc)
            return []
        # Find the image that breaks the batch instead of failing its neighbours.
        log.warning("micro-batch of %d failed (%s); retrying its images one by one", len(batch), exc)
        return [result for prepared in batch for result in _compute(chunk, loaded, [prepared])]
    per_image = (time.perf_counter() - start) / len(batch)
    return [
        (p.ticket, runtime.render_pool.submit(_store, runtime, loaded, p, e, per_image))
        for p, e in zip(batch, explanations, strict=True)
    ]


def _content_type(name: str) -> str:
    return "image/png" if name.endswith(".png") else "application/x-npy"


def _store(
    runtime: Runtime,
    loaded: LoadedModel,
    prepared: _Prepared,
    explanation: Explanation,
    compute_seconds: float,
) -> JobOutcome:
    """Render every artifact, upload them under deterministic keys, describe them for the database."""
    start = time.perf_counter()
    ticket = prepared.ticket
    arrays = explanation.arrays()
    rendered = render_artifacts(arrays, prepared.crop, title=f"{ticket.model}: layer scores")
    keys = {name: artifact_key(prepared.sha256, ticket.model, ticket.config, name) for name in rendered}
    uris = runtime.store.put_many((keys[name], data, _content_type(name)) for name, data in rendered.items())
    artifacts = [
        ArtifactRecord(
            name=name,
            uri=uris[keys[name]],
            content_type=_content_type(name),
            bytes=len(data),
            checksum=hashlib.sha256(data).hexdigest(),
            shape=_shape(name, data, arrays),
            dtype=str(arrays[name].dtype) if name in arrays else "uint8",
        )
        for name, data in sorted(rendered.items())
    ]
    labels = loaded.labels
    predictions = [
        PredictionRecord(
            rank=rank,
            class_index=int(index),
            prob=float(prob),
            label=labels[int(index)] if labels is not None and int(index) < len(labels) else None,
        )
        for rank, (index, prob) in enumerate(
            zip(explanation.top_indices, explanation.top_probs, strict=True), 1
        )
    ]
    return JobOutcome(
        image_sha256=prepared.sha256,
        target_index=int(explanation.target),
        device=str(runtime.device),
        weights_source=loaded.weights_source,
        artifacts=artifacts,
        predictions=predictions,
        fetch_seconds=prepared.fetch_seconds,
        compute_seconds=compute_seconds,
        store_seconds=time.perf_counter() - start,
    )


def _shape(name: str, data: bytes, arrays: dict[str, np.ndarray]) -> str:
    if name in arrays:
        return "x".join(str(d) for d in arrays[name].shape)
    width, height = Image.open(io.BytesIO(data)).size  # reads the header only
    return f"{height}x{width}x3"
