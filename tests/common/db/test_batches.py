"""Batches: bulk submission, lookup by id or name, idempotent job inserts."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from common.db.batches import add_jobs, get_batch, mark_published, queued_jobs
from common.db.models import Batch, Job
from common.db.records import NewJob
from common.errors import NotFoundError, PermanentError
from common.keys import new_job_id


def test_batch_found_by_id_and_by_name(db, make_batch) -> None:
    batch_id, _ = make_batch(2, name="lesions-v1")
    with db.session() as s:
        assert get_batch(s, batch_id).name == "lesions-v1"
        assert get_batch(s, "lesions-v1").id == batch_id
        with pytest.raises(NotFoundError, match="nope"):
            get_batch(s, "nope")


def test_batch_names_are_unique(db, make_batch) -> None:
    make_batch(1, name="dup")
    with pytest.raises(PermanentError, match="already exists"):
        make_batch(1, name="dup")


def test_jobs_are_rows_times_models_and_counted(db, make_batch) -> None:
    batch_id, ids = make_batch(3, models=("deit_tiny_patch16_224", "vit_base_patch16_224"))
    with db.session() as s:
        assert s.get(Batch, batch_id).total_jobs == 6
        queued = queued_jobs(s, batch_id)
    assert sorted(job.id for job in queued) == sorted(ids)
    assert [job.model for job in queued] == ["deit_tiny_patch16_224"] * 3 + ["vit_base_patch16_224"] * 3


def test_adding_the_same_rows_again_inserts_nothing(db, make_batch) -> None:
    batch_id, _ids = make_batch(2)
    again = [
        NewJob(
            row_number=row + 2,
            image_uri="x",
            model="deit_tiny_patch16_224",
            queue="q",
            config_fingerprint="c",
        )
        for row in range(2)
    ]
    with db.session() as s:
        assert add_jobs(s, batch_id, again, ids=[new_job_id() for _ in again]) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 2


def test_bulk_insert_of_many_rows_and_publication(db, make_batch) -> None:
    batch_id, _ = make_batch(5000)
    with db.session() as s:
        assert s.get(Batch, batch_id).total_jobs == 5000
        assert s.scalar(sa.select(sa.func.count()).where(Job.batch_id == batch_id)) == 5000
        assert s.get(Batch, batch_id).published_at is None
        mark_published(s, batch_id)
    with db.session() as s:
        assert s.get(Batch, batch_id).published_at is not None
