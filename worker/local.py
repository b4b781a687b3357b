"""Running a batch in this process: the embedded default, and ``producer submit --local``.

The jobs go through the same pipeline as in a Celery worker (``process_chunks``: chunk after chunk,
the next prepared while the last is recorded); this module only plays the queue's part: it hands out the batch's queued jobs in chunks, retries transient failures with
backoff until their attempts run out, and reports progress.

Interrupted (Ctrl-C, i.e. ``KeyboardInterrupt`` in the thread that runs the batch), it lets the
micro-batches being recorded finish for a few seconds, hands the jobs it still holds back to the
queue without charging them an attempt, and raises ``RunInterrupted``: ``producer resume`` runs the
rest. A run killed outright (SIGKILL, a crash) leaves its jobs ``running`` under a process that no
longer exists; ``producer resume`` takes those back (``reap_expired`` with ``is_dead_local_process``).

Local image files: where ``VITSCOPE_FILE_ROOTS`` is unset, a local run reads them from the batch's
dataset folder only (the folder of the CSV it was submitted from), so ``producer submit data.csv``
works with images beside the CSV while ``../../etc/passwd`` in a downloaded CSV is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.db.batches import get_batch, queued_jobs
from common.db.jobs import release_batch
from common.db.models import JobState
from common.errors import WeightsUnavailableError
from common.fetch import DefaultFetcher
from common.modelspec import RANDOM, ModelSpec
from worker.leases import current_identity
from worker.pipeline import Runtime, process_chunks
from worker.weights import check_pretrained_available

__all__ = [
    "LocalRun",
    "RunInterrupted",
    "dataset_folder_runtime",
    "load_models",
    "run_batch",
    "unavailable_weights",
]

log = logging.getLogger(__name__)

# Locally, a chunk can be larger than a queue message: nobody else is competing for the jobs.
LOCAL_CHUNK_BATCHES = 4
# After Ctrl-C, how long the micro-batches already computed may take to be recorded before the jobs
# still held are handed back (a job recorded is one the resume need not compute again).
INTERRUPT_GRACE_SECONDS = 5.0


@dataclass
class LocalRun:
    succeeded: int = 0
    reused: int = 0
    failed: int = 0
    rounds: int = 0
    seconds: float = 0.0
    fallbacks: dict[str, str] = field(default_factory=dict)
    released: int = 0  # jobs in hand handed back to the queue when the run was interrupted


class RunInterrupted(KeyboardInterrupt):
    """A local run stopped by Ctrl-C after handing its jobs in hand back to the queue; ``run`` says
    what it did until then (``run.released``: the jobs handed back)."""

    def __init__(self, run: LocalRun) -> None:
        super().__init__(f"interrupted; {run.released} job(s) handed back to the queue")
        self.run = run


def unavailable_weights(specs: Mapping[str, ModelSpec], *, weights_dir: Path | None) -> dict[str, str]:
    """Every model whose pretrained weights cannot be got (not in ``weights_dir``, not cached, the
    download host unreachable), with why; checked before any model is built, seconds per model.

    All of them, not the first: an offline user learns in one message every model they must give
    weights for (or run with random ones), instead of one model per attempt.
    """
    missing: dict[str, str] = {}
    for name, spec in specs.items():
        try:
            check_pretrained_available(spec, weights_dir=weights_dir)
        except WeightsUnavailableError as exc:
            missing[name] = str(exc)
    return missing


def load_models(
    runtime: Runtime, specs: Mapping[str, ModelSpec], *, random_fallback: bool
) -> dict[str, ModelSpec]:
    """Load every model before the batch is created, so missing weights stop the run up front.

    With ``random_fallback`` a model whose pretrained weights cannot be reached is replaced by the
    same architecture with RANDOM weights — returned, so the caller records (and shows) that choice;
    without it the WeightsUnavailableError, with its instructions, is raised.
    """
    replacements: dict[str, ModelSpec] = {}
    for name, spec in specs.items():
        try:
            runtime.models.get(spec)
        except WeightsUnavailableError:
            if not random_fallback or spec.weights == RANDOM:
                raise
            random_spec = ModelSpec.from_dict({**spec.to_dict(), "weights": RANDOM})
            runtime.models.get(random_spec)
            replacements[name] = random_spec
    return replacements


def run_batch(
    runtime: Runtime,
    batch_id: str,
    *,
    on_job: Callable[[str, JobState], None] | None = None,
    backoff_seconds: float = 2.0,
) -> LocalRun:
    """Process every queued job of the batch; returns when none is left.

    ``RunInterrupted`` (a ``KeyboardInterrupt``) when interrupted, once the jobs in hand are queued again.
    """
    runtime = dataset_folder_runtime(runtime, batch_id)
    run = LocalRun()
    start = time.perf_counter()
    try:
        _run_rounds(runtime, batch_id, run, on_job=on_job, backoff_seconds=backoff_seconds)
    except KeyboardInterrupt:
        run.seconds = time.perf_counter() - start
        run.released = _hand_back(runtime, batch_id)
        raise RunInterrupted(run) from None
    run.seconds = time.perf_counter() - start
    return run


def _hand_back(runtime: Runtime, batch_id: str) -> int:
    """Let what is being recorded finish (briefly), then put this process's running jobs back in the
    queue. Recording after the hand-back is harmless: it is compare-and-set on ``running``."""
    drained = runtime.record_pool.submit(lambda: None)  # one thread, first in first out
    with contextlib.suppress(Exception):
        drained.result(timeout=INTERRUPT_GRACE_SECONDS)
    with runtime.db.session() as session:
        released = release_batch(session, batch_id, worker_id=current_identity().worker_id)
    runtime.keeper.release(runtime.keeper.held(), done=False)
    return len(released)


def _run_rounds(
    runtime: Runtime,
    batch_id: str,
    run: LocalRun,
    *,
    on_job: Callable[[str, JobState], None] | None,
    backoff_seconds: float,
) -> None:
    chunk_size = runtime.settings.batch_size * LOCAL_CHUNK_BATCHES
    while True:
        with runtime.db.session() as session:
            jobs = queued_jobs(session, batch_id)
        if not jobs:
            break
        if run.rounds:
            time.sleep(min(backoff_seconds * 2 ** (run.rounds - 1), 60.0))
        run.rounds += 1
        progressed = retried = 0
        chunks = [[job.id for job in jobs[i : i + chunk_size]] for i in range(0, len(jobs), chunk_size)]
        for ids, report in zip(chunks, process_chunks(runtime, chunks, on_job=on_job), strict=True):
            run.succeeded += len(report.succeeded)
            run.reused += len(report.reused)
            run.failed += len(report.failed)
            retried += len(report.retry)
            progressed += len(ids) - len(report.skipped)
        if not progressed:
            log.warning(
                "batch %s: %d queued job(s) are held by other workers; leaving them", batch_id, len(jobs)
            )
            break
        if not retried:
            break


def dataset_folder_runtime(runtime: Runtime, batch_id: str) -> Runtime:
    """The runtime whose fetcher reads local files from the batch's dataset folder, when it has no
    file roots of its own (``VITSCOPE_FILE_ROOTS`` unset); otherwise ``runtime`` unchanged.

    The copy shares the original's connections, pools and warm models: closing either closes both.
    """
    fetcher = runtime.fetcher
    if not isinstance(fetcher, DefaultFetcher) or fetcher.policy.file_roots:
        return runtime
    with runtime.db.session() as session:
        source = Path(get_batch(session, batch_id).source)
    if not source.is_absolute():
        return runtime
    return dataclasses.replace(runtime, fetcher=fetcher.with_file_roots((source.parent,)))
