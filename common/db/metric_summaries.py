"""Reading faithfulness scores back: per model × method × metric, the mean, its 95 % interval, and
the paired difference against a reference method (the random map unless asked otherwise).

The aggregation runs in SQL (count, mean, and in a second pass the sum of squared deviations from
that mean, which stays accurate where ``Σx² − n·mean²`` would cancel), so a batch of millions of
values is summarized without moving them; ``common.stats`` turns the moments into a t interval, or a
Wilson interval for 0/1 metrics.

The paired difference is what judges a method: per job, the method's value minus the reference's
value on the same image, so the image-to-image spread that both share cancels. Its mean and t
interval come from the same two-pass moments; Wilcoxon's signed-rank test needs the ranks of
``|d|``, which SQL's window functions give (``RANK()`` for the first of a run of equal values,
``COUNT(*)`` over the run for its length, so the average rank is ``RANK() + (t − 1)/2``): the
statistic ``W⁺`` and the tie term are sums again, and no difference leaves the database.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from common.db.models import Job, JobMetric
from common.metric_settings import BINARY_METRICS, METHODS, RANDOM_METHOD, Metric
from common.stats import (
    SignedRank,
    interval_from_moments,
    paired_proportions_interval,
    signed_rank_p,
    wilson_interval,
)

__all__ = ["IntervalKind", "MetricSummary", "PairedDifference", "metric_summaries"]


class IntervalKind(enum.StrEnum):
    """Which interval a row's ``ci_low``/``ci_high`` are: Student t of the mean, or Wilson for 0/1 scores;
    for a paired difference, t of the differences, or Newcombe's paired score interval for 0/1 scores."""

    T = "t"
    WILSON = "wilson"
    NEWCOMBE = "newcombe"


@dataclass(frozen=True)
class PairedDifference:
    """``method − against`` per job, over the ``n`` jobs that have both values.

    ``mean`` and its interval ``ci_low``/``ci_high`` (``None`` for ``n < 2``): t of the differences,
    or for 0/1 metrics Newcombe's interval for paired proportions, which stays inside [−1, 1]
    (``interval`` says which); ``p``: the two-sided Wilcoxon signed-rank p value
    (``common.stats.signed_rank_p``; ``None`` when every difference is 0).
    """

    against: str
    n: int
    mean: float
    ci_low: float | None
    ci_high: float | None
    p: float | None
    interval: str = IntervalKind.T


@dataclass(frozen=True)
class MetricSummary:
    """One row of ``producer compare``; ``ci_low``/``ci_high`` are ``None`` for fewer than 2 values.

    ``interval`` says which interval they are (``IntervalKind``); ``paired`` is the difference against
    the reference method, ``None`` for the reference itself and where it has no value (the random map
    has no sanity score).
    """

    model: str
    method: str
    metric: str
    n: int
    mean: float
    ci_low: float | None
    ci_high: float | None
    interval: str = IntervalKind.T
    paired: PairedDifference | None = None


def _order(names: tuple[str, ...], name: str) -> tuple[int, str]:
    return (names.index(name), "") if name in names else (len(names), name)


def metric_summaries(
    session: Session, batch_id: str, *, against: str = RANDOM_METHOD, confidence: float = 0.95
) -> list[MetricSummary]:
    """Every model × method × metric of the batch, ordered by model, metric, then method (random last),
    each with its paired difference against the method ``against`` (one of ``METHODS``)."""
    if against not in METHODS:
        raise ValueError(f"unknown method {against!r} to compare against: use one of {', '.join(METHODS)}")
    paired = _paired_differences(session, batch_id, against, confidence)
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
        binary = metric in BINARY_METRICS
        if binary:
            interval = wilson_interval(int(n), float(mean) * int(n), confidence)
        else:
            interval = interval_from_moments(int(n), float(mean), float(squares or 0.0), confidence)
        summaries.append(
            MetricSummary(
                model=model,
                method=method,
                metric=metric,
                n=interval.n,
                mean=float(mean) if binary else interval.mean,
                ci_low=interval.low,
                ci_high=interval.high,
                interval=IntervalKind.WILSON if binary else IntervalKind.T,
                paired=paired.get((model, method, metric)),
            )
        )
    return sorted(summaries, key=lambda s: (s.model, _order(metrics, s.metric), _order(METHODS, s.method)))


def _paired_differences(
    session: Session, batch_id: str, against: str, confidence: float
) -> dict[tuple[str, str, str], PairedDifference]:
    """``method − against`` per model × method × metric: moments and signed-rank sums, in SQL.

    One row per job with both values; a window pass adds each difference's group mean, the rank of
    ``|d|`` among the group's non-zero differences (zeros get their own partition: Wilcoxon's rule
    drops them) and the length of its run of equal ``|d|``; a grouped pass sums those, and for 0/1
    metrics counts the paired 2 × 2 table.
    """
    reference = aliased(JobMetric)
    keys = (Job.model, JobMetric.method, JobMetric.metric)
    pairs = (
        sa.select(*keys, JobMetric.value, (JobMetric.value - reference.value).label("d"))
        .join(Job, Job.id == JobMetric.job_id)
        .join(
            reference,
            sa.and_(
                reference.job_id == JobMetric.job_id,
                reference.metric == JobMetric.metric,
                reference.method == against,
            ),
        )
        .where(Job.batch_id == batch_id, JobMetric.method != against)
        .subquery()
    )
    group = (pairs.c.model, pairs.c.method, pairs.c.metric)
    d = pairs.c.d
    magnitude = sa.func.abs(d)
    is_zero = sa.case((d == 0, 1), else_=0)
    ranked = sa.select(
        *group,
        pairs.c.value,
        d,
        sa.func.avg(d).over(partition_by=group).label("mean"),
        sa.func.rank().over(partition_by=(*group, is_zero), order_by=magnitude).label("rank"),
        sa.func.count().over(partition_by=(*group, magnitude)).label("run"),
    ).subquery()
    r = ranked.c
    deviation = r.d - r.mean
    rows = session.execute(
        sa.select(
            r.model,
            r.method,
            r.metric,
            sa.func.count(),
            sa.func.max(r.mean),
            sa.func.sum(deviation * deviation),
            sa.func.sum(sa.case((r.d == 0, 1), else_=0)),
            sa.func.sum(sa.case((r.d > 0, 1), else_=0)),
            sa.func.sum(sa.case((r.d == 0, r.value), else_=0.0)),
            sa.func.sum(sa.case((r.d > 0, r.rank + (r.run - 1) / 2.0), else_=0.0)),
            sa.func.sum(sa.case((r.d != 0, r.run * r.run - 1), else_=0)),
        ).group_by(r.model, r.method, r.metric)
    ).all()
    found = {}
    for model, method, metric, n, mean, squares, zeros, positive, equal_sum, r_plus, tie_term in rows:
        n, zeros, positive = int(n), int(zeros or 0), int(positive or 0)
        binary = metric in BINARY_METRICS
        if binary:
            # The paired 2 × 2 table of 0/1 scores: d = +1, −1, or 0 with both 1 (the values' sum) or both 0.
            both = round(float(equal_sum or 0.0))
            interval = paired_proportions_interval(
                both, positive, n - zeros - positive, zeros - both, confidence
            )
        else:
            interval = interval_from_moments(n, float(mean), float(squares or 0.0), confidence)
        statistic = SignedRank(
            n=n - zeros,
            r_plus=float(r_plus or 0.0),
            # Σ over runs of (t³ − t) is Σ over their members of (t² − 1).
            tie_term=float(tie_term or 0),
            ties=float(tie_term or 0) > 0,
            zeros=zeros > 0,
        )
        found[model, method, metric] = PairedDifference(
            against=against,
            n=n,
            mean=interval.mean,
            ci_low=interval.low,
            ci_high=interval.high,
            p=signed_rank_p(statistic),
            interval=IntervalKind.NEWCOMBE if binary else IntervalKind.T,
        )
    return found
