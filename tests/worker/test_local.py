"""The local runner and a worker facing a hostile CSV: what is read, what fails, what is computed.

Real batches through ``run_batch`` (the local runner) and ``process_jobs`` (what a Celery worker
calls) with a random-weight ``deit_tiny_patch16_224`` on the CPU, SQLite and a local results folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.db import open_database
from common.db.models import Artifact, Job, JobState
from common.settings import Settings
from producer.submit import SubmitOptions, commit_plan, plan_submission
from worker.local import run_batch
from worker.pipeline import Runtime, process_jobs

MODEL = "deit_tiny_patch16_224"
PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def _settings(tmp_path: Path, **overrides) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'vitscope.db'}",
        storage_url=(tmp_path / "results").as_uri(),
        batch_size=1,
        fetch_threads=2,
        upload_threads=2,
        device="cpu",
        **overrides,
    )


def _submit(settings: Settings, csv: Path) -> tuple[Runtime, str]:
    options = SubmitOptions(models=[MODEL], weights="random")
    db = open_database(settings, migrate=True)
    runtime = Runtime.from_settings(settings, db=db)
    return runtime, commit_plan(db, plan_submission(csv, options), options, mode="local").batch_id


def _jobs(runtime: Runtime, batch_id: str) -> dict[str, Job]:
    with runtime.db.session() as session:
        return {job.row_id: job for job in session.scalars(sa.select(Job).where(Job.batch_id == batch_id))}


def _stored_images(tmp_path: Path) -> set[str]:
    """The image digests that have artifacts in the results folder (keys are <sha[:2]>/<sha>/…)."""
    return {path.relative_to(tmp_path / "results").parts[1] for path in (tmp_path / "results").rglob("*.npy")}


@pytest.fixture
def hostile(tmp_path: Path, write_image) -> Path:
    """A dataset folder whose CSV mixes good rows with every way out of the folder."""
    data, other = tmp_path / "data", tmp_path / "other"
    write_image(data / "images" / "cat.png", seed=1)
    write_image(data / "images" / "sub" / "dog.png", seed=2)
    write_image(other / "secret.png", seed=3)  # a valid picture outside: must never be rendered
    (data / "images" / "passwd.png").symlink_to("/etc/passwd")
    (data / "images" / "secret.png").symlink_to(other / "secret.png")
    (data / "images" / "accounts.png").write_bytes(PASSWD)  # inside, readable, not an image
    rows = {
        "cat": "images/cat.png",
        "dog": "images/sub/dog.png",
        "up": "../../../../../../../../../etc/passwd",
        "zigzag": "images/../../x/../../../../../../../../etc/hostname",
        "link": "images/passwd.png",
        "file_uri": "file:///etc/passwd",
        "absolute": "/etc/hostname",
        "outside": "../other/secret.png",
        "outside_link": "images/secret.png",
        "text": "images/accounts.png",
    }
    csv = data / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"{row},{cell}\n" for row, cell in rows.items()))
    return csv


REFUSED = ("up", "zigzag", "link", "file_uri", "absolute", "outside", "outside_link")


def test_a_hostile_csv_reads_nothing_outside_its_folder(hostile: Path, tmp_path: Path) -> None:
    runtime, batch_id = _submit(_settings(tmp_path), hostile)
    try:
        run = run_batch(runtime, batch_id, backoff_seconds=0.01)
        jobs = _jobs(runtime, batch_id)
    finally:
        runtime.close()
    assert (run.succeeded, run.failed) == (2, len(REFUSED) + 1)
    assert {row for row, job in jobs.items() if job.state == JobState.SUCCEEDED} == {"cat", "dog"}
    for row in REFUSED:
        job = jobs[row]
        assert job.error_class == "ImageFetchRefusedError", (row, job.error_message)
        assert "VITSCOPE_FILE_ROOTS" in job.error_message
        assert job.attempts == 1  # permanent: not retried
    text = jobs["text"]
    assert (text.error_class, text.state) == ("ImageError", JobState.FAILED)
    assert "not an image" in text.error_message
    for job in jobs.values():
        assert "root:" not in (job.error_message or "")  # no error carries the bytes it read
    secret = hashlib.sha256((tmp_path / "other" / "secret.png").read_bytes()).hexdigest()
    assert secret not in _stored_images(tmp_path)
    assert _stored_images(tmp_path) == {jobs["cat"].image_sha256, jobs["dog"].image_sha256}


def test_the_setting_replaces_the_dataset_folder(hostile: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, file_roots=[tmp_path / "other"])
    runtime, batch_id = _submit(settings, hostile)
    try:
        run_batch(runtime, batch_id, backoff_seconds=0.01)
        jobs = _jobs(runtime, batch_id)
    finally:
        runtime.close()
    assert jobs["outside"].state == JobState.SUCCEEDED
    assert jobs["outside_link"].state == JobState.SUCCEEDED  # its target lies under the root given
    assert jobs["cat"].error_class == "ImageFetchRefusedError"  # the CSV's folder is not a root now
    assert jobs["link"].error_class == "ImageFetchRefusedError"


def test_a_worker_without_roots_refuses_local_rows_and_says_what_to_do(hostile: Path, tmp_path: Path) -> None:
    """What a distributed worker runs: ``process_jobs`` on a runtime built from its own settings."""
    runtime, batch_id = _submit(_settings(tmp_path), hostile)
    try:
        with runtime.db.session() as session:
            ids = list(session.scalars(sa.select(Job.id).where(Job.batch_id == batch_id)))
        report = process_jobs(runtime, ids)
        jobs = _jobs(runtime, batch_id)
    finally:
        runtime.close()
    assert len(report.failed) == len(ids)
    for job in jobs.values():
        assert job.error_class == "ImageFetchRefusedError"
        assert "reads no local files" in job.error_message
        assert "s3://" in job.error_message
        assert "VITSCOPE_FILE_ROOTS" in job.error_message
    assert not (tmp_path / "results").exists() or _stored_images(tmp_path) == set()


def test_duplicate_rows_are_computed_once_within_and_across_chunks(tmp_path: Path, write_image) -> None:
    """Local chunks hold 4 jobs at batch size 1: ``a`` repeats inside the first chunk and again in
    the second, ``b`` in both; the copy ``a2`` has other bytes-identical content under another name."""
    data = tmp_path / "data"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_image(data / f"{name}.png", seed=seed)
    (data / "a2.png").write_bytes((data / "a.png").read_bytes())
    rows = ["a", "a", "b", "c", "a", "b", "a2"]
    csv = data / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"r{i},{name}.png\n" for i, name in enumerate(rows)))
    runtime, batch_id = _submit(_settings(tmp_path), csv)
    try:
        run = run_batch(runtime, batch_id, backoff_seconds=0.01)
        jobs = _jobs(runtime, batch_id)
        with runtime.db.session() as session:
            rollouts = dict(
                session.execute(
                    sa.select(Artifact.job_id, Artifact.uri).where(Artifact.name == "rollout.npy")
                ).all()
            )
    finally:
        runtime.close()
    assert (run.succeeded, run.reused, run.failed) == (3, 4, 0)
    assert all(job.state == JobState.SUCCEEDED for job in jobs.values())
    computed = {row for row, job in jobs.items() if job.reused_from is None}
    assert len(computed) == 3
    by_image = {}
    for row, name in zip((f"r{i}" for i in range(len(rows))), rows, strict=True):
        by_image.setdefault(name.rstrip("2"), set()).add(rollouts[jobs[row].id])
    assert all(len(uris) == 1 for uris in by_image.values())  # every duplicate points at one result
    assert len(list((tmp_path / "results").rglob("rollout.npy"))) == 3
