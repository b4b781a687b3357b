"""Recovery bookkeeping: interruptions counted when a worker dies on a job, suspects found for
isolation, exhausted jobs failed with the reason, and lost messages found for publishing again."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from common.db import Database
from common.db.jobs import (
    claim_jobs,
    interrupted_jobs,
    reap_expired,
    record_failure,
    republish_stale,
)
from common.db.models import Batch, Job, JobState, utcnow
from common.db.records import WorkerIdentity
from common.db.reports import batch_status

A = WorkerIdentity("host-a", "host-a:1")
DEAD = WorkerIdentity("host-a", "host-a:2")  # a process on A's host that no longer runs
B = WorkerIdentity("host-b", "host-b:3")


def _is_dead(worker_id: str) -> bool:
    return worker_id.startswith("host-a:") and worker_id != A.worker_id


def _jobs(db: Database, ids: list[str]) -> list[Job]:
    with db.session() as s:
        return sorted(s.scalars(sa.select(Job).where(Job.id.in_(ids))), key=lambda j: ids.index(j.id))


def _claim(db: Database, ids: list[str], worker: WorkerIdentity, **kwargs) -> list[str]:
    with db.session() as s:
        claimed = claim_jobs(
            s, ids, worker=worker, lease_seconds=60, max_attempts=3, is_dead=_is_dead, **kwargs
        )
        return [j.id for j in claimed]


def _distributed(db: Database, batch_id: str, *, published_ago: float | None) -> None:
    published = None if published_ago is None else utcnow() - timedelta(seconds=published_ago)
    with db.session() as s:
        s.execute(
            sa.update(Batch).where(Batch.id == batch_id).values(mode="distributed", published_at=published)
        )


def test_taking_over_a_dead_workers_job_counts_an_interruption(db, make_batch) -> None:
    _, ids = make_batch(2)
    _claim(db, ids, DEAD)
    assert _claim(db, ids, A) == ids
    assert [(j.attempts, j.interruptions, j.worker_id) for j in _jobs(db, ids)] == [(2, 1, A.worker_id)] * 2


def test_a_process_takes_back_its_own_abandoned_jobs_only_when_it_holds_none(db, make_batch) -> None:
    _, ids = make_batch(2)
    _claim(db, ids, A)
    assert _claim(db, ids, A) == []  # still held: a live owner's jobs are never taken
    assert _claim(db, ids, A, reclaim_own=True) == ids
    assert [(j.attempts, j.interruptions) for j in _jobs(db, ids)] == [(2, 0)] * 2  # not a death


def test_a_job_its_worker_keeps_dying_on_fails_at_claim_with_the_reason(db, make_batch) -> None:
    _, ids = make_batch(1)
    for pid in (11, 12, 13):  # three attempts, each ending with its process killed
        assert _claim(db, ids, WorkerIdentity("host-a", f"host-a:{pid}")) == ids
    assert _claim(db, ids, A) == []
    [job] = _jobs(db, ids)
    assert job.state == JobState.FAILED
    assert job.error_class == "WorkerLostError"
    assert "worker died while processing this job 3 time(s) (last: host-a:13)" in job.error_message
    assert job.attempts == 3


def test_suspects_are_unfinished_jobs_a_worker_died_on(db, make_batch) -> None:
    _, ids = make_batch(5)
    _fresh, orphan, interrupted, live, done = ids  # a fresh queued job is no suspect
    _claim(db, [orphan], DEAD)
    _claim(db, [interrupted], DEAD)
    _claim(db, [interrupted], A)  # took it over: interruptions = 1, now running under a live owner
    _claim(db, [live], B)
    with db.session() as s:
        s.execute(
            sa.update(Job).where(Job.id == done).values(state=JobState.SUCCEEDED.value, interruptions=1)
        )
        assert interrupted_jobs(s, ids, host=A.hostname, is_dead=_is_dead) == [orphan, interrupted]


def test_the_reaper_counts_the_interruption_and_fails_with_the_reason(db, make_batch) -> None:
    _, ids = make_batch(2)
    _claim(db, ids, DEAD)
    with db.session() as s:
        s.execute(sa.update(Job).where(Job.id == ids[1]).values(attempts=3))
        requeued, failed = reap_expired(s, max_attempts=3, host=A.hostname, is_dead=_is_dead)
    assert [j.id for j in requeued] == [ids[0]]
    assert failed == [ids[1]]
    first, second = _jobs(db, ids)
    assert (first.state, first.interruptions, first.requeued_at is not None) == (JobState.QUEUED, 1, True)
    assert second.state == JobState.FAILED
    assert "worker died while processing this job 1 time(s)" in second.error_message


def test_queued_jobs_whose_message_was_lost_are_published_again_once(db, make_batch) -> None:
    batch_id, ids = make_batch(3)
    _distributed(db, batch_id, published_ago=600)
    with db.session() as s:
        assert republish_stale(s, older_than_seconds=3600) == []  # published 10 minutes ago: fine
        found = republish_stale(s, older_than_seconds=300)
        assert sorted(j.id for j in found) == sorted(ids)
        assert republish_stale(s, older_than_seconds=300) == []  # stamped: not again until stale again


def test_a_batch_whose_producer_died_before_publishing_is_published_again(db, make_batch) -> None:
    batch_id, ids = make_batch(2)
    _distributed(db, batch_id, published_ago=None)
    with db.session() as s:
        s.execute(sa.update(Job).values(created_at=utcnow() - timedelta(hours=3)))
        assert batch_status(s, s.get(Batch, batch_id), stale_after_seconds=3600).stale_queued == 2
        assert sorted(j.id for j in republish_stale(s, older_than_seconds=3600)) == sorted(ids)
        assert batch_status(s, s.get(Batch, batch_id), stale_after_seconds=3600).stale_queued == 0


def test_recently_requeued_running_and_local_jobs_are_not_published_again(db, make_batch) -> None:
    batch_id, ids = make_batch(3)
    local_batch, _ = make_batch(1)
    _distributed(db, batch_id, published_ago=7200)
    with db.session() as s:
        s.execute(
            sa.update(Job).where(Job.batch_id == local_batch).values(created_at=utcnow() - timedelta(hours=3))
        )
    _claim(db, [ids[0]], A)
    _claim(db, [ids[1]], A)
    with db.session() as s:  # a transient failure put it back in the queue just now
        record_failure(
            s, ids[1], worker_id=A.worker_id, error_class="X", message="m", retryable=True, max_attempts=3
        )
        assert [j.id for j in republish_stale(s, older_than_seconds=3600)] == [ids[2]]
