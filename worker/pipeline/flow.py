"""One chunk of jobs, end to end: claim → prepare → compute → store → record.

The same code runs inside a Celery worker and in ``producer submit --local``; only the shell that
hands it job ids differs. Each stage keeps the next one fed:

    claim      this thread       take the jobs, group them by model and settings
    prepare    fetch threads     download, hash, decode and crop (Pillow releases the GIL)
    compute    this thread       micro-batches on the device; overlays drawn there on a GPU
    store      store threads     pictures drawn, encoded and written in the CPU pool (or written here)
    record     record thread     one transaction per micro-batch

``process_chunks`` also overlaps chunks: the next chunk is claimed and its images fetched and
decoded while the current one's last micro-batches are stored and recorded, so the device does not
wait at chunk boundaries. Every failure is recorded on its own job (permanent → failed, transient →
back to the queue); one bad image never fails the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from common.errors import PermanentError, TransientError
from common.methods import MethodSettings
from common.metric_settings import MetricSettings
from worker.models import LoadedModel
from worker.pipeline.claim import Ticket, claim
from worker.pipeline.compute import Computing, compute
from worker.pipeline.prepare import Prepared, Preparing, prepare
from worker.pipeline.record import ChunkReport, JobCallback, Recorder
from worker.pipeline.runtime import Runtime
from worker.pipeline.store import Stored, Storing, store_all

__all__ = ["process_chunks", "process_jobs"]


def process_jobs(
    runtime: Runtime, job_ids: Sequence[str], *, on_job: JobCallback | None = None
) -> ChunkReport:
    """Process the claimable jobs among ``job_ids``; every claimed job ends succeeded, failed or queued.

    Raises only for failures of the whole chunk that are worth retrying as a whole (the database or
    the object store unreachable while claiming or recording): ``TransientError``.
    """
    chunk = _Chunk.start(runtime, job_ids, on_job)
    try:
        chunk.compute()
    except BaseException:
        chunk.abandon()
        raise
    return chunk.finish()


def process_chunks(
    runtime: Runtime, chunks: Iterable[Sequence[str]], *, on_job: JobCallback | None = None
) -> Iterator[ChunkReport]:
    """``process_jobs`` for each chunk in turn, overlapped: a chunk is claimed, prepared and computed
    while the previous one's last micro-batches are still being stored and recorded, so the device
    does not wait at chunk boundaries. At most two chunks are in memory. Yields each chunk's report,
    in order, once it is recorded."""
    previous: _Chunk | None = None
    for job_ids in chunks:
        try:
            chunk = _Chunk.start(runtime, job_ids, on_job, previous=previous)
        except BaseException:
            if previous is not None:  # its jobs are recorded and released before the error goes up
                previous.finish()
            raise
        try:
            chunk.compute()
        except BaseException:
            chunk.abandon()
            if previous is not None:
                previous.finish()
            raise
        if previous is not None:
            yield previous.finish()
        previous = chunk
    if previous is not None:
        yield previous.finish()


@dataclass
class _Group:
    """Jobs of one chunk that share a model and settings, their images being prepared."""

    loaded: LoadedModel
    tickets: list[Ticket]
    fetches: list[Future[Prepared]]


@dataclass
class _Chunk:
    """One chunk in three steps: ``start`` (claim, start preparing), ``compute`` (micro-batches on
    the device, each handed on to store and record), ``finish`` (wait for the records, settle the
    duplicates, release the leases)."""

    runtime: Runtime
    recorder: Recorder
    claimed: set[str]
    # What the stages use, taken from the runtime when the chunk starts.
    preparing: Preparing
    computing: Computing
    storing: Storing
    groups: list[_Group] = field(default_factory=list)
    # (image sha256, config) computed here; a later chunk sends the same image to its duplicates
    # instead of computing it again while this chunk is still recording it.
    in_compute: set[tuple[str, str]] = field(default_factory=set)
    previous: set[tuple[str, str]] = field(default_factory=set)
    records: list[Future[None]] = field(default_factory=list)
    duplicates: list[tuple[LoadedModel, list[Prepared]]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        runtime: Runtime,
        job_ids: Sequence[str],
        on_job: JobCallback | None,
        *,
        previous: _Chunk | None = None,
    ) -> _Chunk:
        """Claim the jobs, load their models and start preparing every image."""
        report = ChunkReport()
        taken = claim(runtime.claiming(), job_ids)
        tickets = taken.tickets
        claimed = {t.job_id for t in tickets}
        report.skipped = [job_id for job_id in job_ids if job_id not in claimed | set(taken.failed)]
        chunk = cls(
            runtime,
            Recorder(runtime.recording(), report, on_job),
            claimed,
            runtime.preparing(),
            runtime.computing(),
            runtime.storing(),
        )
        chunk.recorder.failed_at_claim(taken.failed)
        if previous is not None:
            chunk.previous = previous.in_compute
        runtime.keeper.hold(claimed)
        try:
            chunk._load_groups(tickets)
        except BaseException:
            chunk.abandon()
            raise
        return chunk

    def _load_groups(self, tickets: list[Ticket]) -> None:
        """Load each group's model and start preparing its images."""
        runtime = self.runtime
        by_key: dict[tuple[str, MethodSettings, MetricSettings], list[Ticket]] = {}
        for ticket in tickets:
            by_key.setdefault((ticket.spec.fingerprint(), ticket.settings, ticket.metrics), []).append(ticket)
        for group in by_key.values():
            loaded = self._load(group)
            if loaded is not None:
                fetches = [runtime.fetch_pool.submit(prepare, self.preparing, loaded, t) for t in group]
                self.groups.append(_Group(loaded, group, fetches))

    def _load(self, tickets: list[Ticket]) -> LoadedModel | None:
        spec = tickets[0].spec
        try:
            loaded = self.runtime.models.get(spec)  # refuses a model the core cannot explain
        except (PermanentError, TransientError) as exc:
            for ticket in tickets:
                self.recorder.fail(ticket, exc)
            return None
        return loaded

    def compute(self) -> None:
        """Compute every group in micro-batches as its images arrive; hand results to store and record."""
        for group in self.groups:
            self.runtime.keeper.current_model = group.loaded.spec.name
            self._compute_group(group)
        if self.runtime.shard_rules is not None:
            # The chunk's last shard is written now, behind the next chunk's claim and compute
            # (``process_chunks`` finishes this chunk only after computing the next one).
            self.records.append(self.runtime.record_pool.submit(self.recorder.flush))

    def _compute_group(self, group: _Group) -> None:
        """Images in arrival order; each micro-batch's worth is looked up for reuse in one query,
        and what is left is computed in micro-batches."""
        batch_size = self.runtime.settings.batch_size
        in_flight: dict[tuple[str, str], list[Prepared]] = {}  # identical (image, config) in this chunk
        candidates: list[Prepared] = []
        pending: list[Prepared] = []
        for ticket, fetch in zip(group.tickets, group.fetches, strict=True):
            try:
                prepared = fetch.result()
            except Exception as exc:  # recorded on this job only; the rest of the chunk goes on
                self.recorder.fail(ticket, exc)
                continue
            key = (prepared.sha256, ticket.config)
            if key in in_flight:
                in_flight[key].append(prepared)
            elif key in self.previous:
                in_flight[key] = [prepared]  # reused once the previous chunk has recorded it
            else:
                in_flight[key] = []
                candidates.append(prepared)
            if len(candidates) == batch_size:
                pending += self.recorder.reuse_all(candidates)
                candidates = []
            while len(pending) >= batch_size:
                self._compute_and_store(group.loaded, pending[:batch_size])
                pending = pending[batch_size:]
        pending += self.recorder.reuse_all(candidates)
        for start in range(0, len(pending), batch_size):
            self._compute_and_store(group.loaded, pending[start : start + batch_size])
        followers = [prepared for waiting in in_flight.values() for prepared in waiting]
        if followers:
            self.duplicates.append((group.loaded, followers))

    def _compute_and_store(self, loaded: LoadedModel, batch: list[Prepared]) -> None:
        self.in_compute.update((p.sha256, p.ticket.config) for p in batch)
        computed = compute(self.computing, self.recorder, loaded, batch)
        stored: list[tuple[Ticket, Future[Stored]]] = [
            (c.prepared.ticket, future)
            for c, future in zip(computed, store_all(self.storing, loaded, computed), strict=True)
        ]
        if stored:
            self.records.append(self.runtime.record_pool.submit(self.recorder.succeed_all, stored))

    def finish(self) -> ChunkReport:
        """Wait for every record; then the in-chunk duplicates point at their originals' artifacts
        (or, where an original failed, are computed on their own)."""
        try:
            self._wait_for_records()
            for loaded, followers in self.duplicates:
                for prepared in followers:
                    if not self.recorder.try_reuse(prepared):  # the original failed: compute this one
                        self._compute_and_store(loaded, [prepared])
                        self._wait_for_records()  # so the next duplicate can reuse it
        finally:
            self.runtime.keeper.release(self.claimed, done=False)
            self.runtime.keeper.current_model = None
        return self.recorder.report

    def abandon(self) -> None:
        """After a failure of the whole chunk (the database or storage gone): let the micro-batches
        in flight end, then stop holding the jobs. Their rows stay running under this process, and the
        chunk's retry takes them back at once (``claim_jobs(reclaim_own=...)`` asks that this process
        holds no job) instead of waiting out their lease."""
        records, self.records = self.records, []
        for record in [*records, *self.recorder.take_timed_flushes()]:
            with contextlib.suppress(BaseException):  # the error that matters is already going up
                record.result()
        self.recorder.discard_shard()
        self.runtime.keeper.release(self.claimed, done=False)
        self.runtime.keeper.current_model = None

    def _wait_for_records(self) -> None:
        """Wait for every micro-batch's record and, in the shards layout, write the open shard: a
        chunk's jobs are all recorded (or failed) before it ends and lets go of their leases."""
        if self.runtime.shard_rules is not None:
            self.records.append(self.runtime.record_pool.submit(self.recorder.flush))
        records, self.records = self.records, []
        records += self.recorder.take_timed_flushes()
        first_error: BaseException | None = None
        for record in records:
            try:
                record.result()
            except BaseException as exc:  # wait for the others, then raise the first (TransientError)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
