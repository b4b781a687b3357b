"""The Celery app both sides share, configured from settings, and how jobs are routed to queues.

The producer publishes by task name with this app and never imports worker code (so it installs
without torch); the worker registers the task under the same name. Delivery is at-least-once on
purpose: ``acks_late`` + ``reject_on_worker_lost`` + prefetch 1 mean a killed worker's chunk is
delivered again, and the database claims in ``common.db.jobs`` make that harmless. Messages carry
job ids only; the database is the source of truth and nothing is stored in a result backend.
"""

from __future__ import annotations

import re

from celery import Celery

from common.errors import PermanentError
from common.modelspec import ModelSpec, is_transformers_model, timm_model_names
from common.settings import Settings

__all__ = [
    "DEFAULT_QUEUE",
    "QUEUE_PREFIX",
    "TASK_PROCESS_JOBS",
    "TRANSFORMERS_QUEUE",
    "family_of",
    "known_queues",
    "make_celery",
    "queue_for",
]

TASK_PROCESS_JOBS = "vitscope.process_jobs"
QUEUE_PREFIX = "vitscope."
DEFAULT_QUEUE = QUEUE_PREFIX + "default"
# Jobs of Hugging Face ``transformers`` models: a worker without the ``hf`` extra leaves it alone.
TRANSFORMERS_QUEUE = QUEUE_PREFIX + "transformers"

_FAMILY = re.compile(r"^(?P<family>[a-z0-9]+(?:_[a-z0-9]+)*?)_patch\d+")


def family_of(arch: str) -> str | None:
    """``vit_base_patch16_224.augreg_in1k`` → ``vit_base``; ``deit_tiny_distilled_patch16_224`` →
    ``deit_tiny_distilled``. None for names without a patch size (hf-hub ids and the like)."""
    if arch.startswith("hf-hub:"):
        return None
    match = _FAMILY.match(arch.split(".", 1)[0])
    return match.group("family") if match else None


def queue_for(spec: ModelSpec) -> str:
    """One queue per model family, so a worker can be pinned to the models it keeps warm; every
    ``transformers`` model (``hf:``) goes to ``TRANSFORMERS_QUEUE``, served by workers that have it."""
    if is_transformers_model(spec.arch):
        return TRANSFORMERS_QUEUE
    family = family_of(spec.arch)
    return QUEUE_PREFIX + family if family else DEFAULT_QUEUE


def known_queues() -> list[str]:
    """Every queue a job can be routed to: the families of timm's architecture names, the
    ``transformers`` queue, and the default."""
    families = {family_of(name) for name in timm_model_names()}
    return [DEFAULT_QUEUE, TRANSFORMERS_QUEUE, *sorted(QUEUE_PREFIX + f for f in families if f)]


def make_celery(settings: Settings) -> Celery:
    """A Celery app with vitscope's delivery semantics. Requires ``VITSCOPE_BROKER_URL``."""
    if not settings.broker_url:
        raise PermanentError("no broker configured: set VITSCOPE_BROKER_URL (e.g. redis://host:6379/0)")
    if settings.task_time_limit_seconds >= settings.visibility_timeout_seconds:
        raise PermanentError(
            "VITSCOPE_TASK_TIME_LIMIT_SECONDS must be below VITSCOPE_VISIBILITY_TIMEOUT_SECONDS, or Redis "
            "redelivers chunks that are still running"
        )
    app = Celery("vitscope", broker=settings.broker_url, set_as_current=False)
    restore_interval = max(1, min(10, settings.visibility_timeout_seconds // 4))
    app.conf.update(
        # JSON only: a pickle message from anyone who can reach Redis would run code in the worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once delivery, one chunk at a time per process.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # A hard limit only: a soft limit raises inside the chunk, where it would be recorded as the
        # jobs' own failure. A killed chunk is redelivered and its jobs retried up to max_attempts.
        task_time_limit=settings.task_time_limit_seconds,
        task_default_queue=DEFAULT_QUEUE,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # How often an idle worker sweeps for messages whose consumer died (the sweep period
            # is interval × throttle); keep it well under the visibility timeout.
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "socket_keepalive": True,
        },
        # Model loading happens in the child before it reports ready; give it time.
        worker_proc_alive_timeout=600,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app
