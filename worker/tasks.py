"""The Celery shell around ``process_jobs``: decode the message, run the chunk, choose a retry.

Like a web view, the task is thin: the message carries job ids only and the pipeline re-reads
everything from the database. Start workers with ``worker start`` (``celery -A worker.tasks worker``
underneath). The runtime — database engine, S3 client, CUDA context, warm models — is created in
the process that runs tasks, after Celery forks it, never in the parent.
"""

from __future__ import annotations

import logging
import os

from celery import Task
from celery.signals import worker_process_init, worker_process_shutdown

from common.celery_app import TASK_PROCESS_JOBS, make_celery
from common.db.jobs import interrupted_jobs
from common.db.records import QueuedJob
from common.errors import TransientError
from common.publish import broker_lost_data, publish_jobs
from common.settings import get_settings
from worker.leases import current_identity, is_dead_local_process
from worker.pipeline import Runtime, process_jobs

__all__ = ["app", "process_jobs_task", "runtime"]

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)

# Transient failures back off 5 s, 10 s, 20 s … up to 5 minutes, for about an hour in all.
MAX_TASK_RETRIES = 16
_state: dict[str, Runtime | int] = {}


def _republish(jobs: list[QueuedJob]) -> None:
    publish_jobs(app, jobs, chunk_size=settings.chunk_size)


def _broker_lost() -> bool:
    return broker_lost_data(app)


def runtime() -> Runtime:
    """This process's runtime, made on first use (and made again in a forked child)."""
    current = _state.get("runtime")
    if not isinstance(current, Runtime) or _state.get("pid") != os.getpid():
        current = Runtime.from_settings(
            settings,
            node=settings.worker_node,
            queues=settings.worker_queues,
            on_requeued=_republish,
            broker_lost=_broker_lost,
        )
        _state.update(runtime=current, pid=os.getpid())
    return current


@worker_process_init.connect
def _start_child(**_kwargs: object) -> None:
    """Open connections and select the device in the child, warm up the image kernels (so no job is
    charged for compiling them), then start heartbeats and the reaper."""
    current = runtime()
    seconds = current.warm_up()
    log.info("warm-up (compiled image kernels, CPU pool started) in %.1f s", seconds)
    current.keeper.start()


@worker_process_shutdown.connect
def _stop_child(**_kwargs: object) -> None:
    current = _state.get("runtime")
    if isinstance(current, Runtime) and _state.get("pid") == os.getpid():
        current.close()


def _backoff(retries: int) -> int:
    return min(5 * 2**retries, 300)


def _isolate_suspects(task: Task, job_ids: list[str]) -> list[str]:
    """Send each job a worker already died on back as a message of its own; return the rest.

    A chunk whose worker was killed (OOM killer, segfault, an image that crashes the decoder) comes
    back whole, and retrying it whole would charge every neighbour an attempt each time the same
    image kills the worker again, until all fail together. One job per message instead: the poison
    job spends only its own attempts and fails with the reason (``lost_worker_reason``); its
    neighbours succeed on their next attempt. Costs one micro-batch per suspect, only after a crash.
    """
    if len(job_ids) < 2:
        return job_ids
    with runtime().db.session() as session:
        suspects = interrupted_jobs(
            session, job_ids, host=current_identity().hostname, is_dead=is_dead_local_process
        )
    if not suspects:
        return job_ids
    log.warning(
        "%d of %d job(s) in this chunk were held by a worker that died; processing each on its own",
        len(suspects),
        len(job_ids),
    )
    queue = task.request.delivery_info.get("routing_key") if task.request.delivery_info else None
    for job_id in suspects:
        task.apply_async(args=[[job_id]], queue=queue)
    isolated = set(suspects)
    return [job_id for job_id in job_ids if job_id not in isolated]


@app.task(name=TASK_PROCESS_JOBS, bind=True, acks_late=True, reject_on_worker_lost=True)
def process_jobs_task(self: Task, job_ids: list[str]) -> dict[str, int]:
    """Process one chunk. Returns counts (for logs only: results live in the database)."""
    if not isinstance(job_ids, list) or not all(isinstance(job_id, str) for job_id in job_ids):
        log.error("dropping malformed message: %r", job_ids)
        return {"malformed": 1}
    try:
        job_ids = _isolate_suspects(self, job_ids)
        report = process_jobs(runtime(), job_ids)
    except TransientError as exc:
        log.warning("chunk of %d job(s) hit a transient error, retrying: %s", len(job_ids), exc)
        raise self.retry(
            exc=exc, countdown=_backoff(self.request.retries), max_retries=MAX_TASK_RETRIES
        ) from exc
    if report.retry:
        # Jobs whose own transient error (a timed-out download, say) put them back in the queue.
        self.apply_async(
            args=[report.retry],
            countdown=_backoff(self.request.retries),
            queue=self.request.delivery_info.get("routing_key") if self.request.delivery_info else None,
        )
    return {
        "succeeded": len(report.succeeded),
        "reused": len(report.reused),
        "failed": len(report.failed),
        "retry": len(report.retry),
        "skipped": len(report.skipped),
    }
