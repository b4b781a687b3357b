"""Metric values in SQL: written with a job's success, copied on reuse, summarized with t intervals."""

from __future__ import annotations

import random

import pytest

from common.db import Database
from common.db.jobs import claim_jobs, find_reusable, record_reuse, record_success
from common.db.metrics import metric_summaries
from common.db.models import Job, JobMetric
from common.db.records import JobOutcome, MetricRecord, WorkerIdentity
from common.stats import mean_interval
from tests.common.db.conftest import MakeBatch

WORKER = WorkerIdentity("host", "host:1")


def _succeed(db: Database, job_id: str, sha: str, metrics: list[MetricRecord], config: str | None) -> None:
    with db.session() as session:
        claim_jobs(session, [job_id], worker=WORKER, lease_seconds=60, max_attempts=3)
        outcome = JobOutcome(
            image_sha256=sha,
            target_index=1,
            device="cpu",
            weights_source="test",
            artifacts=[],
            predictions=[],
            metrics=metrics,
            metrics_config=config,
        )
        assert record_success(session, job_id, worker_id=WORKER.worker_id, outcome=outcome)


def test_summaries_are_the_mean_and_t_interval_of_the_values(db: Database, make_batch: MakeBatch) -> None:
    batch_id, ids = make_batch(rows=20, models=("a", "b"))
    rng = random.Random(0)
    values: dict[tuple[str, str, str], list[float]] = {}
    with db.session() as session:
        models = {job.id: job.model for job in session.query(Job).filter(Job.batch_id == batch_id)}
    for index, job_id in enumerate(ids):
        records = []
        for method in ("random", "grad_rollout"):
            for metric in ("deletion_auc", "entropy"):
                value = rng.random() + (0.5 if method == "random" else 0.0)
                records.append(MetricRecord(method, metric, value))
                values.setdefault((models[job_id], method, metric), []).append(value)
        _succeed(db, job_id, f"sha{index}", records, "m1")
    make_batch(rows=2)  # another batch's values stay out
    with db.session() as session:
        summaries = metric_summaries(session, batch_id)
    assert [(s.model, s.metric, s.method) for s in summaries] == [
        (model, metric, method)
        for model in ("a", "b")
        for metric in ("deletion_auc", "entropy")
        for method in ("grad_rollout", "random")  # the baseline last
    ]
    for summary in summaries:
        expected = mean_interval(values[summary.model, summary.method, summary.metric])
        assert summary.n == expected.n == 20
        assert summary.mean == pytest.approx(expected.mean, rel=1e-12)
        assert summary.ci_low == pytest.approx(expected.low, rel=1e-9)
        assert summary.ci_high == pytest.approx(expected.high, rel=1e-9)


def test_reuse_needs_and_copies_metric_values_of_the_same_settings(
    db: Database, make_batch: MakeBatch
) -> None:
    _, (source, plain_job, wanting) = make_batch(rows=3)
    _succeed(db, source, "same", [MetricRecord("rollout", "entropy", 0.25)], "settings-1")
    with db.session() as session:
        assert find_reusable(session, "same", "cfg-deit_tiny_patch16_224").id == source
        assert (
            find_reusable(session, "same", "cfg-deit_tiny_patch16_224", metrics_config="settings-1").id
            == source
        )
        assert (
            find_reusable(session, "same", "cfg-deit_tiny_patch16_224", metrics_config="settings-2") is None
        )
        claim_jobs(session, [wanting], worker=WORKER, lease_seconds=60, max_attempts=3)
        found = find_reusable(session, "same", "cfg-deit_tiny_patch16_224", metrics_config="settings-1")
        assert record_reuse(session, wanting, worker_id=WORKER.worker_id, source=found)
    with db.session() as session:
        copied = session.query(JobMetric).filter(JobMetric.job_id == wanting).one()
        assert (copied.method, copied.metric, copied.value, copied.config) == (
            "rollout",
            "entropy",
            0.25,
            "settings-1",
        )
        # A job that asked for no metrics is not a source for one that does.
    _succeed(db, plain_job, "plain", [], None)
    with db.session() as session:
        assert (
            find_reusable(session, "plain", "cfg-deit_tiny_patch16_224", metrics_config="settings-1") is None
        )
