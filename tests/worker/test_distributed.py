"""Distributed mode against real components: Redis, PostgreSQL, an S3 HTTP endpoint, and Celery
worker processes started with ``worker start`` — no eager mode, nothing mocked (see ``conftest.py``).

Crash tests stop a chunk mid-flight at a point they can observe — a held image request on the
test's image server, with the chunk's jobs claimed — rather than guessing with ``sleep``.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import redis
import sqlalchemy as sa

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.db.models import Artifact, Batch, Job, JobState
from common.storage import read_uri
from tests.conftest import ImageServer
from tests.worker.conftest import Cluster, http_dataset

ARTIFACTS_PER_JOB = len(ARRAY_ARTIFACTS) - 1 + len(IMAGE_ARTIFACTS)  # attention.npy is opt-in
QUEUE = "vitscope.deit_tiny"


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
    # Either layout (the cluster's S3 storage means shards by default): every row reads back, and
    # nothing is stored twice however often a chunk was retried.
    cluster.check_stored(jobs, ARTIFACTS_PER_JOB)


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


def _hold_first_chunk(cluster: Cluster, image_server: ImageServer, batch_id: str) -> list[Job]:
    """Wait until the first chunk (jobs 0-3) is claimed and fetching its held image 0; return its jobs."""
    image_server.wait_for_request("/0.png")
    jobs = cluster.wait_for(
        batch_id, lambda jobs: jobs[0].state == JobState.RUNNING, "the first chunk claimed"
    )
    return [job for job in jobs if job.worker_id == jobs[0].worker_id and job.state == JobState.RUNNING]


@pytest.mark.parametrize("layout", ["objects", "shards"])
def test_killed_worker_child_is_redelivered_and_nothing_is_lost_or_doubled(
    cluster, tmp_path, write_image, image_server, layout: str
) -> None:
    cluster.env["VITSCOPE_ARTIFACT_LAYOUT"] = layout
    csv = http_dataset(tmp_path, image_server, write_image, 16)
    held = image_server.hold("/0.png")  # the first chunk stops mid-flight until the child is killed
    cluster.start_worker("victim")
    cluster.wait_for_workers(1)
    batch_id = cluster.submit(csv)
    running = _hold_first_chunk(cluster, image_server, batch_id)
    assert len(running) == 4
    child_pid = int(running[0].worker_id.rsplit(":", 1)[1])
    os.kill(child_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    held.set()
    jobs = cluster.wait_done(batch_id)
    recovery = time.monotonic() - killed_at
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 16, [job.error_message for job in jobs]
    by_id = {job.id: job for job in jobs}
    # The killed chunk ran twice — by the new child, not the dead one; every other job ran once.
    assert {by_id[job.id].attempts for job in running} == {2}
    assert all(by_id[job.id].worker_id != running[0].worker_id for job in running)
    assert {job.attempts for job in jobs if job.id not in {r.id for r in running}} == {1}
    _check_artifacts(cluster, jobs)
    print(f"\nprefork child SIGKILL: batch finished {recovery:.1f} s after the kill")


def test_whole_worker_killed_its_jobs_come_back_to_another_worker(
    cluster, tmp_path, write_image, image_server
) -> None:
    csv = http_dataset(tmp_path, image_server, write_image, 12)
    held = image_server.hold("/0.png")
    first = cluster.start_worker("doomed")
    cluster.wait_for_workers(1)
    batch_id = cluster.submit(csv)
    running = _hold_first_chunk(cluster, image_server, batch_id)
    os.killpg(first.pid, signal.SIGKILL)  # parent and child: no one is left to hand the message back
    first.wait()
    held.set()
    doomed = cluster.worker_ids("doomed")
    assert {job.worker_id for job in running} <= doomed
    cluster.start_worker("rescuer")
    jobs = cluster.wait_done(batch_id, timeout=300)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 12, cluster.log_tail()
    rescuer = cluster.worker_ids("rescuer")
    assert rescuer, cluster.log_tail()
    by_id = {job.id: job for job in jobs}
    for job in running:  # the dead worker's jobs: taken over by the rescuer, on a second attempt
        assert by_id[job.id].worker_id in rescuer
        assert by_id[job.id].attempts == 2
    assert not any(job.worker_id in doomed for job in jobs)  # the dead worker finished nothing
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

    # Fix the image, resume: only the failed job runs again, through the queue.
    boto3.client("s3").upload_file(str(tmp_path / "img" / "0.png"), cluster.bucket, "images/broken0.png")
    assert "1 failed job(s)" in cluster.producer("resume", batch_id).stderr
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


def test_a_transformers_model_is_routed_to_its_queue_and_explained_there(
    cluster, tmp_path, write_image
) -> None:
    """``hf:<folder>`` jobs go to ``vitscope.transformers``; a real worker on that queue loads the
    saved model and stores its maps (the folder is on this machine, shared with the worker)."""
    import transformers

    folder = tmp_path / "tiny-vit"
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    csv = _dataset(tmp_path, cluster.bucket, write_image, 2)
    cluster.start_worker("hf", queues="transformers")
    cluster.wait_for_workers(1)
    batch_id = (
        cluster.producer("submit", str(csv), "--models", f"hf:{folder}").stdout.strip().splitlines()[-1]
    )
    jobs = cluster.wait_done(batch_id)
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * 2, cluster.log_tail()
    assert all(job.queue == "vitscope.transformers" for job in jobs)
    assert all(f"ViTForImageClassification: {folder}" in (job.weights_source or "") for job in jobs)
