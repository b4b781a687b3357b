"""Throwaway real services for the benchmarks: a fresh PostgreSQL database, a Redis database, an S3
endpoint (moto's server), test images in a bucket, and worker processes.

The same components the tests use; run `bash scripts/services` first on a machine without them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import numpy as np
import redis
import sqlalchemy as sa
from PIL import Image

from common.db.models import Job, JobState, WorkerHeartbeat
from common.db.scratch import scratch_database
from common.db.session import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "VITSCOPE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("VITSCOPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/14"
BIN = Path(sys.executable).parent


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database at the newest migration, dropped afterwards."""
    with scratch_database(POSTGRES_ADMIN_URL, prefix="vitscope_bench") as url:
        upgrade(url)
        yield url


@contextmanager
def redis_broker() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@contextmanager
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in its own process (so it does not share the GIL with what is measured).

    Sets the standard AWS variables for this process and its children; yields the bucket name.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        for _ in range(100):
            try:
                boto3.client("s3").create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        yield "bench"
    finally:
        server.terminate()
        server.wait()


def upload_images(
    bucket: str,
    count: int,
    workdir: Path,
    *,
    prefix: str = "images",
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
) -> Path:
    """``count`` distinct photo-sized images under ``prefix/`` in the bucket, and a CSV naming them."""
    s3 = boto3.client("s3")
    rng = np.random.default_rng(seed)
    lines = ["id,image_uri"]
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = workdir / f"{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        s3.upload_file(str(path), bucket, f"{prefix}/{i}.jpg")
        lines.append(f"img{i},s3://{bucket}/{prefix}/{i}.jpg")
    csv = workdir / "dataset.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def start_worker(
    env: dict[str, str], log: Path, *, pool: str = "prefork", name: str = "bench"
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "worker"),
            "start",
            "--gpus",
            "none",
            "--pool",
            pool,
            "--queues",
            "deit_tiny",
            "--loglevel",
            "warning",
            "--hostname",
            f"{name}@%h",
        ],
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_worker(engine: sa.Engine, count: int = 1, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(WorkerHeartbeat)).scalar() >= count:
                return
        time.sleep(0.2)
    raise RuntimeError("worker did not start")


def wait_done(engine: sa.Engine, batch_id: str, timeout: float = 1800) -> float:
    """Seconds until every job of the batch is succeeded or failed."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with engine.connect() as conn:
            open_jobs = conn.execute(
                sa.select(sa.func.count()).where(
                    Job.batch_id == batch_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING])
                )
            ).scalar()
        if open_jobs == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"batch {batch_id} did not finish in {timeout} s")


def submit(env: dict[str, str], csv: Path, *args: str, model: str = "deit_tiny_patch16_224") -> str:
    """``producer submit`` as a user runs it (random weights: nothing to download); the batch id."""
    result = subprocess.run(
        [str(BIN / "producer"), "submit", str(csv), "--models", model, "--weights", "random", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1]
