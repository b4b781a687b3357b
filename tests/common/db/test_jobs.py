"""The job state machine: claims under leases, compare-and-set finishes, recovery of lost workers."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa

from common.db import Database
from common.db.batches import retry_failed
from common.db.jobs import (
    claim_jobs,
    find_reusable,
    find_reusables,
    reap_expired,
    record_failure,
    record_reuse,
    record_successes,
    release_jobs,
    renew_leases,
)
from common.db.models import Artifact, Job, JobState, Prediction, utcnow
from common.db.records import ArtifactRecord, JobOutcome, PredictionRecord, WorkerIdentity
from tests.common.db.conftest import record_success

A = WorkerIdentity("host-a", "host-a:1")
B = WorkerIdentity("host-b", "host-b:2")
A2 = WorkerIdentity("host-a", "host-a:3")  # another process on the same host as A


def _outcome(sha: str = "ab" * 32) -> JobOutcome:
    return JobOutcome(
        image_sha256=sha,
        target_index=281,
        device="cpu",
        weights_source="RANDOM (untrained)",
        artifacts=[
            ArtifactRecord(
                "rollout.npy", "file:///r/rollout.npy", "application/x-npy", 10, "c" * 64, "14x14", "float32"
            ),
            ArtifactRecord(
                "rollout.png", "file:///r/rollout.png", "image/png", 20, "d" * 64, "224x224x3", "uint8"
            ),
        ],
        predictions=[PredictionRecord(1, 281, 0.7, "tabby"), PredictionRecord(2, 282, 0.2, "tiger cat")],
        fetch_seconds=0.1,
        compute_seconds=0.2,
        store_seconds=0.3,
    )


def _state(db: Database, job_id: str) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def test_claim_moves_queued_to_running_once(db, make_batch) -> None:
    _, ids = make_batch(3)
    with db.session() as s:
        jobs = claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
    assert [j.id for j in jobs] == ids
    assert all(j.state == JobState.RUNNING and j.attempts == 1 and j.worker_id == A.worker_id for j in jobs)
    with db.session() as s:
        assert claim_jobs(s, ids, worker=B, lease_seconds=60, max_attempts=3) == []


def test_concurrent_claims_never_share_a_job(db, make_batch) -> None:
    _, ids = make_batch(40)
    won: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def claim(worker: WorkerIdentity) -> None:
        barrier.wait()
        with db.session() as s:
            won[worker.worker_id] = [
                j.id for j in claim_jobs(s, ids, worker=worker, lease_seconds=60, max_attempts=3)
            ]

    workers = [WorkerIdentity(f"h{i}", f"h{i}:{i}") for i in range(4)]
    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job_id for ids_ in won.values() for job_id in ids_]
    assert sorted(claimed) == sorted(ids)  # every job claimed exactly once


def test_expired_lease_can_be_claimed_by_another_worker(db, make_batch) -> None:
    _, ids = make_batch(1)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=10, max_attempts=3, now=now)
    with db.session() as s:
        assert (
            claim_jobs(s, ids, worker=B, lease_seconds=10, max_attempts=3, now=now + timedelta(seconds=5))
            == []
        )
    with db.session() as s:
        jobs = claim_jobs(s, ids, worker=B, lease_seconds=10, max_attempts=3, now=now + timedelta(seconds=11))
    assert [j.worker_id for j in jobs] == [B.worker_id]
    assert jobs[0].attempts == 2


def test_dead_process_on_the_same_host_is_taken_over_at_once(db, make_batch) -> None:
    _, ids = make_batch(2)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=600, max_attempts=3)
    with db.session() as s:  # a live owner keeps its jobs
        assert claim_jobs(s, ids, worker=A2, lease_seconds=600, max_attempts=3, is_dead=lambda w: False) == []
    with db.session() as s:  # another host cannot judge our processes
        assert claim_jobs(s, ids, worker=B, lease_seconds=600, max_attempts=3, is_dead=lambda w: True) == []
    with db.session() as s:
        jobs = claim_jobs(
            s, ids, worker=A2, lease_seconds=600, max_attempts=3, is_dead=lambda w: w == A.worker_id
        )
    assert sorted(j.id for j in jobs) == sorted(ids)
    assert {j.worker_id for j in jobs} == {A2.worker_id}


def test_renew_extends_only_own_leases(db, make_batch) -> None:
    _, ids = make_batch(2)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids[:1], worker=A, lease_seconds=10, max_attempts=3, now=now)
        claim_jobs(s, ids[1:], worker=B, lease_seconds=10, max_attempts=3, now=now)
    with db.session() as s:
        owned = renew_leases(s, ids, worker_id=A.worker_id, lease_seconds=100, now=now)
    assert owned == ids[:1]
    assert _state(db, ids[0]).lease_expires_at > now + timedelta(seconds=99)
    assert _state(db, ids[1]).lease_expires_at < now + timedelta(seconds=11)


def test_success_writes_results_once_and_only_for_the_owner(db, make_batch) -> None:
    _, ids = make_batch(1)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
    with db.session() as s:
        assert record_success(s, ids[0], worker_id=B.worker_id, outcome=_outcome()) is False
    with db.session() as s:
        assert record_success(s, ids[0], worker_id=A.worker_id, outcome=_outcome()) is True
    with db.session() as s:  # a duplicate delivery finishing later changes nothing
        assert record_success(s, ids[0], worker_id=A.worker_id, outcome=_outcome()) is False
    job = _state(db, ids[0])
    assert job.state == JobState.SUCCEEDED
    assert job.lease_expires_at is None
    assert job.target_index == 281
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Artifact)) == 2
        assert [p.class_index for p in s.scalars(sa.select(Prediction).order_by(Prediction.rank))] == [
            281,
            282,
        ]


def test_lost_claim_cannot_overwrite_the_new_owner(db, make_batch) -> None:
    _, ids = make_batch(1)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=1, max_attempts=3, now=now)
    with db.session() as s:
        claim_jobs(s, ids, worker=B, lease_seconds=60, max_attempts=3, now=now + timedelta(seconds=2))
    with db.session() as s:
        assert record_success(s, ids[0], worker_id=A.worker_id, outcome=_outcome()) is False
        assert (
            record_failure(
                s,
                ids[0],
                worker_id=A.worker_id,
                error_class="X",
                message="m",
                retryable=False,
                max_attempts=3,
            )
            is None
        )
    assert _state(db, ids[0]).state == JobState.RUNNING


@pytest.mark.parametrize(
    ("retryable", "attempt", "expected"),
    [
        (False, 1, JobState.FAILED),  # permanent: bad image, unknown model
        (True, 1, JobState.QUEUED),  # transient with attempts left
        (True, 3, JobState.FAILED),  # transient, budget used up
    ],
)
def test_failure_requeues_transient_errors_until_attempts_run_out(
    db, make_batch, retryable, attempt, expected
):
    _, ids = make_batch(1)
    now = utcnow()
    for i in range(attempt):
        with db.session() as s:
            claim_jobs(s, ids, worker=A, lease_seconds=1, max_attempts=3, now=now + timedelta(seconds=2 * i))
    with db.session() as s:
        state = record_failure(
            s,
            ids[0],
            worker_id=A.worker_id,
            error_class="ImageError",
            message="truncated image",
            retryable=retryable,
            max_attempts=3,
        )
    assert state == expected
    job = _state(db, ids[0])
    assert job.state == expected
    assert (job.error_class, job.error_message) == ("ImageError", "truncated image")


def test_reaper_requeues_expired_and_fails_exhausted(db, make_batch) -> None:
    _, ids = make_batch(2)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids[:1], worker=A, lease_seconds=5, max_attempts=3, now=now)
        claim_jobs(s, ids[1:], worker=A, lease_seconds=5, max_attempts=1, now=now)
    with db.session() as s:
        assert reap_expired(s, max_attempts=3, now=now + timedelta(seconds=1)) == ([], [])
    with db.session() as s:
        requeued, failed = reap_expired(s, max_attempts=1, now=now + timedelta(seconds=6))
    assert requeued == []
    assert sorted(failed) == sorted(ids)
    _, more = make_batch(1)
    with db.session() as s:
        claim_jobs(s, more, worker=A, lease_seconds=5, max_attempts=3, now=now)
    with db.session() as s:
        requeued, failed = reap_expired(s, max_attempts=3, now=now + timedelta(seconds=6))
    assert requeued == [(more[0], "deit_tiny_patch16_224", "vitscope.deit_tiny")]
    assert failed == []
    assert _state(db, more[0]).state == JobState.QUEUED
    assert _state(db, ids[0]).error_class == "WorkerLostError"


def test_release_hands_jobs_back_without_spending_an_attempt(db, make_batch) -> None:
    _, ids = make_batch(2)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
    with db.session() as s:
        assert sorted(release_jobs(s, ids, worker_id=A.worker_id)) == sorted(ids)
    job = _state(db, ids[0])
    assert (job.state, job.attempts, job.worker_id) == (JobState.QUEUED, 0, None)


def test_reuse_points_at_the_earlier_artifacts(db, make_batch) -> None:
    _, first = make_batch(1)
    _, second = make_batch(1)
    with db.session() as s:
        claim_jobs(s, first + second, worker=A, lease_seconds=60, max_attempts=3)
        record_success(s, first[0], worker_id=A.worker_id, outcome=_outcome("ef" * 32))
    with db.session() as s:
        assert find_reusable(s, "ef" * 32, "cfg-other") is None
        source = find_reusable(s, "ef" * 32, "cfg-deit_tiny_patch16_224")
        assert source is not None
        assert source.id == first[0]
        assert record_reuse(s, second[0], worker_id=A.worker_id, source=source, fetch_seconds=0.01)
    with db.session() as s:
        job = s.get(Job, second[0])
        assert job.reused_from == first[0]
        assert job.state == JobState.SUCCEEDED
        uris = set(s.scalars(sa.select(Artifact.uri).where(Artifact.job_id == second[0])))
        assert uris == {"file:///r/rollout.npy", "file:///r/rollout.png"}
        assert len(s.scalars(sa.select(Prediction).where(Prediction.job_id == second[0])).all()) == 2


def test_a_micro_batch_is_recorded_in_one_call_and_only_owned_jobs_win(db, make_batch) -> None:
    _, ids = make_batch(3)
    with db.session() as s:
        claim_jobs(s, ids[:2], worker=A, lease_seconds=60, max_attempts=3)
        claim_jobs(s, ids[2:], worker=B, lease_seconds=60, max_attempts=3)
    outcomes = [(job_id, _outcome(f"{n}" * 64)) for n, job_id in enumerate(ids)]
    with db.session() as s:
        assert record_successes(s, outcomes, worker_id=A.worker_id) == ids[:2]
    with db.session() as s:
        assert [s.get(Job, i).state for i in ids] == [JobState.SUCCEEDED] * 2 + [JobState.RUNNING]
        assert [s.get(Job, i).image_sha256 for i in ids[:2]] == ["0" * 64, "1" * 64]
        for job_id, count in zip(ids, (2, 2, 0), strict=True):
            assert len(s.scalars(sa.select(Artifact).where(Artifact.job_id == job_id)).all()) == count
            assert len(s.scalars(sa.select(Prediction).where(Prediction.job_id == job_id)).all()) == count
    with db.session() as s:  # recording again (a retried transaction) changes nothing
        assert record_successes(s, outcomes, worker_id=A.worker_id) == []


def test_reusable_originals_are_found_for_many_images_at_once(db, make_batch) -> None:
    _, ids = make_batch(3)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
        record_success(s, ids[0], worker_id=A.worker_id, outcome=_outcome("ef" * 32))
        record_success(s, ids[1], worker_id=A.worker_id, outcome=_outcome("ef" * 32))  # a later twin
        record_success(s, ids[2], worker_id=A.worker_id, outcome=_outcome("12" * 32))
    config = "cfg-deit_tiny_patch16_224"
    with db.session() as s:
        found = find_reusables(
            s, [("ef" * 32, config), ("12" * 32, config), ("ef" * 32, "other"), ("99" * 32, config)]
        )
        assert {key: job.id for key, job in found.items()} == {
            ("ef" * 32, config): ids[0],
            ("12" * 32, config): ids[2],
        }
        assert find_reusables(s, []) == {}


def test_retry_failed_requeues_with_a_fresh_budget(db, make_batch) -> None:
    batch_id, ids = make_batch(2)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
        record_failure(
            s, ids[0], worker_id=A.worker_id, error_class="E", message="m", retryable=False, max_attempts=3
        )
        record_success(s, ids[1], worker_id=A.worker_id, outcome=_outcome())
    with db.session() as s:
        assert retry_failed(s, batch_id) == [(ids[0], "deit_tiny_patch16_224", "vitscope.deit_tiny")]
    job = _state(db, ids[0])
    assert (job.state, job.attempts, job.error_class) == (JobState.QUEUED, 0, None)
    assert _state(db, ids[1]).state == JobState.SUCCEEDED


def test_reaper_recovers_dead_local_owners_before_their_lease_ends(db, make_batch) -> None:
    _, ids = make_batch(2)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids[:1], worker=A, lease_seconds=600, max_attempts=3, now=now)
        claim_jobs(s, ids[1:], worker=B, lease_seconds=600, max_attempts=3, now=now)
    with db.session() as s:  # without the liveness check, unexpired leases are left alone
        assert reap_expired(s, max_attempts=3, now=now) == ([], [])
    with db.session() as s:  # A's process is gone; B lives on another host and is not ours to judge
        requeued, failed = reap_expired(
            s, max_attempts=3, host="host-a", is_dead=lambda worker_id: True, now=now
        )
    assert [job.id for job in requeued] == ids[:1]
    assert failed == []
    assert _state(db, ids[1]).state == JobState.RUNNING


def test_a_headless_outcome_records_its_readout_and_note_and_a_reuse_copies_them(db, make_batch) -> None:
    _, first = make_batch(1)
    _, second = make_batch(1)
    headless = replace(
        _outcome("12" * 32),
        target_index=None,
        predictions=[],
        readout="token",
        note="no classification head: no prediction, gradient rollout or relevance",
    )
    with db.session() as s:
        claim_jobs(s, first + second, worker=A, lease_seconds=60, max_attempts=3)
        record_success(s, first[0], worker_id=A.worker_id, outcome=headless)
        source = find_reusable(s, "12" * 32, "cfg-deit_tiny_patch16_224")
        assert source is not None
        assert record_reuse(s, second[0], worker_id=A.worker_id, source=source)
    with db.session() as s:
        rows = s.execute(
            sa.text("SELECT job_id, target_index, top1_index, readout, note FROM job_results ORDER BY job_id")
        ).all()
    assert sorted(rows) == sorted(
        (job_id, None, None, "token", headless.note) for job_id in (first[0], second[0])
    )


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.RUNNING])
def test_claims_refuse_jobs_that_used_up_their_attempts(db, make_batch, state: JobState) -> None:
    """A poison job must not loop: neither a queued one nor an expired one is claimed past the budget
    (an expired one whose owner is gone is failed there and then)."""
    _, ids = make_batch(2)
    now = utcnow()
    with db.session() as s:
        s.execute(
            sa.update(Job)
            .where(Job.id == ids[0])
            .values(
                state=state.value,
                attempts=3,
                worker_id=A.worker_id,
                worker_host=A.hostname,
                lease_expires_at=now - timedelta(seconds=1),
            )
        )
    with db.session() as s:
        claimed = claim_jobs(
            s, ids, worker=A2, lease_seconds=60, max_attempts=3, is_dead=lambda _: True, now=now
        )
    assert [job.id for job in claimed] == ids[1:]
    job = _state(db, ids[0])
    if state is JobState.RUNNING:
        # Its worker is gone and no attempt is left: failed at once with the reason, not left running.
        assert (job.state, job.attempts, job.worker_id) == (JobState.FAILED, 3, A.worker_id)
        assert job.error_message is not None
        assert "worker died" in job.error_message
        return
    assert (job.state, job.attempts, job.worker_id) == (state, 3, A.worker_id)
    with db.session() as s:  # with a larger budget the same job is claimable again
        assert [
            j.id for j in claim_jobs(s, ids[:1], worker=A2, lease_seconds=60, max_attempts=4, now=now)
        ] == ids[:1]


def test_record_failure_on_a_missing_job_changes_nothing(db, make_batch) -> None:
    _, ids = make_batch(1)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
    with db.session() as s:
        state = record_failure(
            s,
            "no-such-job",
            worker_id=A.worker_id,
            error_class="E",
            message="m",
            retryable=True,
            max_attempts=3,
        )
    assert state is None
    job = _state(db, ids[0])
    assert (job.state, job.error_class) == (JobState.RUNNING, None)


def test_record_reuse_after_a_lost_claim_writes_nothing(db, make_batch) -> None:
    _, first = make_batch(1)
    _, second = make_batch(1)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, first, worker=A, lease_seconds=60, max_attempts=3, now=now)
        record_success(s, first[0], worker_id=A.worker_id, outcome=_outcome("ef" * 32))
        claim_jobs(s, second, worker=A, lease_seconds=1, max_attempts=3, now=now)
    with db.session() as s:  # A's lease ran out and B took the job over
        claim_jobs(s, second, worker=B, lease_seconds=60, max_attempts=3, now=now + timedelta(seconds=2))
    with db.session() as s:
        source = find_reusable(s, "ef" * 32, "cfg-deit_tiny_patch16_224")
        assert record_reuse(s, second[0], worker_id=A.worker_id, source=source) is False
    job = _state(db, second[0])
    assert (job.state, job.worker_id, job.reused_from) == (JobState.RUNNING, B.worker_id, None)
    with db.session() as s:
        for table in (Artifact, Prediction):
            assert (
                s.scalar(sa.select(sa.func.count()).select_from(table).where(table.job_id == second[0])) == 0
            )


def test_result_rows_already_present_are_kept_not_duplicated(db, make_batch) -> None:
    """A retried transaction may meet rows it wrote before: ON CONFLICT DO NOTHING, on both dialects."""
    _, ids = make_batch(1)
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=60, max_attempts=3)
        s.add(
            Artifact(
                job_id=ids[0],
                name="rollout.npy",
                uri="file:///earlier/rollout.npy",
                content_type="application/x-npy",
                bytes=1,
                checksum="e" * 64,
                shape="14x14",
                dtype="float32",
            )
        )
        s.add(Prediction(job_id=ids[0], rank=1, class_index=1, prob=0.5, label="earlier"))
    with db.session() as s:
        assert record_success(s, ids[0], worker_id=A.worker_id, outcome=_outcome()) is True
    with db.session() as s:
        artifacts = {a.name: a.uri for a in s.scalars(sa.select(Artifact).where(Artifact.job_id == ids[0]))}
        predictions = {
            p.rank: p.label for p in s.scalars(sa.select(Prediction).where(Prediction.job_id == ids[0]))
        }
    assert artifacts == {"rollout.npy": "file:///earlier/rollout.npy", "rollout.png": "file:///r/rollout.png"}
    assert predictions == {1: "earlier", 2: "tiger cat"}


def test_the_reaper_takes_at_most_its_limit_per_round(db, make_batch) -> None:
    _, ids = make_batch(5)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=5, max_attempts=3, now=now)
    later = now + timedelta(seconds=6)
    rounds: list[int] = []
    for _ in range(4):
        with db.session() as s:
            requeued, failed = reap_expired(s, max_attempts=3, now=later, limit=2)
        assert failed == []
        rounds.append(len(requeued))
    assert rounds == [2, 2, 1, 0]
    assert all(_state(db, job_id).state == JobState.QUEUED for job_id in ids)


def test_a_process_takes_back_the_jobs_its_stopped_chunk_left_running(db, make_batch) -> None:
    """A chunk cut short by a database outage leaves its jobs running under this process's lease;
    the retried chunk must not wait for that lease to run out (minutes) and the reaper."""
    _, ids = make_batch(2)
    now = utcnow()
    with db.session() as s:
        claim_jobs(s, ids, worker=A, lease_seconds=600, max_attempts=3, now=now)
    with db.session() as s:  # nobody else may: the lease is live and A is not dead
        assert claim_jobs(s, ids, worker=A2, lease_seconds=600, max_attempts=3, is_dead=lambda _: False) == []
    with db.session() as s:  # only when the caller says it holds nothing (a new chunk, not a neighbour)
        assert claim_jobs(s, ids, worker=A, lease_seconds=600, max_attempts=3, now=now) == []
    with db.session() as s:
        jobs = claim_jobs(s, ids, worker=A, lease_seconds=600, max_attempts=3, reclaim_own=True, now=now)
    assert [(j.id, j.worker_id, j.attempts, j.interruptions) for j in jobs] == [
        (i, A.worker_id, 2, 0) for i in ids
    ]
    with db.session() as s:  # still bounded by the attempt budget
        assert (
            claim_jobs(s, ids, worker=A, lease_seconds=600, max_attempts=2, reclaim_own=True, now=now) == []
        )
