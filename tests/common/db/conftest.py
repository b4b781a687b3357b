"""A migrated database (SQLite and PostgreSQL) and a factory for batches of jobs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from common.db import Database
from common.db.batches import add_jobs, create_batch
from common.db.jobs import record_successes
from common.db.records import JobOutcome, NewJob
from common.db.session import upgrade
from common.keys import new_batch_id, new_job_id


def record_success(
    session, job_id: str, *, worker_id: str, outcome: JobOutcome, now: datetime | None = None
) -> bool:
    """``record_successes`` for one job (the workers record micro-batches): True if this worker
    still owned it and the compare-and-set won."""
    return bool(record_successes(session, [(job_id, outcome)], worker_id=worker_id, now=now))


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    upgrade(database_url)
    database = Database(database_url)
    yield database
    database.dispose()


MakeBatch = Callable[..., tuple[str, list[str]]]


@pytest.fixture
def make_batch(db: Database) -> MakeBatch:
    """Create a batch of ``rows`` × ``models`` queued jobs; returns (batch id, job ids in row order)."""

    def make(rows: int = 3, models: tuple[str, ...] = ("deit_tiny_patch16_224",), name: str | None = None):
        batch_id = new_batch_id()
        jobs = [
            NewJob(
                row_number=row + 2,
                image_uri=f"file:///images/{row}.png",
                model=model,
                queue="vitscope.deit_tiny",
                config_fingerprint=f"cfg-{model}",
                row_id=f"img-{row}",
            )
            for row in range(rows)
            for model in models
        ]
        ids = [new_job_id() for _ in jobs]
        with db.session() as session:
            create_batch(
                session, batch_id=batch_id, name=name, source="test.csv", mode="local", settings={}, models={}
            )
            add_jobs(session, batch_id, jobs, ids=ids)
        return batch_id, ids

    return make
