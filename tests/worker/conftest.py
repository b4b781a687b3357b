"""A distributed cluster for tests: Redis, PostgreSQL, an S3 HTTP endpoint, and Celery worker processes
started with ``worker start`` — no eager mode, nothing mocked.

Leases, heartbeats, the reaper and Redis's visibility timeout are seconds instead of minutes so that
recovery can be watched inside a test, yet with margin enough that a loaded machine does not trip
them: a test that needs a lease to run out sets a short one itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from common.db.models import Job, JobState, WorkerHeartbeat
from common.db.session import upgrade

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

    def wait_for_workers(self, count: int, timeout: float = 180) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                ids = conn.execute(sa.select(WorkerHeartbeat.worker_id)).scalars().all()
            if len(ids) >= count:
                return list(ids)
            time.sleep(0.5)
        raise AssertionError(f"{count} worker(s) did not report within {timeout} s:\n{self.log_tail()}")

    def worker_ids(self, name: str) -> set[str]:
        """The ``host:pid`` of every process of the worker started as ``name`` that has reported."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(WorkerHeartbeat.worker_id, WorkerHeartbeat.node)).all()
        return {worker_id for worker_id, node in rows if node and node.startswith(f"{name}@")}

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

    def wait_for(self, batch_id: str, predicate, what: str, timeout: float = 180) -> list[Job]:
        """Poll the batch's jobs until ``predicate(jobs)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(batch_id)
            if jobs and predicate(jobs):
                return jobs
            time.sleep(0.2)
        states = sorted((job.state, job.attempts) for job in self.jobs(batch_id))
        raise AssertionError(f"batch {batch_id}: {what} not seen in {timeout} s: {states}\n{self.log_tail()}")

    def wait_done(self, batch_id: str, timeout: float = 300) -> list[Job]:
        return self.wait_for(
            batch_id,
            lambda jobs: all(job.state in (JobState.SUCCEEDED, JobState.FAILED) for job in jobs),
            "every job finished",
            timeout,
        )

    def wait_for_log(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logs.glob("*.log")))

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
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def cluster(postgres_url, broker_url, s3_bucket, s3_env, tmp_path) -> Iterator[Cluster]:
    upgrade(postgres_url)
    env = {
        **os.environ,
        "VITSCOPE_BROKER_URL": broker_url,
        "VITSCOPE_DATABASE_URL": postgres_url,
        "VITSCOPE_STORAGE_URL": f"s3://{s3_bucket}/artifacts",
        "VITSCOPE_CHUNK_SIZE": "4",
        "VITSCOPE_BATCH_SIZE": "4",
        # Far above what a chunk of four tiny images needs even on a loaded machine: only a test that
        # wants a lease to run out (and says so) shortens it.
        "VITSCOPE_LEASE_SECONDS": "60",
        "VITSCOPE_HEARTBEAT_SECONDS": "1",
        "VITSCOPE_REAPER_INTERVAL_SECONDS": "2",
        "VITSCOPE_VISIBILITY_TIMEOUT_SECONDS": "300",
        "VITSCOPE_TASK_TIME_LIMIT_SECONDS": "240",
        # The test's image server is on 127.0.0.1.
        "VITSCOPE_ALLOW_PRIVATE_NETWORKS": "true",
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
