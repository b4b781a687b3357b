"""Record: each job's end in the database (succeeded, reused, failed or back in the queue).

Every failure is recorded on its own job (permanent → failed, transient → back to the queue for a
retry); one bad image never fails the rest of its chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from common.db.jobs import find_reusable, record_failure, record_reuse, record_success
from common.db.models import JobState
from common.db.records import JobOutcome
from common.errors import TransientError
from worker.keeper import current_identity
from worker.pipeline.claim import Ticket
from worker.pipeline.prepare import Prepared
from worker.pipeline.runtime import Runtime

__all__ = ["ChunkReport", "JobCallback", "Recorder"]

log = logging.getLogger(__name__)

JobCallback = Callable[[str, JobState], None]


@dataclass
class ChunkReport:
    """What happened to each job id of a chunk. ``retry`` went back to the queue (transient errors);
    ``skipped`` were not claimable (done already, or owned by a live worker)."""

    succeeded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Recorder:
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

    def fail(self, ticket: Ticket, exc: BaseException) -> None:
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

    def succeed(self, ticket: Ticket, outcome: JobOutcome) -> None:
        with self.runtime.db.session() as session:
            won = record_success(session, ticket.job_id, worker_id=self.worker_id, outcome=outcome)
        if won:
            self.report.succeeded.append(ticket.job_id)
            self._done(ticket.job_id, JobState.SUCCEEDED)

    def try_reuse(self, prepared: Prepared) -> bool:
        """Point the job at an earlier identical job's artifacts, if there is one."""
        ticket = prepared.ticket
        with self.runtime.db.session() as session:
            source = find_reusable(
                session, prepared.sha256, ticket.config, metrics_config=ticket.metrics_config
            )
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
