"""The Celery shell: what it reports about itself, read from its settings in a fresh process, and
its recovery paths, run by a real ``worker start`` worker against real services.

Faults are caused where they happen in production — the database refusing connections, an image
server answering 503 — never by mocking the task: the database is our own per-test PostgreSQL
database, closed with ``ALLOW_CONNECTIONS false`` (which PostgreSQL enforces for superusers too) and
its sessions terminated, then opened again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import sqlalchemy as sa

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.celery_app import TASK_PROCESS_JOBS, make_celery
from common.db.models import Artifact, JobState, WorkerHeartbeat
from common.db.session import upgrade
from common.settings import Settings
from tests.worker.conftest import QUEUE, Cluster, http_dataset

ARTIFACTS_PER_JOB = len(ARRAY_ARTIFACTS) - 1 + len(IMAGE_ARTIFACTS)  # attention.npy is opt-in


@contextmanager
def _database_down(cluster: Cluster, admin_url: str) -> Iterator[None]:
    """The cluster's database refuses every connection, and its open sessions are cut, until exit."""
    name = cluster.engine.url.database
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        cluster.engine.dispose()  # its pooled connections were cut


def _artifact_counts(cluster: Cluster, job_ids: list[str]) -> dict[str, int]:
    with cluster.engine.connect() as conn:
        return dict(
            conn.execute(
                sa.select(Artifact.job_id, sa.func.count())
                .where(Artifact.job_id.in_(job_ids))
                .group_by(Artifact.job_id)
            ).all()
        )


def test_the_celery_shell_reports_the_node_and_queues_its_settings_name(
    tmp_path: Path, sqlite_url: str, broker_url: str
) -> None:
    """``VITSCOPE_WORKER_NODE`` and ``VITSCOPE_WORKER_QUEUES`` (which ``worker start`` sets for each
    Celery worker) reach the heartbeat through the settings, in the process ``celery -A worker.tasks``
    imports the shell in."""
    upgrade(sqlite_url)
    env = {
        **os.environ,
        "VITSCOPE_BROKER_URL": broker_url,
        "VITSCOPE_DATABASE_URL": sqlite_url,
        "VITSCOPE_STORAGE_URL": (tmp_path / "results").as_uri(),
        "VITSCOPE_DEVICE": "cpu",
        "VITSCOPE_WORKER_NODE": "shell@host",
        "VITSCOPE_WORKER_QUEUES": "deit_tiny,vit_base",
    }
    beat_once = (
        "from worker.tasks import runtime\nr = runtime()\ntry:\n    r.keeper.tick()\nfinally:\n    r.close()"
    )
    done = subprocess.run(
        [sys.executable, "-c", beat_once], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    engine = sa.create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(WorkerHeartbeat.node, WorkerHeartbeat.queues)).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [("shell@host", "deit_tiny,vit_base")]


def test_a_chunk_that_cannot_reach_the_database_is_retried_with_growing_backoff(
    cluster, tmp_path, write_image, image_server, postgres_admin_url
) -> None:
    csv = http_dataset(tmp_path, image_server, write_image, 2)
    batch_id = cluster.submit(csv)  # queued in Redis before any worker runs
    with _database_down(cluster, postgres_admin_url):
        cluster.start_worker("patient")
        # Claiming fails as a whole: the task retries after 5 s, then after 10 s (5 · 2^retries).
        cluster.wait_for_log("Retry in 5s")
        cluster.wait_for_log("Retry in 10s")
        assert not image_server.requests  # nothing was claimed, so nothing was fetched
    jobs = cluster.wait_done(batch_id)
    assert [(job.state, job.attempts) for job in jobs] == [(JobState.SUCCEEDED, 1)] * 2
    assert (
        "chunk of 2 job(s) hit a transient error, retrying: cannot connect to the database"
        in cluster.log_text()
    )


def test_jobs_a_chunk_hands_back_are_published_again(cluster, tmp_path, write_image, image_server) -> None:
    csv = http_dataset(tmp_path, image_server, write_image, 3)
    image_server.fail("/1.png", 1)  # one transient 503: that job alone goes back to the queue
    cluster.start_worker("w")
    batch_id = cluster.submit(csv)
    jobs = cluster.wait_done(batch_id)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 3, [job.error_message for job in jobs]
    assert [job.attempts for job in jobs] == [1, 2, 1]  # only the handed-back job ran again
    assert jobs[1].error_class is None  # its success cleared the transient error
    assert image_server.requests == {"/0.png": 1, "/1.png": 2, "/2.png": 1}
    assert _artifact_counts(cluster, [job.id for job in jobs]) == {job.id: ARTIFACTS_PER_JOB for job in jobs}


def test_a_malformed_message_is_dropped_logged_and_not_redelivered(
    cluster, tmp_path, write_image, image_server
) -> None:
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    celery = make_celery(Settings(broker_url=cluster.env["VITSCOPE_BROKER_URL"]))
    celery.send_task(TASK_PROCESS_JOBS, args=[[1, 2]], queue=QUEUE)
    celery.send_task(TASK_PROCESS_JOBS, args=["not-a-list"], queue=QUEUE)
    cluster.wait_for_log("dropping malformed message: 'not-a-list'")
    assert "dropping malformed message: [1, 2]" in cluster.log_text()
    # The worker lives on and still does real work; the dropped messages were acknowledged.
    batch_id = cluster.submit(http_dataset(tmp_path, image_server, write_image, 1))
    assert [job.state for job in cluster.wait_done(batch_id)] == [JobState.SUCCEEDED]
    broker = redis.Redis.from_url(cluster.env["VITSCOPE_BROKER_URL"], socket_timeout=5)
    try:
        deadline = time.monotonic() + 60  # the last task is acknowledged just after it records
        while broker.hlen("unacked") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert broker.hlen("unacked") == 0
        assert broker.llen(QUEUE) == 0
    finally:
        broker.close()
    assert cluster.log_text().count("dropping malformed message") == 2


def test_the_database_lost_mid_chunk_retries_the_chunk_and_every_job_ends_once(
    cluster, tmp_path, write_image, image_server, postgres_admin_url
) -> None:
    csv = http_dataset(tmp_path, image_server, write_image, 4)
    held = image_server.hold("/3.png")
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    batch_id = cluster.submit(csv)
    image_server.wait_for_request("/3.png")
    cluster.wait_for(
        batch_id, lambda jobs: {j.state for j in jobs} == {JobState.RUNNING}, "the chunk claimed"
    )
    with _database_down(cluster, postgres_admin_url):
        held.set()  # the chunk goes on, computes, and cannot record
        cluster.wait_for_log("Retry in 5s")
    jobs = cluster.wait_done(batch_id)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 4, cluster.log_tail()
    # The retried chunk took its own jobs back at once (a second attempt, by the same process) rather
    # than skipping them as another's and leaving them to the reaper once their lease ran out.
    assert {job.attempts for job in jobs} == {2}
    log = cluster.log_text()
    assert "'succeeded': 4, 'reused': 0, 'failed': 0, 'retry': 0, 'skipped': 0}" in log
    assert "'skipped': 4" not in log
    assert "whose lease expired" not in log
    assert len({job.worker_id for job in jobs}) == 1
    assert _artifact_counts(cluster, [job.id for job in jobs]) == {job.id: ARTIFACTS_PER_JOB for job in jobs}
    # The first attempt's shard (written, never recorded) may stay behind as an orphan.
    cluster.check_stored(jobs, ARTIFACTS_PER_JOB, orphans_allowed=True)
