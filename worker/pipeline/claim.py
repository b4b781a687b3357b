"""Claim: take ownership of a chunk's claimable jobs and detach them from the database session.

A claimed job that cannot become a ticket — its model is not among those its batch recorded (a row
changed after validation, a hand-edited job row) — is failed here with the reason, in the claim's own
transaction: one such job must not crash the chunk and strand its neighbours as ``running``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from common.db import Database
from common.db.jobs import claim_jobs, record_failure
from common.db.models import Batch, Job
from common.errors import UnknownModelError, VitscopeError
from common.methods import MethodSettings
from common.metric_settings import MetricSettings
from common.modelspec import ModelSpec
from worker.leases import LeaseKeeper, current_identity, is_dead_local_process

__all__ = ["Claimed", "Claiming", "Ticket", "claim"]


@dataclass(frozen=True)
class Ticket:
    """A claimed job, detached from its database session."""

    job_id: str
    image_uri: str
    model: str
    spec: ModelSpec
    settings: MethodSettings
    target: str | None
    config: str
    metrics: MetricSettings = field(default_factory=MetricSettings)
    bbox: str | None = None  # the CSV's bbox and mask_uri cells, for the localization metrics
    mask_uri: str | None = None

    @property
    def metrics_config(self) -> str | None:
        """Digest of this job's metric settings and region (``None`` when it asks for no metrics)."""
        return self.metrics.digest(self.bbox or self.mask_uri) if self.metrics.enabled else None


@dataclass(frozen=True)
class Claimed:
    """What a claim took: the runnable jobs as tickets, in the order asked for, and the ids of the
    claimed jobs it failed at once because they cannot be run (``UnknownModelError``)."""

    tickets: list[Ticket]
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claiming:
    """What claiming uses: the database, this process's leases and the terms of a claim."""

    db: Database
    keeper: LeaseKeeper
    lease_seconds: float
    max_attempts: int


def claim(claiming: Claiming, job_ids: Sequence[str]) -> Claimed:
    """The jobs among ``job_ids`` this worker now owns, in the order asked for."""
    identity = current_identity()
    with claiming.db.session() as session:
        jobs = claim_jobs(
            session,
            job_ids,
            worker=identity,
            lease_seconds=claiming.lease_seconds,
            max_attempts=claiming.max_attempts,
            is_dead=is_dead_local_process,
            # Holding nothing, this process's own running jobs were abandoned by an earlier chunk
            # (a whole-chunk transient error): take them back instead of waiting out their lease.
            reclaim_own=not claiming.keeper.held(),
        )
        batches = session.scalars(sa.select(Batch).where(Batch.id.in_({job.batch_id for job in jobs})))
        by_id = {batch.id: batch for batch in batches}
        claimed = Claimed(tickets=[])
        for job in jobs:
            try:
                claimed.tickets.append(_ticket(job, by_id[job.batch_id]))
            except UnknownModelError as exc:
                record_failure(
                    session,
                    job.id,
                    worker_id=identity.worker_id,
                    error_class=type(exc).__name__,
                    message=str(exc),
                    retryable=False,
                    max_attempts=claiming.max_attempts,
                )
                claimed.failed.append(job.id)
        return claimed


def _spec(job: Job, batch: Batch) -> ModelSpec:
    """The job's model as its batch recorded it; ``UnknownModelError`` when the batch has no such model."""
    specs = (batch.models or {}).get("specs") or {}
    if job.model not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise UnknownModelError(
            f"model {job.model!r} is not one of batch {batch.id}'s models ({known}), so its settings are "
            "unknown and the job cannot run: the row changed after the dataset was validated, or the job "
            "was edited in the database"
        )
    try:
        return ModelSpec.from_dict(specs[job.model])
    except (VitscopeError, KeyError, TypeError, ValueError) as exc:
        raise UnknownModelError(f"batch {batch.id} records model {job.model!r} unreadably: {exc}") from exc


def _ticket(job: Job, batch: Batch) -> Ticket:
    """The job with its model spec and method settings, which its batch records once for all its jobs."""
    return Ticket(
        job_id=job.id,
        image_uri=job.image_uri,
        model=job.model,
        spec=_spec(job, batch),
        settings=MethodSettings.from_dict(batch.settings),
        target=job.target,
        config=job.config_fingerprint,
        metrics=MetricSettings.from_dict(batch.settings.get("metrics")),
        bbox=(job.row_metadata or {}).get("bbox") or None,
        mask_uri=(job.row_metadata or {}).get("mask_uri") or None,
    )
