"""One chunk of jobs, end to end: claim → prepare → compute → store → record.

The same code runs inside a Celery worker and in ``producer submit --local``; only the shell that
hands it job ids differs. Work overlaps so the device is not left waiting: images are fetched and
decoded by a thread pool while earlier micro-batches compute, and rendering/uploading happens on
another pool while the next micro-batch computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from common.db.records import JobOutcome
from common.errors import PermanentError, TransientError
from common.methods import MethodSettings
from common.metrics import MetricSettings
from worker.pipeline.claim import Ticket, claim
from worker.pipeline.compute import compute
from worker.pipeline.prepare import Prepared, prepare
from worker.pipeline.record import ChunkReport, JobCallback, Recorder
from worker.pipeline.runtime import Runtime

__all__ = ["process_jobs"]


def process_jobs(
    runtime: Runtime, job_ids: Sequence[str], *, on_job: JobCallback | None = None
) -> ChunkReport:
    """Process the claimable jobs among ``job_ids``; every claimed job ends succeeded, failed or queued.

    Raises only for failures of the whole chunk that are worth retrying as a whole (the database or
    the object store unreachable while claiming or recording): ``TransientError``.
    """
    report = ChunkReport()
    tickets = claim(runtime, job_ids)
    claimed = {t.job_id for t in tickets}
    report.skipped = [job_id for job_id in job_ids if job_id not in claimed]
    if not tickets:
        return report
    runtime.keeper.hold(claimed)
    recorder = Recorder(runtime, report, on_job)
    groups: dict[tuple[str, MethodSettings, MetricSettings], list[Ticket]] = {}
    for ticket in tickets:
        groups.setdefault((ticket.spec.fingerprint(), ticket.settings, ticket.metrics), []).append(ticket)
    try:
        for group in groups.values():
            _process_group(recorder, group)
    finally:
        runtime.keeper.release(claimed, done=False)
        runtime.keeper.current_model = None
    return report


def _process_group(recorder: Recorder, tickets: list[Ticket]) -> None:
    """Jobs that share a model and settings: fetch all concurrently, compute in micro-batches."""
    runtime = recorder.runtime
    spec = tickets[0].spec
    runtime.keeper.current_model = spec.name
    try:
        loaded = runtime.models.get(spec)  # refuses a model the core cannot explain
    except (PermanentError, TransientError) as exc:
        for ticket in tickets:
            recorder.fail(ticket, exc)
        return
    fetches = [runtime.fetch_pool.submit(prepare, runtime, loaded, ticket) for ticket in tickets]
    stores: list[tuple[Ticket, Future[JobOutcome]]] = []
    in_flight: dict[tuple[str, str], list[Prepared]] = {}  # identical (image, config) inside this chunk
    pending: list[Prepared] = []
    for ticket, fetch in zip(tickets, fetches, strict=True):
        try:
            prepared = fetch.result()
        except Exception as exc:  # recorded on this job only; the rest of the chunk goes on
            recorder.fail(ticket, exc)
            continue
        duplicate_of = in_flight.get((prepared.sha256, ticket.config))
        if duplicate_of is not None:
            duplicate_of.append(prepared)
            continue
        if recorder.try_reuse(prepared):
            continue
        in_flight[(prepared.sha256, ticket.config)] = []
        pending.append(prepared)
        if len(pending) == runtime.settings.batch_size:
            stores += compute(recorder, loaded, pending)
            pending = []
    if pending:
        stores += compute(recorder, loaded, pending)
    _record(recorder, stores)
    for followers in in_flight.values():
        for prepared in followers:
            if not recorder.try_reuse(prepared):  # the original failed: compute this one on its own
                _record(recorder, compute(recorder, loaded, [prepared]))


def _record(recorder: Recorder, stores: list[tuple[Ticket, Future[JobOutcome]]]) -> None:
    """Wait for each job's rendering and upload, then record it as succeeded, or failed with the reason."""
    for ticket, stored in stores:
        try:
            recorder.succeed(ticket, stored.result())
        except Exception as exc:
            recorder.fail(ticket, exc)
