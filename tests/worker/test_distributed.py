"""Distributed mode against real components: Redis, PostgreSQL, an S3 HTTP endpoint, and Celery
worker processes started with ``worker start`` — no eager mode, nothing mocked.

Leases, heartbeats, the reaper and Redis's visibility timeout are set to seconds so crash recovery
can be watched inside a test.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import numpy as np
import pytest
import redis
import sqlalchemy as sa

from common.db.models import Artifact, Batch, Job, JobState, WorkerHeartbeat
from common.db.session import upgrade
from common.methods import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.storage import read_uri

ARTIFACTS_PER_JOB = len(ARRAY_ARTIFACTS) - 1 + len(IMAGE_ARTIFACTS)  # attention.npy is opt-in
BIN = Path(sys.executable).parent
QUEUE = "vitscope.deit_tiny"


@dataclass
class Cluster:
    """A broker, a database, a bucket, and the worker processes a test starts."""

    env: dict[str, str]
    engine: sa.Engine
    bucket: str
    logs: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(
        self, name: str, *, pool: str = "prefork", env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            [
                str(BIN / "worker"),
                "start",
                "--gpus",
                "none",
                "--queues",
                "deit_tiny",
                "--pool",
                pool,
                "--loglevel",
                "info",
                "--hostname",
                f"{name}@%h",
            ],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(process)
        return process

    def wait_for_workers(self, count: int, timeout: float = 120) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                ids = conn.execute(sa.select(WorkerHeartbeat.worker_id)).scalars().all()
            if len(ids) >= count:
                return list(ids)
            time.sleep(0.5)
        raise AssertionError(f"{count} worker(s) did not report within {timeout} s:\n{self.log_tail()}")

    def producer(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "producer"), *args], env=self.env, capture_output=True, text=True, timeout=600
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"producer {args} exited {result.returncode}:\n{result.stderr}\n{result.stdout}"
            )
        return result

    def submit(self, csv: Path, *args: str) -> str:
        result = self.producer(
            "submit", str(csv), "--models", "deit_tiny_patch16_224", "--weights", "random", *args
        )
        return result.stdout.strip().splitlines()[-1]

    def jobs(self, batch_id: str) -> list[Job]:
        with sa.orm.Session(self.engine) as session:
            return list(
                session.scalars(sa.select(Job).where(Job.batch_id == batch_id).order_by(Job.row_number))
            )

    def wait_done(self, batch_id: str, timeout: float = 300) -> list[Job]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(batch_id)
            if jobs and all(job.state in (JobState.SUCCEEDED, JobState.FAILED) for job in jobs):
                return jobs
            time.sleep(0.5)
        states = sorted((job.state, job.attempts) for job in self.jobs(batch_id))
        raise AssertionError(f"batch {batch_id} not done after {timeout} s: {states}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log")))

    def objects(self, prefix: str = "") -> list[str]:
        s3 = boto3.client("s3")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def stop(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def cluster(postgres_url, redis_url, s3_bucket, s3_env, tmp_path) -> Iterator[Cluster]:
    broker = redis_url.rsplit("/", 1)[0] + "/15"  # a database of its own, flushed around each test
    client = redis.Redis.from_url(broker, socket_timeout=5)
    client.flushdb()
    upgrade(postgres_url)
    env = {
        **os.environ,
        "VITSCOPE_BROKER_URL": broker,
        "VITSCOPE_DATABASE_URL": postgres_url,
        "VITSCOPE_STORAGE_URL": f"s3://{s3_bucket}/artifacts",
        "VITSCOPE_CHUNK_SIZE": "4",
        "VITSCOPE_BATCH_SIZE": "4",
        "VITSCOPE_LEASE_SECONDS": "6",
        "VITSCOPE_HEARTBEAT_SECONDS": "1",
        "VITSCOPE_REAPER_INTERVAL_SECONDS": "2",
        "VITSCOPE_VISIBILITY_TIMEOUT_SECONDS": "20",
        "VITSCOPE_TASK_TIME_LIMIT_SECONDS": "15",
        "OMP_NUM_THREADS": "1",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    engine = sa.create_engine(postgres_url)
    result = Cluster(env=env, engine=engine, bucket=s3_bucket, logs=logs)
    try:
        yield result
    finally:
        result.stop()
        engine.dispose()
        client.flushdb()
        client.close()


def _dataset(tmp_path: Path, bucket: str, write_image, count: int, *, broken: int = 0) -> Path:
    s3 = boto3.client("s3")
    lines = ["id,image_uri"]
    for i in range(count):
        path = write_image(tmp_path / "img" / f"{i}.png", seed=i, size=(64 + i, 64))
        s3.upload_file(str(path), bucket, f"images/{i}.png")
        lines.append(f"img{i},s3://{bucket}/images/{i}.png")
    for i in range(broken):
        s3.put_object(Bucket=bucket, Key=f"images/broken{i}.png", Body=b"not an image")
        lines.append(f"broken{i},s3://{bucket}/images/broken{i}.png")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _check_artifacts(cluster: Cluster, jobs: list[Job]) -> None:
    with sa.orm.Session(cluster.engine) as session:
        counts = dict(
            session.execute(
                sa.select(Artifact.job_id, sa.func.count())
                .where(Artifact.job_id.in_([j.id for j in jobs]))
                .group_by(Artifact.job_id)
            ).all()
        )
        rollouts = session.scalars(
            sa.select(Artifact.uri).where(
                Artifact.job_id.in_([j.id for j in jobs]), Artifact.name == "rollout.npy"
            )
        ).all()
    assert counts == {job.id: ARTIFACTS_PER_JOB for job in jobs}
    for uri in rollouts:
        grid = np.load(io.BytesIO(read_uri(uri)))
        assert grid.shape == (14, 14)
        assert np.isfinite(grid).all()
    # Deterministic keys: one object per artifact of each distinct image, however often it was retried.
    assert len(cluster.objects("artifacts/")) == ARTIFACTS_PER_JOB * len({job.image_sha256 for job in jobs})


def test_two_workers_share_a_batch_and_do_every_job_once(cluster, tmp_path, write_image) -> None:
    csv = _dataset(tmp_path, cluster.bucket, write_image, 24)
    cluster.start_worker("one")
    cluster.start_worker("two")
    cluster.wait_for_workers(2)
    batch_id = cluster.submit(csv, "--name", "shared")
    jobs = cluster.wait_done(batch_id)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 24
    assert {job.attempts for job in jobs} == {1}  # nobody computed a job twice
    assert len({job.worker_id for job in jobs}) == 2, "both workers should have taken chunks"
    _check_artifacts(cluster, jobs)
    status = cluster.producer("status", "shared").stdout
    assert "live workers" in status
    assert "one@" in status
    assert "two@" in status


def test_killed_worker_child_is_redelivered_and_nothing_is_lost_or_doubled(
    cluster, tmp_path, write_image
) -> None:
    csv = _dataset(tmp_path, cluster.bucket, write_image, 16)
    cluster.start_worker("victim", env={"VITSCOPE_BATCH_SIZE": "1"})  # slow chunks: easy to hit mid-chunk
    cluster.wait_for_workers(1)
    batch_id = cluster.submit(csv)
    deadline = time.monotonic() + 120
    running: list[Job] = []
    while time.monotonic() < deadline and not running:
        running = [job for job in cluster.jobs(batch_id) if job.state == JobState.RUNNING]
        time.sleep(0.05)
    assert running, cluster.log_tail()
    child_pid = int(running[0].worker_id.rsplit(":", 1)[1])
    os.kill(child_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    jobs = cluster.wait_done(batch_id)
    recovery = time.monotonic() - killed_at
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 16, [job.error_message for job in jobs]
    retried = [job for job in jobs if job.attempts == 2]
    assert {job.id for job in running} <= {job.id for job in retried}
    assert all(job.attempts <= 2 for job in jobs)
    _check_artifacts(cluster, jobs)
    print(f"\nprefork child SIGKILL: batch finished {recovery:.1f} s after the kill")


def test_whole_worker_killed_its_jobs_come_back_to_another_worker(cluster, tmp_path, write_image) -> None:
    csv = _dataset(tmp_path, cluster.bucket, write_image, 12)
    first = cluster.start_worker("doomed", env={"VITSCOPE_BATCH_SIZE": "1"})
    cluster.wait_for_workers(1)
    batch_id = cluster.submit(csv)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        j.state == JobState.RUNNING for j in cluster.jobs(batch_id)
    ):
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # parent and child: no one is left to hand the message back
    first.wait()
    cluster.start_worker("rescuer")
    jobs = cluster.wait_done(batch_id, timeout=240)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 12, cluster.log_tail()
    assert any(job.worker_id.startswith(job.worker_host) and job.attempts >= 2 for job in jobs)
    _check_artifacts(cluster, jobs)


def test_submit_wait_reports_failures_and_retry_fixes_them(cluster, tmp_path, write_image) -> None:
    csv = _dataset(tmp_path, cluster.bucket, write_image, 3, broken=1)
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    result = cluster.producer(
        "submit", str(csv), "--models", "deit_tiny_patch16_224", "--weights", "random", "--wait", check=False
    )
    assert result.returncode == 1, result.stderr
    batch_id = result.stdout.strip().splitlines()[-1]
    jobs = cluster.jobs(batch_id)
    assert sorted(job.state for job in jobs) == ["failed", "succeeded", "succeeded", "succeeded"]
    failed = cluster.producer("results", batch_id, "--status", "failed", "--format", "jsonl").stdout
    assert "ImageError" in failed
    assert "broken0" in failed

    # Fix the image, retry: only the failed job runs again, through the queue.
    boto3.client("s3").upload_file(str(tmp_path / "img" / "0.png"), cluster.bucket, "images/broken0.png")
    assert "1 failed job(s)" in cluster.producer("retry", batch_id).stderr
    jobs = cluster.wait_done(batch_id)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 4
    assert jobs[-1].reused_from is not None  # same bytes as image 0: pointed at its artifacts


def test_chunked_submission_of_10000_rows(cluster, tmp_path) -> None:
    csv = tmp_path / "big.csv"
    csv.write_text("image_uri\n" + "".join(f"s3://{cluster.bucket}/images/{i}.png\n" for i in range(10_000)))
    start = time.perf_counter()
    batch_id = cluster.submit(csv)
    elapsed = time.perf_counter() - start
    broker = redis.Redis.from_url(cluster.env["VITSCOPE_BROKER_URL"], socket_timeout=5)
    assert broker.llen(QUEUE) == 10_000 // 4
    jobs = cluster.jobs(batch_id)
    assert len(jobs) == 10_000
    assert all(job.state == JobState.QUEUED for job in jobs)
    with sa.orm.Session(cluster.engine) as session:
        assert session.get(Batch, batch_id).published_at is not None
    print(
        f"\nsubmitted 10,000 rows in {elapsed:.2f} s ({10_000 / elapsed:,.0f} jobs/s, CLI start-up included)"
    )


def test_pickle_messages_are_refused(cluster, tmp_path, write_image) -> None:
    from kombu import Connection

    cluster.start_worker("strict")
    cluster.wait_for_workers(1)
    with Connection(cluster.env["VITSCOPE_BROKER_URL"]) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish(
            {"malicious": True},
            routing_key=QUEUE,
            headers={"task": "vitscope.process_jobs", "id": "pickle-1", "argsrepr": "", "kwargsrepr": ""},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "pickle" not in cluster.log_tail():
        time.sleep(0.5)
    assert "refusing to deserialize" in cluster.log_tail().lower()
