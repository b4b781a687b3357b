"""Reading faithfulness scores back: per model × method × metric, the mean and its 95 % interval.

The aggregation runs in SQL (count, mean, and in a second pass the sum of squared deviations from
that mean, which stays accurate where ``Σx² − n·mean²`` would cancel), so a batch of millions of
values is summarized without moving them; ``common.stats`` turns the moments into a t interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db.models import Job, JobMetric
from common.metrics import METHODS, Metric
from common.stats import interval_from_moments

__all__ = ["MetricSummary", "metric_summaries"]


@dataclass(frozen=True)
class MetricSummary:
    """One row of ``producer compare``; ``ci_low``/``ci_high`` are ``None`` for fewer than 2 values."""

    model: str
    method: str
    metric: str
    n: int
    mean: float
    ci_low: float | None
    ci_high: float | None


def _order(names: tuple[str, ...], name: str) -> tuple[int, str]:
    return (names.index(name), "") if name in names else (len(names), name)


def metric_summaries(session: Session, batch_id: str, *, confidence: float = 0.95) -> list[MetricSummary]:
    """Every model × method × metric of the batch, ordered by model, metric, then method (random last)."""
    keys = (Job.model, JobMetric.method, JobMetric.metric)
    means = (
        sa.select(
            *keys, sa.func.count(JobMetric.value).label("n"), sa.func.avg(JobMetric.value).label("mean")
        )
        .join(Job, Job.id == JobMetric.job_id)
        .where(Job.batch_id == batch_id)
        .group_by(*keys)
        .subquery()
    )
    deviation = JobMetric.value - means.c.mean
    rows = session.execute(
        sa.select(
            means.c.model,
            means.c.method,
            means.c.metric,
            means.c.n,
            means.c.mean,
            sa.func.sum(deviation * deviation),
        )
        .select_from(JobMetric)
        .join(Job, Job.id == JobMetric.job_id)
        .join(
            means,
            sa.and_(
                means.c.model == Job.model,
                means.c.method == JobMetric.method,
                means.c.metric == JobMetric.metric,
            ),
        )
        .where(Job.batch_id == batch_id)
        .group_by(means.c.model, means.c.method, means.c.metric, means.c.n, means.c.mean)
    ).all()
    metrics = tuple(m.value for m in Metric)
    summaries = []
    for model, method, metric, n, mean, squares in rows:
        interval = interval_from_moments(int(n), float(mean), float(squares or 0.0), confidence)
        summaries.append(
            MetricSummary(
                model=model,
                method=method,
                metric=metric,
                n=interval.n,
                mean=interval.mean,
                ci_low=interval.low,
                ci_high=interval.high,
            )
        )
    return sorted(summaries, key=lambda s: (s.model, _order(metrics, s.metric), _order(METHODS, s.method)))
