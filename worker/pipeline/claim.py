"""Claim: take ownership of a chunk's claimable jobs and detach them from the database session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from common.db.jobs import claim_jobs
from common.db.models import Batch, Job
from common.methods import MethodSettings
from common.metrics import MetricSettings
from common.modelspec import ModelSpec
from worker.keeper import current_identity, is_dead_local_process
from worker.pipeline.runtime import Runtime

__all__ = ["Ticket", "claim"]


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


def claim(runtime: Runtime, job_ids: Sequence[str]) -> list[Ticket]:
    """The jobs among ``job_ids`` this worker now owns, in the order asked for."""
    settings = runtime.settings
    with runtime.db.session() as session:
        jobs = claim_jobs(
            session,
            job_ids,
            worker=current_identity(),
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            is_dead=is_dead_local_process,
            # Holding nothing, this process's own running jobs were abandoned by an earlier chunk
            # (a whole-chunk transient error): take them back instead of waiting out their lease.
            reclaim_own=not runtime.keeper.held(),
        )
        batches = session.scalars(sa.select(Batch).where(Batch.id.in_({job.batch_id for job in jobs})))
        by_id = {batch.id: batch for batch in batches}
        return [_ticket(job, by_id[job.batch_id]) for job in jobs]


def _ticket(job: Job, batch: Batch) -> Ticket:
    """The job with its model spec and method settings, which its batch records once for all its jobs."""
    return Ticket(
        job_id=job.id,
        image_uri=job.image_uri,
        model=job.model,
        spec=ModelSpec.from_dict(batch.models["specs"][job.model]),
        settings=MethodSettings.from_dict(batch.settings),
        target=job.target,
        config=job.config_fingerprint,
        metrics=MetricSettings.from_dict(batch.settings.get("metrics")),
        bbox=(job.row_metadata or {}).get("bbox") or None,
        mask_uri=(job.row_metadata or {}).get("mask_uri") or None,
    )
