"""Submission as a stream: validated first, inserted in one transaction, all or nothing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.db import open_database
from common.db.models import Batch, Job
from common.errors import InvalidDatasetError
from common.settings import Settings
from producer.submit import SubmitOptions, commit_plan, plan_submission

OPTIONS = SubmitOptions(models=["deit_tiny_patch16_224", "vit_base_patch16_224"], weights="random")


def _counts(db) -> tuple[int, int]:
    with db.session() as session:
        return (
            session.scalar(sa.select(sa.func.count()).select_from(Batch)),
            session.scalar(sa.select(sa.func.count()).select_from(Job)),
        )


def test_rows_are_streamed_into_one_batch(tmp_path: Path, database_url: str) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\n" + "".join(f"s3://b/{i}.png\n" for i in range(4500)))
    db = open_database(Settings(database_url=database_url), migrate=True)
    try:
        plan = plan_submission(csv, OPTIONS)
        assert set(plan.specs) == {"deit_tiny_patch16_224", "vit_base_patch16_224"}
        submission = commit_plan(db, plan, OPTIONS, mode="distributed")
        assert submission.jobs == 9000
        assert _counts(db) == (1, 9000)
        with db.session() as session:
            assert session.get(Batch, submission.batch_id).total_jobs == 9000
    finally:
        db.dispose()


def test_a_file_broken_between_validation_and_insertion_submits_nothing(
    tmp_path: Path, database_url: str
) -> None:
    csv = tmp_path / "data.csv"
    good = "".join(f"s3://b/{i}.png\n" for i in range(3000))
    csv.write_text("image_uri\n" + good)
    db = open_database(Settings(database_url=database_url), migrate=True)
    try:
        plan = plan_submission(csv, OPTIONS)
        csv.write_text("image_uri\n" + good + "ftp://late/x.png\n")  # past the first insert chunks
        with pytest.raises(InvalidDatasetError, match="unsupported scheme"):
            commit_plan(db, plan, OPTIONS, mode="distributed")
        assert _counts(db) == (0, 0)
    finally:
        db.dispose()


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda text: text.replace("s3://b/7.png", "s3://b/other.png"), id="a row replaced"),
        pytest.param(
            lambda text: text.replace(
                "s3://b/7.png,deit_tiny_patch16_224", "s3://b/7.png,vit_tiny_patch16_224"
            ),
            id="a model swapped for another valid one",
        ),
        pytest.param(lambda text: text.replace("\n", "\r\n"), id="same rows, other line ends"),
    ],
)
def test_any_edit_between_the_two_passes_submits_nothing(tmp_path: Path, database_url: str, edit) -> None:
    """Same header, same row count, every row valid: pass 1's digest of the bytes still tells."""
    csv = tmp_path / "data.csv"
    text = "image_uri,model\n" + "".join(f"s3://b/{i}.png,deit_tiny_patch16_224\n" for i in range(3000))
    csv.write_text(text)
    db = open_database(Settings(database_url=database_url), migrate=True)
    try:
        plan = plan_submission(csv, OPTIONS)
        assert set(plan.specs) == {"deit_tiny_patch16_224"}
        csv.write_bytes(edit(text).encode())
        with pytest.raises(
            InvalidDatasetError, match="changed while it was submitted; nothing was submitted"
        ):
            commit_plan(db, plan, OPTIONS, mode="local")
        assert _counts(db) == (0, 0)
    finally:
        db.dispose()


def test_a_publication_after_the_broker_lost_its_data_publishes_the_lost_jobs_too(
    tmp_path: Path, sqlite_url: str, private_redis
) -> None:
    """A producer that recreates the broker's marker must heal the loss it then hides from the workers:
    the earlier batch's queued jobs are published again along with the new batch's (not twice)."""
    from common.celery_app import make_celery
    from producer.submit import enqueue

    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\n" + "".join(f"s3://b/{i}.png\n" for i in range(10)))
    options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
    db = open_database(Settings(database_url=sqlite_url), migrate=True)
    app = make_celery(Settings(broker_url=private_redis.url))
    redis = private_redis.client()
    try:
        earlier = commit_plan(db, plan_submission(csv, options), options, mode="distributed").batch_id
        assert enqueue(app, db, earlier, chunk_size=4) == 3
        redis.flushall()  # lost before any worker's reaper looked
        later = commit_plan(db, plan_submission(csv, options), options, mode="distributed").batch_id
        assert enqueue(app, db, later, chunk_size=4) == 3
        queued = [json.loads(raw) for raw in redis.lrange("vitscope.deit_tiny", 0, -1)]
        ids = [job_id for message in queued for job_id in json.loads(base64.b64decode(message["body"]))[0][0]]
        with db.session() as session:
            by_batch = {
                batch: sorted(session.scalars(sa.select(Job.id).where(Job.batch_id == batch)))
                for batch in (earlier, later)
            }
        assert sorted(ids) == sorted(by_batch[earlier] + by_batch[later])  # each once
        assert enqueue(app, db, later, chunk_size=4) == 3  # marker present: only what was asked
        assert redis.llen("vitscope.deit_tiny") == 9
    finally:
        db.dispose()
