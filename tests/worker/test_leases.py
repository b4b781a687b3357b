"""The lease keeper: leases outlive their first term while a chunk is slow, and dead owners are told
from live ones — a killed process, a zombie, a process on another host."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.db import open_database
from common.db.models import Job, JobState, utcnow
from common.settings import Settings
from producer.submit import SubmitOptions, commit_plan, plan_submission
from tests.conftest import ImageServer
from worker.leases import current_identity, is_dead_local_process
from worker.pipeline import ChunkReport, Runtime, process_jobs

HOST = socket.gethostname()


def _exited_pid() -> int:
    """The pid of a process that ran, exited and was reaped: nothing runs under it now."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_process_that_exited_is_dead() -> None:
    assert is_dead_local_process(f"{HOST}:{_exited_pid()}") is True


def test_a_zombie_is_dead() -> None:
    """A child that exited but was not yet reaped still has a pid; it will never renew a lease."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        stat = Path(f"/proc/{process.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        assert is_dead_local_process(f"{HOST}:{process.pid}") is True
    finally:
        process.wait()


def test_a_running_process_is_alive() -> None:
    assert is_dead_local_process(current_identity().worker_id) is False
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        try:
            assert is_dead_local_process(f"{HOST}:{sleeper.pid}") is False
        finally:
            sleeper.kill()


@pytest.mark.parametrize("pid", ["exited", "self"])
def test_a_process_on_another_host_is_never_judged_dead(pid: str) -> None:
    """Its pid means nothing here: only its lease running out can free its jobs."""
    number = _exited_pid() if pid == "exited" else os.getpid()
    assert is_dead_local_process(f"other-{HOST}:{number}") is False


@pytest.mark.parametrize("worker_id", [f"{HOST}:", f"{HOST}:abc", HOST, ""])
def test_an_unreadable_owner_is_not_judged_dead(worker_id: str) -> None:
    assert is_dead_local_process(worker_id) is False


def test_a_chunk_slower_than_its_lease_keeps_its_jobs(
    tmp_path: Path, sqlite_url: str, image_server: ImageServer, write_image
) -> None:
    """The chunk waits on a held image for well past ``lease_seconds``; the keeper renews the lease,
    so the job stays this worker's, and it succeeds on its first attempt."""
    image_server.images["/a.png"] = write_image(tmp_path / "a.png").read_bytes()
    held = image_server.hold("/a.png")
    csv = tmp_path / "data.csv"
    csv.write_text(f"image_uri\n{image_server.url('/a.png')}\n")
    settings = Settings(
        database_url=sqlite_url,
        storage_url=(tmp_path / "out").as_uri(),
        device="cpu",
        lease_seconds=3,
        heartbeat_seconds=0.5,
        allow_private_networks=True,
    )
    db = open_database(settings, migrate=True)
    options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
    batch_id = commit_plan(db, plan_submission(csv, options), options, mode="local").batch_id
    with db.session() as session:
        (job_id,) = session.scalars(sa.select(Job.id).where(Job.batch_id == batch_id)).all()
    runtime = Runtime.from_settings(settings, db=db)
    reports: list[ChunkReport] = []
    chunk = threading.Thread(target=lambda: reports.append(process_jobs(runtime, [job_id])))
    try:
        chunk.start()
        image_server.wait_for_request("/a.png")
        with db.session() as session:
            first_term = session.get(Job, job_id).lease_expires_at
        deadline = time.monotonic() + 120
        while True:  # until the first term is over: the lease must have been renewed past it
            with db.session() as session:
                job = session.get(Job, job_id)
            if utcnow() > first_term and job.lease_expires_at > utcnow():
                break
            assert time.monotonic() < deadline, f"lease not renewed: {job.lease_expires_at} vs {first_term}"
            time.sleep(0.1)
        assert (job.state, job.worker_id) == (JobState.RUNNING, current_identity().worker_id)
        held.set()
        chunk.join(timeout=300)
        assert [report.succeeded for report in reports] == [[job_id]]
        with db.session() as session:
            job = session.get(Job, job_id)
        assert (job.state, job.attempts) == (JobState.SUCCEEDED, 1)
    finally:
        held.set()
        chunk.join(timeout=300)
        runtime.close()


def test_a_broker_that_lost_its_data_gets_every_queued_job_published_again_in_one_round(
    tmp_path: Path, sqlite_url: str, private_redis
) -> None:
    """The queue flushed (as a Redis restarted without persistence leaves it): the next reaper round
    sees the marker gone and publishes every queued job of the published batch again — not after
    ``republish_after_seconds`` (2 h here) — and a second round, or a second worker, publishes nothing."""
    from common.celery_app import make_celery
    from common.publish import broker_lost_data, publish_jobs
    from producer.submit import enqueue
    from worker.leases import LeaseKeeper

    settings = Settings(database_url=sqlite_url, broker_url=private_redis.url, chunk_size=4)
    db = open_database(settings, migrate=True)
    app = make_celery(settings)
    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\n" + "".join(f"s3://b/{i}.png\n" for i in range(10)))
    options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
    batch_id = commit_plan(db, plan_submission(csv, options), options, mode="distributed").batch_id
    unpublished = commit_plan(db, plan_submission(csv, options), options, mode="distributed").batch_id
    assert enqueue(app, db, batch_id, chunk_size=4) == 3
    redis = private_redis.client()
    queue = "vitscope.deit_tiny"
    assert redis.llen(queue) == 3
    redis.flushall()

    def keeper() -> LeaseKeeper:
        return LeaseKeeper(
            db,
            settings,
            on_requeued=lambda jobs: publish_jobs(app, jobs, chunk_size=4),
            broker_lost=lambda: broker_lost_data(app),
        )

    first, second = keeper(), keeper()
    republished = first.reap()
    assert len(republished) == 10
    assert redis.llen(queue) == 3
    with db.session() as session:
        jobs = session.scalars(sa.select(Job).where(Job.batch_id == batch_id)).all()
        assert {job.state for job in jobs} == {JobState.QUEUED}
        # the batch whose producer is still publishing it (not marked published) is left to it
        assert (
            session.scalar(
                sa.select(sa.func.count()).where(Job.batch_id == unpublished, Job.requeued_at.is_not(None))
            )
            == 0
        )
    assert second.reap() == []  # the marker is back: nothing lost any more
    assert first.reap() == []
    assert redis.llen(queue) == 3
    db.dispose()
