"""A distributed cluster for tests: Redis, PostgreSQL, an S3 HTTP endpoint, and Celery worker processes
started with ``worker start`` — no eager mode, nothing mocked.

Leases, heartbeats, the reaper and Redis's visibility timeout are seconds instead of minutes so that
recovery can be watched inside a test, yet with margin enough that a loaded machine does not trip
them: a test that needs a lease to run out sets a short one itself.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import boto3
import pytest
import sqlalchemy as sa

from common.db.models import Artifact, Job, JobState, WorkerHeartbeat
from common.db.session import upgrade
from common.settings import Settings
from common.storage import read_uri
from common.storage.shards import parse_member_uri
from tests.conftest import ImageServer

T = TypeVar("T")

BIN = Path(sys.executable).parent
QUEUE = "vitscope.deit_tiny"
DONE = (JobState.SUCCEEDED, JobState.FAILED)


def embedded_settings(tmp_path: Path, name: str = "run", **overrides: object) -> Settings:
    """A local run on the CPU in ``tmp_path``: SQLite file ``{name}.db`` and results folder
    ``{name}-out`` (so that several runs of one test keep their results apart); ``overrides`` win."""
    fields: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path / f'{name}.db'}",
        "storage_url": (tmp_path / f"{name}-out").as_uri(),
        "device": "cpu",
    }
    return Settings(**(fields | overrides))


def wait_until(check: Callable[[], T | None], timeout: float, what: str, *, every: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_dataset(tmp_path: Path, image_server: ImageServer, write_image, count: int) -> Path:
    """``count`` images served by the test's image server, so a test can hold any one of them."""
    lines = ["id,image_uri"]
    for i in range(count):
        path = write_image(tmp_path / "img" / f"{i}.png", seed=i, size=(64 + i, 64))
        image_server.images[f"/{i}.png"] = path.read_bytes()
        lines.append(f"img{i},{image_server.url(f'/{i}.png')}")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def bucket_key(uri: str) -> str:
    """The key in the bucket that an artifact row's URI reads from: its own object's, or its shard's."""
    member = parse_member_uri(uri)
    return (member.shard_uri if member is not None else uri).split("/", 3)[3]


@dataclass
class Cluster:
    """A broker, a database, a bucket, and the worker processes a test starts."""

    env: dict[str, str]
    engine: sa.Engine
    bucket: str
    logs: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        tmp_path: Path,
        *,
        broker: str,
        database: str,
        bucket: str,
        settings: dict[str, str],
        pre_ping: bool = False,
    ) -> Cluster:
        """A migrated database and the environment every process of the test gets: the services,
        chunks of four, heartbeats and the reaper in seconds, one torch thread, and ``settings``
        (the batch size, lease and time limits each kind of test needs). ``pre_ping`` for a test
        that restarts the database under the engine."""
        upgrade(database)
        env = {
            **os.environ,
            "VITSCOPE_BROKER_URL": broker,
            "VITSCOPE_DATABASE_URL": database,
            "VITSCOPE_STORAGE_URL": f"s3://{bucket}/artifacts",
            "VITSCOPE_CHUNK_SIZE": "4",
            "VITSCOPE_HEARTBEAT_SECONDS": "1",
            "VITSCOPE_REAPER_INTERVAL_SECONDS": "2",
            "OMP_NUM_THREADS": "1",
            **settings,
        }
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        engine = sa.create_engine(database, pool_pre_ping=pre_ping)
        return cls(env=env, engine=engine, bucket=bucket, logs=logs)

    def start_worker(
        self,
        name: str,
        *,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        queues: str = "deit_tiny",
    ) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            [
                str(BIN / "worker"),
                "start",
                "--gpus",
                "none",
                "--queues",
                queues,
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
        def reported() -> list[str] | None:
            with self.engine.connect() as conn:
                ids = conn.execute(sa.select(WorkerHeartbeat.worker_id)).scalars().all()
            return list(ids) if len(ids) >= count else None

        try:
            return wait_until(reported, timeout, f"{count} worker heartbeat(s)", every=0.3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def worker_ids(self, name: str) -> set[str]:
        """The ``host:pid`` of every process of the worker started as ``name`` that has reported."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(WorkerHeartbeat.worker_id, WorkerHeartbeat.node)).all()
        return {worker_id for worker_id, node in rows if node and node.startswith(f"{name}@")}

    def start_producer(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``producer ARGS`` running in the background (``communicate()`` to collect it)."""
        return subprocess.Popen(
            [str(BIN / "producer"), *args],
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def producer(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "producer"), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
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

    def jobs(self, batch_id: str | None = None) -> list[Job]:
        """The jobs of ``batch_id``, or of every batch, in row order."""
        query = sa.select(Job).order_by(Job.row_number)
        if batch_id is not None:
            query = query.where(Job.batch_id == batch_id)
        with sa.orm.Session(self.engine) as session:
            return list(session.scalars(query))

    def wait_for(
        self, batch_id: str | None, predicate: Callable[[list[Job]], bool], what: str, timeout: float = 180
    ) -> list[Job]:
        """Poll the jobs of ``batch_id`` (of every batch when None) until ``predicate(jobs)`` holds;
        often, so a state that lasts only a moment (a job running) is still seen."""

        def check() -> list[Job] | None:
            jobs = self.jobs(batch_id)
            return jobs if jobs and predicate(jobs) else None

        try:
            return wait_until(check, timeout, what, every=0.05)
        except AssertionError as exc:
            states = sorted((str(job.state), job.attempts) for job in self.jobs(batch_id))
            raise AssertionError(f"batch {batch_id}: {exc}: {states}\n{self.log_tail()}") from None

    def wait_done(self, batch_id: str | None = None, timeout: float = 300) -> list[Job]:
        return self.wait_for(
            batch_id, lambda jobs: all(job.state in DONE for job in jobs), "every job finished", timeout
        )

    def wait_for_log(self, text: str, timeout: float = 180) -> None:
        try:
            wait_until(lambda: text in self.log_text(), timeout, f"{text!r} in the logs", every=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log_tail()}") from None

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logs.glob("*.log")))

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-4000:] for p in sorted(self.logs.glob("*.log")))

    def objects(self, prefix: str = "") -> list[str]:
        s3 = boto3.client("s3")
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    @property
    def layout(self) -> str:
        """``objects`` or ``shards``: how the workers store artifacts (``VITSCOPE_ARTIFACT_LAYOUT``)."""
        settings = Settings(artifact_layout=self.env.get("VITSCOPE_ARTIFACT_LAYOUT", "auto"))
        return settings.resolved_artifact_layout(self.env["VITSCOPE_STORAGE_URL"])

    def check_stored(self, jobs: list[Job], per_job: int, *, orphans_allowed: bool = False) -> None:
        """Each job has ``per_job`` artifact rows, each reads back the bytes its checksum names, and
        the bucket holds what the layout says: one object per artifact of each distinct image
        (deterministic keys: nothing written twice, however often retried), or shards only, every
        row's among them, and no other (orphan) shard unless an attempt failed after writing one."""
        artifacts = self.artifacts()
        assert {job.id: len(artifacts.get(job.id, [])) for job in jobs} == {job.id: per_job for job in jobs}
        rows = [a for job in jobs for a in artifacts[job.id]]
        for artifact in rows:
            assert hashlib.sha256(read_uri(artifact.uri)).hexdigest() == artifact.checksum, artifact.uri
        stored = set(self.objects("artifacts/"))
        if self.layout == "objects":
            assert len(stored) == per_job * len({job.image_sha256 for job in jobs})
            return
        assert all(key.startswith("artifacts/shards/") for key in stored), "an artifact outside a shard"
        referenced = {bucket_key(a.uri) for a in rows}
        assert referenced <= stored
        if not orphans_allowed:
            assert stored == referenced

    def artifacts(self) -> dict[str, list[Artifact]]:
        """Every artifact row, by job id."""
        with sa.orm.Session(self.engine) as session:
            found: dict[str, list[Artifact]] = {}
            for artifact in session.scalars(sa.select(Artifact)):
                found.setdefault(artifact.job_id, []).append(artifact)
            return found

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


def closed_port_url() -> str:
    """An address nothing listens on: a connection to it is refused at once, as offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The hub at a closed local port and an empty hub cache: offline, even on a machine that is not."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_port_url())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def cluster(postgres_url, broker_url, s3_bucket, s3_env, tmp_path) -> Iterator[Cluster]:
    result = Cluster.create(
        tmp_path,
        broker=broker_url,
        database=postgres_url,
        bucket=s3_bucket,
        settings={
            "VITSCOPE_BATCH_SIZE": "4",
            # Far above what a chunk of four tiny images needs even on a loaded machine: only a test
            # that wants a lease to run out (and says so) shortens it.
            "VITSCOPE_LEASE_SECONDS": "60",
            "VITSCOPE_VISIBILITY_TIMEOUT_SECONDS": "300",
            "VITSCOPE_TASK_TIME_LIMIT_SECONDS": "240",
            # The test's image server is on 127.0.0.1.
            "VITSCOPE_ALLOW_PRIVATE_NETWORKS": "true",
        },
    )
    try:
        yield result
    finally:
        result.stop()
        result.engine.dispose()
