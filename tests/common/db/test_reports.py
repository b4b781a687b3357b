"""What users read: batch status, per-job results, worker liveness, and the SQL views."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.db.batches import get_batch
from common.db.jobs import claim_jobs, record_failure
from common.db.models import JobState, utcnow
from common.db.records import ArtifactRecord, JobOutcome, PredictionRecord, WorkerIdentity
from common.db.reports import RESULT_COLUMNS, artifact_column, batch_status, iter_job_results
from common.db.workers import live_workers, record_heartbeat
from producer.output import CSV_COLUMNS
from tests.common.db.conftest import record_success

W = WorkerIdentity("gpu-1", "gpu-1:42")


def _finish_batch(db, ids, *, fail: set[int]) -> None:
    start = utcnow()
    with db.session() as s:
        claim_jobs(s, ids, worker=W, lease_seconds=60, max_attempts=3, now=start)
    for i, job_id in enumerate(ids):
        with db.session() as s:
            if i in fail:
                record_failure(
                    s,
                    job_id,
                    worker_id=W.worker_id,
                    error_class="ImageError",
                    message="not an image",
                    retryable=False,
                    max_attempts=3,
                    now=start + timedelta(seconds=i + 1),
                )
            else:
                outcome = JobOutcome(
                    image_sha256=f"{i:064x}",
                    target_index=i,
                    device="cuda:0",
                    weights_source="timm hub",
                    artifacts=[
                        ArtifactRecord(
                            "rollout.npy", f"s3://b/{i}/rollout.npy", "application/x-npy", 1, "0" * 64
                        )
                    ],
                    predictions=[PredictionRecord(1, i, 0.9, f"class {i}"), PredictionRecord(2, i + 1, 0.05)],
                )
                record_success(
                    s, job_id, worker_id=W.worker_id, outcome=outcome, now=start + timedelta(seconds=i + 1)
                )


def test_status_counts_throughput_and_failures(db, make_batch) -> None:
    batch_id, ids = make_batch(4)
    _finish_batch(db, ids[:3], fail={1})
    with db.session() as s:
        status = batch_status(s, get_batch(s, batch_id))
    assert status.total == 4
    assert status.counts == {"queued": 1, "running": 0, "succeeded": 2, "failed": 1}
    assert status.models == {"deit_tiny_patch16_224": status.counts}
    assert not status.finished
    assert status.jobs_per_second > 0
    assert status.eta_seconds > 0
    assert [(f.error_class, f.message, f.count) for f in status.failures] == [
        ("ImageError", "not an image", 1)
    ]


def test_results_stream_one_object_per_job_in_csv_order(db, make_batch) -> None:
    batch_id, ids = make_batch(5)
    _finish_batch(db, ids, fail={2})
    with db.session() as s:
        rows = list(iter_job_results(s, batch_id, page_size=2))
        failed = list(iter_job_results(s, batch_id, state=JobState.FAILED))
    assert [r["job_id"] for r in rows] == ids
    first = rows[0]
    assert first["state"] == "succeeded"
    assert (first["error_class"], first["error_message"]) == (None, None)
    assert first["predictions"][0] == {"index": 0, "label": "class 0", "prob": 0.9}
    assert (first["top1_index"], first["top1_label"], first["top1_prob"]) == (0, "class 0", 0.9)
    assert first["artifacts"] == {"rollout.npy": "s3://b/0/rollout.npy"}
    assert set(first) == {*RESULT_COLUMNS, "predictions", "artifacts", "metadata"}
    assert [(r["error_class"], r["error_message"]) for r in failed] == [("ImageError", "not an image")]


def test_views_join_jobs_with_predictions_and_artifacts(db, make_batch) -> None:
    batch_id, ids = make_batch(3, name="views")
    _finish_batch(db, ids, fail={0})
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT job_id, state, top1_index, top1_label, rollout_uri, error_message "
                "FROM job_results WHERE batch_name = 'views' ORDER BY row_number"
            )
        ).all()
        preds = conn.execute(
            sa.text("SELECT count(*) FROM job_predictions WHERE batch_id = :b"), {"b": batch_id}
        )
        arts = conn.execute(
            sa.text("SELECT name, uri FROM job_artifacts WHERE job_id = :j"), {"j": ids[1]}
        ).all()
    assert [tuple(r) for r in rows] == [
        (ids[0], "failed", None, None, None, "not an image"),
        (ids[1], "succeeded", 1, "class 1", "s3://b/1/rollout.npy", None),
        (ids[2], "succeeded", 2, "class 2", "s3://b/2/rollout.npy", None),
    ]
    assert preds.scalar() == 4
    assert [tuple(a) for a in arts] == [("rollout.npy", "s3://b/1/rollout.npy")]


def test_exports_and_the_job_results_view_share_one_set_of_columns(db, make_batch) -> None:
    """The names a user meets in `results --format csv/json` are the view's, with the same values."""
    batch_id, ids = make_batch(3)
    _finish_batch(db, ids, fail={0})
    with db.engine.connect() as conn:
        result = conn.execute(
            sa.text("SELECT * FROM job_results WHERE batch_id = :b ORDER BY row_number"), {"b": batch_id}
        )
        columns = list(result.keys())
        view = [dict(row._mapping) for row in result]
    with db.session() as s:
        jobs = list(iter_job_results(s, batch_id))
    artifact_columns = {artifact_column(name) for name in (*ARRAY_ARTIFACTS, *IMAGE_ARTIFACTS)}
    assert [c for c in columns if c != "batch_name" and c not in artifact_columns] == list(RESULT_COLUMNS)
    assert set(columns) - {"batch_name"} <= set(CSV_COLUMNS)
    timestamps = {"created_at", "started_at", "finished_at"}
    for row, job in zip(view, jobs, strict=True):
        assert {c: row[c] for c in RESULT_COLUMNS if c not in timestamps} == {
            c: job[c] for c in RESULT_COLUMNS if c not in timestamps
        }
        assert {c: row[c] for c in artifact_columns & set(columns) if row[c]} == {
            artifact_column(name): uri for name, uri in job["artifacts"].items()
        }


def test_live_workers_are_those_with_recent_heartbeats(db) -> None:
    now = utcnow()
    old = WorkerIdentity("gpu-2", "gpu-2:7")
    with db.session() as s:
        record_heartbeat(
            s,
            worker=W,
            queues="vit",
            device="cuda:0",
            running_jobs=1,
            current_model="m",
            jobs_done=0,
            now=now - timedelta(seconds=5),
        )
        record_heartbeat(
            s,
            worker=W,
            queues="vit",
            device="cuda:0",
            running_jobs=0,
            current_model=None,
            jobs_done=9,
            now=now,
        )
        record_heartbeat(
            s,
            worker=old,
            queues="vit",
            device="cpu",
            running_jobs=0,
            current_model=None,
            jobs_done=1,
            now=now - timedelta(seconds=300),
        )
    with db.session() as s:
        alive = live_workers(s, stale_after_seconds=60, now=now)
    assert [(w.worker_id, w.jobs_done, w.running_jobs) for w in alive] == [(W.worker_id, 9, 0)]
