"""Record: each job's end in the database (succeeded, reused, failed or back in the queue).

Every failure is recorded on its own job (permanent → failed, transient → back to the queue for a
retry); one bad image never fails the rest of its chunk.

In the shards layout a finished micro-batch joins the chunk's open shard instead; the shard is
written and its jobs recorded when a flush rule closes it (``shard.ShardRules``) or the chunk ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from common.db import Database
from common.db.jobs import find_reusable, find_reusables, record_failure, record_reuse, record_successes
from common.db.models import JobState
from common.db.records import JobOutcome
from common.errors import TransientError
from common.storage import ObjectStore
from worker.leases import LeaseKeeper, current_identity
from worker.pipeline.claim import Ticket
from worker.pipeline.clock import StageClock
from worker.pipeline.prepare import Prepared
from worker.pipeline.shard import ShardRules, Unwritten, write_shard

__all__ = ["ChunkReport", "JobCallback", "Recorder", "Recording"]

log = logging.getLogger(__name__)

JobCallback = Callable[[str, JobState], None]


@dataclass(frozen=True)
class Recording:
    """What recording uses: the database and the store (synced, or written a shard at a time, before
    jobs are recorded), this process's leases, the record thread, the stage clock, the shards
    layout's flush rules (``None`` in the objects layout) and the attempts a job gets."""

    db: Database
    store: ObjectStore
    keeper: LeaseKeeper
    pool: ThreadPoolExecutor
    clock: StageClock
    shard_rules: ShardRules | None
    max_attempts: int


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
    """Bookkeeping for one chunk: records outcomes and reports them.

    Called from the chunk's driving thread (failures, reuse) and from the runtime's record thread
    (finished micro-batches); a lock keeps the report and the callbacks in one order.
    """

    def __init__(self, recording: Recording, report: ChunkReport, on_job: JobCallback | None) -> None:
        self.recording = recording
        self.report = report
        self.on_job = on_job
        self.worker_id = current_identity().worker_id
        self._lock = threading.RLock()
        # The open shard (shards layout): touched only on the record thread, except that the
        # flush timer (``max_seconds``) submits a flush to that thread.
        self._shard: list[tuple[Ticket, Unwritten]] = []
        self._shard_bytes = 0
        self._timer: threading.Timer | None = None
        self._timed_flushes: list[Future[None]] = []

    def _done(self, job_id: str, state: JobState) -> None:
        self.recording.keeper.release([job_id], done=state != JobState.QUEUED)
        if self.on_job is not None:
            self.on_job(job_id, state)

    def fail(self, ticket: Ticket, exc: BaseException) -> None:
        retryable = isinstance(exc, TransientError)
        message = str(exc) or repr(exc)
        # %r: the URI, model and message are users' text, and a log is read on a terminal; repr shows
        # escape sequences and bidi overrides as escapes instead of sending them to it.
        log.warning(
            "job %s (%r, %r) failed: %s: %r",
            ticket.job_id,
            ticket.image_uri,
            ticket.model,
            type(exc).__name__,
            message,
        )
        with self.recording.db.session() as session:
            state = record_failure(
                session,
                ticket.job_id,
                worker_id=self.worker_id,
                error_class=type(exc).__name__,
                message=message,
                retryable=retryable,
                max_attempts=self.recording.max_attempts,
            )
        with self._lock:
            if state is JobState.QUEUED:
                self.report.retry.append(ticket.job_id)
            elif state is JobState.FAILED:
                self.report.failed.append(ticket.job_id)
            if state is not None:
                self._done(ticket.job_id, state)

    def failed_at_claim(self, job_ids: Sequence[str]) -> None:
        """Report jobs the claim already recorded as failed (they could not become tickets)."""
        with self._lock:
            for job_id in job_ids:
                self.report.failed.append(job_id)
                if self.on_job is not None:
                    self.on_job(job_id, JobState.FAILED)

    def succeed_all(self, stored: Sequence[tuple[Ticket, Future[JobOutcome | Unwritten]]]) -> None:
        """Wait for a micro-batch's uploads, make them durable, then record its successes in one
        transaction; a job whose rendering or upload failed is recorded as failed with the reason.
        In the shards layout the jobs join the open shard instead (``flush`` records them)."""
        outcomes: list[tuple[str, JobOutcome]] = []
        unwritten: list[tuple[Ticket, Unwritten]] = []
        uploaded: list[Ticket] = []
        for ticket, future in stored:
            try:
                result = future.result()
            except Exception as exc:
                self.fail(ticket, exc)
                continue
            if isinstance(result, Unwritten):
                unwritten.append((ticket, result))
            else:
                outcomes.append((ticket.job_id, result))
                uploaded.append(ticket)
        if unwritten:
            self._add_to_shard(unwritten)
        if not outcomes:
            return
        try:  # no job is recorded before its artifacts would survive a power loss
            with self.recording.clock.measure("store"):
                self.recording.store.sync()
        except Exception as exc:
            for ticket in uploaded:
                self.fail(ticket, exc)
            return
        self._record_successes(outcomes)

    def _record_successes(self, outcomes: list[tuple[str, JobOutcome]]) -> None:
        with self.recording.clock.measure("record"), self.recording.db.session() as session:
            won = record_successes(session, outcomes, worker_id=self.worker_id)
        with self._lock:
            for job_id in won:
                self.report.succeeded.append(job_id)
                self._done(job_id, JobState.SUCCEEDED)

    def _add_to_shard(self, jobs: list[tuple[Ticket, Unwritten]]) -> None:
        """Put finished jobs in the open shard; write it if a size rule says so, else make sure the
        time rule will (on the record thread)."""
        rules = self.recording.shard_rules
        assert rules is not None
        self._shard += jobs
        self._shard_bytes += sum(job.size for _, job in jobs)
        while (count := self._full_prefix(rules.max_jobs, rules.max_bytes)) > 0:
            self._write_shard(count)
        with self._lock:
            if self._shard and self._timer is None:
                self._timer = threading.Timer(rules.max_seconds, self._flush_on_time)
                self._timer.daemon = True
                self._timer.start()

    def _full_prefix(self, max_jobs: int, max_bytes: int) -> int:
        """How many of the open shard's first jobs make a full shard (``max_jobs`` of them, or the
        fewest that reach ``max_bytes``); 0 while the shard is not full."""
        if self._shard_bytes < max_bytes:
            return max_jobs if len(self._shard) >= max_jobs else 0
        total = 0
        for count, (_, job) in enumerate(self._shard[:max_jobs], 1):
            total += job.size
            if total >= max_bytes:
                return count
        return max_jobs

    def _flush_on_time(self) -> None:
        """The time rule (timer thread): the oldest job of the open shard has waited ``max_seconds``."""
        with self._lock:
            self._timer = None
            # RuntimeError: the runtime is closing; the chunk's own end flushes or abandons the shard.
            with contextlib.suppress(RuntimeError):
                self._timed_flushes.append(self.recording.pool.submit(self.flush))

    def flush(self) -> None:
        """Write the open shard, if any, and record its jobs (on the record thread)."""
        while self._shard:
            self._write_shard(len(self._shard))

    def take_timed_flushes(self) -> list[Future[None]]:
        """The flushes the time rule started, for the chunk to wait on (and raise their errors)."""
        with self._lock:
            flushes, self._timed_flushes = self._timed_flushes, []
        return flushes

    def discard_shard(self) -> None:
        """Forget the open shard (the chunk failed as a whole): its jobs stay running under this
        process, and the chunk's retry takes them back and computes them again."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._shard, self._shard_bytes = [], 0

    def _write_shard(self, count: int) -> None:
        """Write the first ``count`` jobs of the open shard as one shard, then record them; if the
        write fails, each of them fails (a transient error puts it back in the queue)."""
        jobs, self._shard = self._shard[:count], self._shard[count:]
        self._shard_bytes = sum(job.size for _, job in self._shard)
        if not self._shard:
            with self._lock:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        try:  # no row points into a shard before the whole shard would survive a power loss
            with self.recording.clock.measure("store"):
                outcomes = write_shard(self.recording.store, [job for _, job in jobs])
        except Exception as exc:
            for ticket, _ in jobs:
                self.fail(ticket, exc)
            return
        self._record_successes(
            [(ticket.job_id, outcome) for (ticket, _), outcome in zip(jobs, outcomes, strict=True)]
        )

    def reuse_all(self, candidates: Sequence[Prepared]) -> list[Prepared]:
        """Point each job that has an earlier identical job at its artifacts, all in one lookup and
        one transaction; returns the candidates left to compute."""
        if not candidates:
            return []
        reused: list[str] = []
        left: list[Prepared] = []
        # Jobs that ask for metrics may reuse only a source holding the same metric values: looked up
        # one by one (metrics cost far more than a query); the rest in one query.
        plain = [p for p in candidates if p.ticket.metrics_config is None]
        with self.recording.clock.measure("record"), self.recording.db.session() as session:
            sources = find_reusables(session, [(p.sha256, p.ticket.config) for p in plain])
            for prepared in candidates:
                ticket = prepared.ticket
                source = (
                    sources.get((prepared.sha256, ticket.config))
                    if ticket.metrics_config is None
                    else find_reusable(
                        session, prepared.sha256, ticket.config, metrics_config=ticket.metrics_config
                    )
                )
                if source is None:
                    left.append(prepared)
                elif record_reuse(
                    session,
                    prepared.ticket.job_id,
                    worker_id=self.worker_id,
                    source=source,
                    fetch_seconds=prepared.fetch_seconds,
                ):
                    reused.append(prepared.ticket.job_id)
        with self._lock:
            for job_id in reused:
                self.report.reused.append(job_id)
                self._done(job_id, JobState.SUCCEEDED)
        return left

    def try_reuse(self, prepared: Prepared) -> bool:
        """Point the job at an earlier identical job's artifacts, if there is one."""
        ticket = prepared.ticket
        with self.recording.clock.measure("record"), self.recording.db.session() as session:
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
            with self._lock:
                self.report.reused.append(ticket.job_id)
                self._done(ticket.job_id, JobState.SUCCEEDED)
        return True
