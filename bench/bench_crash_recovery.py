"""What a crash costs: the process running a chunk is SIGKILLed; how long until the batch is done?

Two pools, same workload (``deit_tiny_patch16_224``, one image per micro-batch so chunks are slow):

* ``prefork`` (one child): the child is killed; the parent notices at once, the message goes back to
  Redis (reject-on-worker-lost) and a new child re-claims the dead child's jobs immediately. Nothing
  outside the worker has to act.
* ``solo``: the worker process itself is killed (it is the one running the chunk) and the message it
  held stays unacknowledged until the Redis visibility timeout. Here a supervisor restarts it on the
  same host at once; on start its reaper sees the predecessor's jobs owned by a dead local process
  and re-enqueues them. Without such a restart, recovery waits for the leases to expire (lease +
  reaper interval, minutes in production) or the visibility timeout.

The timeouts are the production ones scaled down by 10 (lease 18 s, reaper 6 s, visibility 60 s).

    .venv/bin/python bench/bench_crash_recovery.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from common.db.models import Job, JobState

from _services import (
    postgres_database,
    redis_broker,
    s3_endpoint,
    start_worker,
    stop,
    submit,
    upload_images,
    wait_done,
    wait_for_worker,
)


def first_running(engine: sa.Engine, batch_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            owner = conn.execute(
                sa.select(Job.worker_id)
                .where(Job.batch_id == batch_id, Job.state == JobState.RUNNING)
                .limit(1)
            ).scalar()
        if owner:
            return owner
        time.sleep(0.02)
    raise RuntimeError("no job started")


def measure(pool: str, images: int, workdir: Path) -> dict[str, float]:
    with postgres_database() as db_url, redis_broker() as broker, s3_endpoint() as bucket:
        csv = upload_images(bucket, images, workdir, prefix=pool, size=(224, 224))
        env = {
            **os.environ,
            "VITSCOPE_DATABASE_URL": db_url,
            "VITSCOPE_BROKER_URL": broker,
            "VITSCOPE_STORAGE_URL": f"s3://{bucket}/artifacts",
            "VITSCOPE_BATCH_SIZE": "1",
            "VITSCOPE_CHUNK_SIZE": "8",
            "VITSCOPE_LEASE_SECONDS": "18",
            "VITSCOPE_HEARTBEAT_SECONDS": "3",
            "VITSCOPE_REAPER_INTERVAL_SECONDS": "6",
            "VITSCOPE_VISIBILITY_TIMEOUT_SECONDS": "60",
            "VITSCOPE_TASK_TIME_LIMIT_SECONDS": "50",
        }
        engine = sa.create_engine(db_url)
        log = workdir / f"{pool}.log"
        worker = start_worker(env, log, pool=pool, name=pool)
        replacement = None
        try:
            wait_for_worker(engine)
            batch_id = submit(env, csv)
            owner = first_running(engine, batch_id)
            pid = int(owner.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            if pool == "solo":  # the worker itself died: a supervisor (systemd, k8s) restarts it
                worker.wait()
                replacement = start_worker(env, log, pool=pool, name=f"{pool}-restarted")
            wait_done(engine, batch_id, timeout=900)
            recovered = time.monotonic() - killed
            with engine.connect() as conn:
                states = dict(
                    conn.execute(
                        sa.select(Job.state, sa.func.count())
                        .where(Job.batch_id == batch_id)
                        .group_by(Job.state)
                    ).all()
                )
                retried = conn.execute(
                    sa.select(sa.func.count()).where(Job.batch_id == batch_id, Job.attempts > 1)
                ).scalar()
        finally:
            for process in (worker, replacement):
                if process is not None:
                    stop(process)
            engine.dispose()
    return {
        "pool": pool,
        "seconds_from_kill_to_done": round(recovered, 1),
        "succeeded": states.get(JobState.SUCCEEDED, 0),
        "failed": states.get(JobState.FAILED, 0),
        "jobs_retried": retried,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(pool, args.images, Path(tmp)) for pool in ("prefork", "solo")]
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"SIGKILL of the process running a chunk; {args.images} jobs, chunks of 8, lease 18 s, visibility 60 s"
    )
    for r in results:
        print(
            f"  {r['pool']:<8} done {r['seconds_from_kill_to_done']:6.1f} s after the kill; "
            f"{r['succeeded']} succeeded, {r['failed']} failed, {r['jobs_retried']} job(s) retried"
        )


if __name__ == "__main__":
    main()
