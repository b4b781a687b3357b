"""Infrastructure faults in distributed mode, each caused for real on a private instance: Redis and
PostgreSQL restarted mid-batch, the S3 endpoint cut off for 20 s, a worker sent SIGTERM, an image
that kills its worker every time, and queue messages lost.

The storage faults (S3 outage, PostgreSQL restart) run on both artifact layouts: one object per
artifact, and shards (one tar per few jobs, written whole before any row points into it).

Every test runs real ``worker start`` processes against its own ``redis-server`` (append-only file,
as ``scripts/services`` and compose run it) and waits for states it can observe — a job running, a
worker exited — never for a fixed time. Leases, heartbeats and the reaper are scaled to seconds.
Each test prints its measured recovery time (``pytest -s`` shows them; docs/architecture.md quotes them).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from PIL import Image, PngImagePlugin

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.db.models import Job, JobState, utcnow
from tests.worker.conftest import DONE, QUEUE, Cluster, bucket_key, wait_until

ARTIFACTS_PER_JOB = len(ARRAY_ARTIFACTS) - 1 + len(IMAGE_ARTIFACTS)  # attention.npy is opt-in


@pytest.fixture
def cluster_factory(tmp_path: Path, s3_bucket: str) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(
        *, broker: str, database: str, extra: dict[str, str] | None = None, layout: str = "auto"
    ) -> Cluster:
        cluster = Cluster.create(
            tmp_path,
            broker=broker,
            database=database,
            bucket=s3_bucket,
            settings={
                "VITSCOPE_BATCH_SIZE": "1",  # one image per pass: chunks last long enough to be hit mid-way
                "VITSCOPE_LEASE_SECONDS": "10",
                "VITSCOPE_VISIBILITY_TIMEOUT_SECONDS": "120",
                "VITSCOPE_TASK_TIME_LIMIT_SECONDS": "90",
                "VITSCOPE_ARTIFACT_LAYOUT": layout,
                **(extra or {}),
            },
            pre_ping=True,  # a test restarts PostgreSQL under the engine
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        cluster.engine.dispose()


def _dataset(tmp_path: Path, bucket: str, write_image, count: int, *, poison: int | None = None) -> Path:
    """``count`` distinct images in the bucket; row ``poison`` (if any) carries the marker that the
    test's ``sitecustomize`` turns into a SIGKILL of the process decoding it."""
    s3 = boto3.client("s3")
    lines = ["id,image_uri"]
    for i in range(count):
        path = write_image(tmp_path / "img" / f"{i}.png", seed=i, size=(64 + i, 64))
        if i == poison:
            marked = PngImagePlugin.PngInfo()
            marked.add_text("vitscope-test", "poison")
            buffer = io.BytesIO()
            Image.open(path).save(buffer, format="PNG", pnginfo=marked)
            path.write_bytes(buffer.getvalue())
        s3.upload_file(str(path), bucket, f"images/{i}.png")
        lines.append(f"img{i},s3://{bucket}/images/{i}.png")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _assert_each_job_computed_once(cluster: Cluster, jobs: list[Job]) -> None:
    """One attempt per job, a full set of artifact rows each, every one of them stored and read back,
    nothing written twice (and, in the shards layout, no orphan shard)."""
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * len(jobs), [j.error_message for j in jobs]
    assert [job.attempts for job in jobs] == [1] * len(jobs), "a job was claimed twice"
    cluster.check_stored(jobs, ARTIFACTS_PER_JOB)


def test_the_broker_is_run_with_an_append_only_file() -> None:
    """What the Redis restart test relies on, in the set-ups users run: scripts/services and compose."""
    root = Path(__file__).resolve().parents[2]
    assert "--appendonly yes" in (root / "scripts" / "services").read_text()
    compose = (root / "docker" / "compose.yaml").read_text()
    assert '"--appendonly", "yes"' in compose


# --- 1. Redis restarted mid-batch ------------------------------------------------------------------


def test_redis_restarted_mid_batch_loses_and_repeats_nothing(
    cluster_factory, private_redis, postgres_url, tmp_path, write_image
) -> None:
    cluster = cluster_factory(broker=private_redis.url, database=postgres_url)
    csv = _dataset(tmp_path, cluster.bucket, write_image, 16)
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    submit = cluster.start_producer(
        "submit", str(csv), "--models", "deit_tiny_patch16_224", "--weights", "random", "--wait"
    )
    cluster.wait_for(None, lambda jobs: any(j.state == JobState.RUNNING for j in jobs), "a job running")
    queued_messages = private_redis.client().llen(QUEUE)
    assert queued_messages > 0, "the batch should still have messages waiting in Redis"
    restarted, restarted_utc = time.monotonic(), utcnow()
    private_redis.restart()  # SIGTERM (clean shutdown, append-only file flushed), then start again
    assert private_redis.client().llen(QUEUE) >= queued_messages - 1  # what waited is still there
    cluster.wait_for(  # a chunk claimed after the restart: the worker consumes again
        None,
        lambda jobs: any(j.started_at is not None and j.started_at > restarted_utc for j in jobs),
        "a job started after the restart",
    )
    resumed = time.monotonic() - restarted
    out, err = submit.communicate(timeout=300)
    finished = time.monotonic() - restarted
    assert submit.returncode == 0, f"{err}\n{cluster.log_tail()}"
    _assert_each_job_computed_once(cluster, cluster.jobs(out.strip().splitlines()[-1]))
    print(
        f"\nRedis restart: next chunk claimed {resumed:.1f} s after it, batch finished after {finished:.1f} s"
    )


# --- 1b. Redis restarted without persistence: every message lost ------------------------------------

LOSS_DEADLINE_SECONDS = 60.0  # the bound: every job succeeded this long after the restart


def test_redis_restarted_without_persistence_is_healed_with_no_user_action(
    cluster_factory, private_redis, postgres_url, tmp_path, write_image
) -> None:
    """After 8 of 48 jobs, Redis comes back empty (as without persistence, after a failover or a
    FLUSHALL): the workers notice the broker's marker is gone within a reaper round and publish the
    queued jobs again; nobody runs ``producer resume``."""
    cluster = cluster_factory(
        broker=private_redis.url,
        database=postgres_url,
        extra={"VITSCOPE_BATCH_SIZE": "4"},  # 48 jobs: whole chunks per pass keep the CPU cost down
    )
    csv = _dataset(tmp_path, cluster.bucket, write_image, 48)
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    batch_id = cluster.submit(csv)
    cluster.wait_for(
        batch_id, lambda jobs: sum(j.state == JobState.SUCCEEDED for j in jobs) >= 8, "8 jobs succeeded"
    )
    redis = private_redis.client()
    assert redis.llen(QUEUE) > 0, "the batch should still have messages waiting in Redis"
    private_redis.stop()
    for path in private_redis.dir.iterdir():  # its append-only file and snapshot: restarted empty
        if path.name != "redis.log":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    restarted, restarted_utc = time.monotonic(), utcnow()
    private_redis.start()
    assert redis.llen(QUEUE) == 0  # every waiting message is gone
    jobs = cluster.wait_done(batch_id, timeout=LOSS_DEADLINE_SECONDS + 120)
    healed = time.monotonic() - restarted
    _assert_each_job_computed_once(cluster, jobs)
    assert "the broker lost its data" in cluster.log_text()
    after = [j for j in jobs if j.started_at is not None and j.started_at > restarted_utc]
    assert after, "no job was claimed after the restart: the test proved nothing"
    assert healed < LOSS_DEADLINE_SECONDS, f"took {healed:.1f} s"
    print(
        f"\nRedis restarted empty: {len(after)} job(s) claimed after it; every job succeeded "
        f"{healed:.1f} s after the restart"
    )


# --- 2. PostgreSQL restarted mid-batch -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["objects", "shards"])
def test_postgres_restarted_mid_batch_every_job_ends_succeeded(
    cluster_factory, private_redis, private_postgres, tmp_path, write_image, layout: str
) -> None:
    cluster = cluster_factory(broker=private_redis.url, database=private_postgres.url, layout=layout)
    csv = _dataset(tmp_path, cluster.bucket, write_image, 12)
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    submit = cluster.start_producer(
        "submit", str(csv), "--models", "deit_tiny_patch16_224", "--weights", "random", "--wait"
    )
    cluster.wait_for(None, lambda jobs: any(j.state == JobState.RUNNING for j in jobs), "a job running")
    private_postgres.stop()  # pg_ctl -m fast: every open session is cut
    log = cluster.logs / "w.log"
    # Down until the chunk in flight has failed on it as a whole (not only a heartbeat): that is the
    # path to prove — the chunk retried, taking its own half-done jobs back.
    wait_until(
        lambda: "hit a transient error, retrying" in log.read_text(), 180, "the chunk to fail on the database"
    )
    restarted, restarted_utc = time.monotonic(), utcnow()
    private_postgres.start()
    cluster.wait_for(
        None,
        lambda jobs: any(j.finished_at is not None and j.finished_at > restarted_utc for j in jobs),
        "a job finished after the restart",
    )
    resumed = time.monotonic() - restarted
    out, err = submit.communicate(timeout=300)
    finished = time.monotonic() - restarted
    assert submit.returncode == 0, f"{err}\n{cluster.log_tail()}"
    jobs = cluster.jobs(out.strip().splitlines()[-1])
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * len(jobs), cluster.log_tail()
    # A shard written before the restart whose commit failed stays behind, unreferenced.
    cluster.check_stored(jobs, ARTIFACTS_PER_JOB, orphans_allowed=True)
    assert not [j for j in jobs if j.state == JobState.RUNNING]
    assert "hit a transient error, retrying" in log.read_text()
    print(
        f"\nPostgreSQL restart: a job finished {resumed:.1f} s after it, batch finished after {finished:.1f} s"
    )


# --- 3. The S3 endpoint unreachable for 20 s -------------------------------------------------------


class CuttableProxy:
    """A TCP relay in front of the S3 endpoint that can be cut — listener and live connections.

    Stopping moto's threaded server is not an outage: it leaves its listening socket open (new
    connections hang until the read timeout) and keeps serving the keep-alive connections botocore
    already holds. Cutting a relay is what a dead endpoint looks like to the client: connections
    refused, open ones reset. Restoring it listens on the same port again.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with self._lock:
                    self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.close()


OUTAGE_SECONDS = 20.0  # the outage, under the default VITSCOPE_STORAGE_RETRY_SECONDS (60 s)


@pytest.mark.parametrize("layout", ["objects", "shards"])
def test_s3_unreachable_for_20_seconds_uploads_wait_and_the_batch_completes(
    cluster_factory, private_redis, postgres_url, s3_endpoint, tmp_path, write_image, layout: str
) -> None:
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = CuttableProxy((host, int(port)))
    proxy.start()
    cluster = cluster_factory(
        broker=private_redis.url,
        database=postgres_url,
        extra={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"},  # workers reach S3 only through it
        layout=layout,
    )
    csv = _dataset(tmp_path, cluster.bucket, write_image, 12)
    cluster.start_worker("w")
    cluster.wait_for_workers(1)
    cluster.start_producer("submit", str(csv), "--models", "deit_tiny_patch16_224", "--weights", "random")
    cluster.wait_for(
        None,
        lambda jobs: (
            any(j.state == JobState.SUCCEEDED for j in jobs) and any(j.state not in DONE for j in jobs)
        ),
        "a job succeeded and others not done",
    )
    proxy.cut()
    cut_at = time.monotonic()
    # While storage is down, a job may only be recorded succeeded with every object stored (the
    # test reads the bucket directly, not through the cut relay).
    succeeded_during: set[str] = set()
    try:
        while time.monotonic() - cut_at < OUTAGE_SECONDS:
            jobs = cluster.jobs()  # first: whatever succeeded here has its rows and objects by now
            artifacts = cluster.artifacts()
            stored = set(cluster.objects("artifacts/"))
            for job in jobs:
                if job.state == JobState.SUCCEEDED:
                    rows = artifacts.get(job.id, [])
                    assert len(rows) == ARTIFACTS_PER_JOB
                    keys = {bucket_key(a.uri) for a in rows}
                    assert keys <= stored, f"job {job.id} recorded succeeded before its objects existed"
                    succeeded_during.add(job.id)
            time.sleep(0.5)
        unfinished_at_restore = [j.id for j in cluster.jobs() if j.state not in DONE]
    finally:
        proxy.start()
    restored_at, restored_utc = time.monotonic(), utcnow()
    assert unfinished_at_restore, "every job finished during the outage: it proved nothing"
    cluster.wait_for(
        None,
        lambda jobs: any(j.finished_at is not None and j.finished_at > restored_utc for j in jobs),
        "a job finished after storage returned",
    )
    resumed = time.monotonic() - restored_at
    jobs = cluster.wait_done()
    finished = time.monotonic() - restored_at
    _assert_each_job_computed_once(cluster, jobs)  # no attempt was spent on the outage
    assert "retrying for up to" in cluster.log_tail()
    print(
        f"\nS3 outage {OUTAGE_SECONDS:.0f} s: a job finished {resumed:.1f} s after storage returned, "
        f"batch finished after {finished:.1f} s"
    )


# --- 4. Worker SIGTERM -----------------------------------------------------------------------------


def test_sigterm_finishes_the_chunk_in_hand_and_leaves_the_rest_queued(
    cluster_factory, private_redis, postgres_url, tmp_path, write_image
) -> None:
    cluster = cluster_factory(broker=private_redis.url, database=postgres_url)
    limit = int(cluster.env["VITSCOPE_TASK_TIME_LIMIT_SECONDS"])
    csv = _dataset(tmp_path, cluster.bucket, write_image, 12)
    worker = cluster.start_worker("leaving")
    cluster.wait_for_workers(1)
    cluster.submit(csv)
    cluster.wait_for(None, lambda jobs: any(j.state == JobState.RUNNING for j in jobs), "a job running")
    worker.send_signal(signal.SIGTERM)  # to the Celery parent only, as `docker stop` does
    sent = time.monotonic()
    worker.wait(timeout=limit + 30)
    shutdown = time.monotonic() - sent
    assert shutdown < limit, f"warm shutdown took {shutdown:.0f} s, over the {limit} s task time limit"
    assert worker.returncode == 0, cluster.log_tail()
    after = cluster.jobs()
    assert not [j for j in after if j.state == JobState.RUNNING], "a job was left running"
    assert any(j.state == JobState.QUEUED for j in after), "the worker should have left work for others"
    cluster.start_worker("next")
    _assert_each_job_computed_once(cluster, cluster.wait_done())
    print(f"\nSIGTERM: worker exited {shutdown:.1f} s after the signal")


# --- 5. A poison image that kills the worker process -----------------------------------------------

POISON_HOOK = '''
"""Test hook (never in product code): SIGKILL the process that opens an image marked as poison."""
import os
import signal

from PIL import Image

_open = Image.open


def _open_or_die(*args, **kwargs):
    image = _open(*args, **kwargs)
    if image.info.get("vitscope-test") == "poison":
        os.kill(os.getpid(), signal.SIGKILL)
    return image


Image.open = _open_or_die
'''


def test_an_image_that_kills_its_worker_fails_alone_with_the_reason(
    cluster_factory, private_redis, postgres_url, tmp_path, write_image
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(POISON_HOOK)
    cluster = cluster_factory(broker=private_redis.url, database=postgres_url)
    csv = _dataset(tmp_path, cluster.bucket, write_image, 8, poison=2)  # chunks [0 1 P 3] [4 5 6 7]
    # Before, not instead of, an inherited PYTHONPATH (a checkout that is not the installed one).
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    cluster.start_worker("w", env={"PYTHONPATH": os.pathsep.join([str(hooks), *inherited])})
    cluster.wait_for_workers(1)
    cluster.submit(csv)
    jobs = cluster.wait_done()
    poison, neighbours = jobs[2], jobs[:2] + jobs[3:]
    assert [j.state for j in neighbours] == [JobState.SUCCEEDED] * 7, cluster.log_tail()
    assert all(j.attempts <= 2 for j in neighbours)  # charged at most for the one crash they shared
    max_attempts = 3  # the default VITSCOPE_MAX_ATTEMPTS
    assert poison.state == JobState.FAILED
    assert poison.attempts == max_attempts
    assert poison.error_class == "WorkerLostError"
    assert f"worker died while processing this job {max_attempts} time(s)" in poison.error_message
    assert "WorkerLostError" in cluster.producer("status", poison.batch_id).stdout
    failed = cluster.producer("results", poison.batch_id, "--status", "failed", "--format", "jsonl").stdout
    assert "worker died while processing this job" in failed


# --- 7. Lost messages: the reaper publishes them again ---------------------------------------------


def test_purged_queue_is_healed_by_the_reaper(
    cluster_factory, private_redis, postgres_url, tmp_path, write_image
) -> None:
    republish_after = 3
    cluster = cluster_factory(
        broker=private_redis.url,
        database=postgres_url,
        extra={
            "VITSCOPE_REPUBLISH_AFTER_SECONDS": str(republish_after),
            "VITSCOPE_REAPER_INTERVAL_SECONDS": "1",
        },
    )
    csv = _dataset(tmp_path, cluster.bucket, write_image, 6)
    batch_id = cluster.submit(csv)  # no worker yet: the messages wait in Redis …
    redis = private_redis.client()
    assert redis.llen(QUEUE) == 2
    redis.delete(QUEUE)  # … and are lost

    def reported_stale() -> str | None:
        status = cluster.producer("status", batch_id).stdout
        return status if "6 queued job(s) with no recent publication" in status else None

    wait_until(reported_stale, 60, "status to report the unpublished jobs", every=1)
    cluster.start_worker("healer")
    cluster.wait_for_workers(1)
    started = time.monotonic()
    jobs = cluster.wait_done()
    healed = time.monotonic() - started
    _assert_each_job_computed_once(cluster, jobs)
    assert "publishing again 6 queued job(s)" in cluster.log_tail()
    print(
        f"\nlost messages: batch finished {healed:.1f} s after a worker came up (threshold {republish_after} s)"
    )
