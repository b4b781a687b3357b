"""Metric values in SQL: written with a job's success, copied on reuse, summarized with t intervals."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from common.db import Database
from common.db.jobs import claim_jobs, find_reusable, record_reuse, record_successes
from common.db.metric_summaries import metric_summaries
from common.db.models import Job, JobMetric
from common.db.records import JobOutcome, MetricRecord, WorkerIdentity
from common.stats import mean_interval, paired_proportions_interval
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
        assert record_successes(session, [(job_id, outcome)], worker_id=WORKER.worker_id) == [job_id]


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


def _stored(db: Database, batch_id: str) -> dict[tuple[str, str], dict[str, float]]:
    """Every stored value of the batch, per method × metric, by job: what the summaries must match."""
    with db.session() as session:
        rows = (
            session.query(JobMetric.method, JobMetric.metric, JobMetric.job_id, JobMetric.value)
            .join(Job, Job.id == JobMetric.job_id)
            .filter(Job.batch_id == batch_id)
        )
        stored: dict[tuple[str, str], dict[str, float]] = {}
        for method, metric, job_id, value in rows:
            stored.setdefault((method, metric), {})[job_id] = value
    return stored


@pytest.mark.parametrize("against", ["random", "rollout"])
def test_paired_differences_and_intervals_match_scipy_on_the_stored_values(
    db: Database, make_batch: MakeBatch, against: str
) -> None:
    """Per job, method − reference: scipy's t interval and Wilcoxon p; Wilson intervals for 0/1 scores.

    Three regimes of the signed-rank test: continuous scores (no ties: the exact distribution),
    scores on a 0.1 grid (ties and zeros: the normal approximation) and 0/1 scores, whose paired
    difference has Newcombe's interval, from the 2 × 2 table SQL counts.
    """
    batch_id, ids = make_batch(rows=40)
    rng = random.Random(23)
    for index, job_id in enumerate(ids):
        records = []
        for method, shift in (("rollout", -0.1), ("grad_rollout", 0.05), ("random", 0.0)):
            records.append(MetricRecord(method, "deletion_auc", rng.random() + shift))
            records.append(MetricRecord(method, "mass_inside", round(rng.random() + shift, 1)))
            records.append(MetricRecord(method, "pointing_game", float(rng.random() < 0.5 - shift * 3)))
        if index % 10 == 0:  # the random map has no sanity score: nothing to pair with
            records.append(MetricRecord("rollout", "sanity_spearman", rng.random()))
        _succeed(db, job_id, f"sha{index}", records, "m1")
    with db.session() as session:
        summaries = metric_summaries(session, batch_id, against=against)
    stored = _stored(db, batch_id)
    assert {(s.method, s.metric) for s in summaries} == set(stored)
    for s in summaries:
        values = np.array(list(stored[s.method, s.metric].values()))
        if s.metric == "pointing_game":
            assert s.interval == "wilson"
            wilson = stats.binomtest(int(values.sum()), len(values)).proportion_ci(method="wilson")
            assert (s.ci_low, s.ci_high) == pytest.approx((wilson.low, wilson.high), rel=1e-9, abs=1e-12)
            assert 0.0 <= s.ci_low <= s.mean <= s.ci_high <= 1.0
        else:
            assert s.interval == "t"
            t = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
            assert (s.ci_low, s.ci_high) == pytest.approx(t, rel=1e-9)
        reference = stored.get((against, s.metric), {})
        if s.method == against or not reference:
            assert s.paired is None, (s.method, s.metric)
            continue
        assert s.paired is not None
        jobs = sorted(set(stored[s.method, s.metric]) & set(reference))
        d = np.array([stored[s.method, s.metric][j] - reference[j] for j in jobs])
        assert (s.paired.against, s.paired.n) == (against, len(d))
        assert s.paired.mean == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
        if s.metric == "pointing_game":  # the paired 2 × 2 table, counted here from the values
            pairs = [(stored[s.method, s.metric][j], reference[j]) for j in jobs]
            table = [pairs.count(cell) for cell in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0))]
            newcombe = paired_proportions_interval(*table)
            assert s.paired.interval == "newcombe"
            assert (s.paired.ci_low, s.paired.ci_high) == pytest.approx(
                (newcombe.low, newcombe.high), rel=1e-12
            )
            assert -1.0 <= s.paired.ci_low <= s.paired.mean <= s.paired.ci_high <= 1.0
        else:
            assert s.paired.interval == "t"
            t = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
            assert (s.paired.ci_low, s.paired.ci_high) == pytest.approx(t, rel=1e-9, abs=1e-12)
        if not d.any():
            assert s.paired.p is None
            continue
        nonzero = d[d != 0]
        ties = len(np.unique(np.abs(nonzero))) < len(nonzero)
        exact = len(nonzero) == len(d) and not ties and len(d) <= 50
        expected = stats.wilcoxon(d, method="exact" if exact else "asymptotic").pvalue
        assert s.paired.p == pytest.approx(expected, rel=1e-9), (s.method, s.metric, exact)
    by_key = {(s.method, s.metric): s for s in summaries}
    if against == "random":  # the shifts above are real effects: the paired test sees them
        assert by_key["rollout", "deletion_auc"].paired.p < 0.05
        assert by_key["rollout", "sanity_spearman"].paired is None
