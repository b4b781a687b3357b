"""Worker liveness: heartbeats written by workers, read by ``producer status``."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db._sql import dialect_insert
from common.db.models import WorkerHeartbeat, utcnow
from common.db.records import WorkerIdentity

__all__ = ["live_workers", "record_heartbeat"]


def record_heartbeat(
    session: Session,
    *,
    worker: WorkerIdentity,
    node: str | None = None,
    queues: str | None,
    device: str | None,
    running_jobs: int,
    current_model: str | None,
    jobs_done: int,
    now: datetime | None = None,
) -> None:
    now = now or utcnow()
    values = {
        "hostname": worker.hostname,
        "node": node,
        "queues": queues,
        "device": device,
        "last_seen_at": now,
        "running_jobs": running_jobs,
        "current_model": current_model,
        "jobs_done": jobs_done,
    }
    stmt = dialect_insert(session, WorkerHeartbeat).values(
        worker_id=worker.worker_id, started_at=now, **values
    )
    session.execute(stmt.on_conflict_do_update(index_elements=["worker_id"], set_=values))


def live_workers(
    session: Session, *, stale_after_seconds: float, now: datetime | None = None
) -> list[WorkerHeartbeat]:
    """Workers heard from within ``stale_after_seconds``."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_seconds)
    query = (
        sa.select(WorkerHeartbeat)
        .where(WorkerHeartbeat.last_seen_at >= cutoff)
        .order_by(WorkerHeartbeat.hostname, WorkerHeartbeat.worker_id)
    )
    return list(session.scalars(query))
