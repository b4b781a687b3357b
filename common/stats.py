"""Confidence intervals for ``producer compare``, with the standard library alone.

The producer installs without numpy or scipy, so the Student t quantile is computed here from the
closed form of the t distribution's CDF for integer degrees of freedom (Abramowitz & Stegun
26.7.3–26.7.4), inverted by bisection. The interval of a mean is then the textbook
``mean ± t_{0.975, n−1} · s / √n``: cheap from ``n``, the mean and the sum of squared deviations,
which SQL computes for millions of values without moving them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MeanInterval", "interval_from_moments", "mean_interval", "student_t_cdf_two_sided", "t_quantile"]

# Beyond this many degrees of freedom the closed form's series gets long, and the Cornish–Fisher
# expansion is already exact to 1e-6.
_SERIES_LIMIT = 1000


@dataclass(frozen=True)
class MeanInterval:
    """The mean of ``n`` values and its two-sided confidence interval (``None`` when ``n < 2``)."""

    n: int
    mean: float
    low: float | None
    high: float | None


def student_t_cdf_two_sided(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with ``df`` (integer ≥ 1) degrees of freedom, ``t ≥ 0``."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term = series = 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    term = series = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        series += term
    return math.sin(theta) * series


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| < t) = confidence``: 12.706 for 95 % and 1 degree of freedom, 1.960 for ∞."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > _SERIES_LIMIT:
        z = _normal_quantile((1 + confidence) / 2)
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    low, high = 0.0, 1.0
    while student_t_cdf_two_sided(high, df) < confidence:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        if student_t_cdf_two_sided(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def interval_from_moments(
    n: int, mean: float, squared_deviations: float, confidence: float = 0.95
) -> MeanInterval:
    """The t interval from ``n``, the mean and ``Σ (x − mean)²``."""
    if n < 2:
        return MeanInterval(n=n, mean=mean, low=None, high=None)
    sd = math.sqrt(max(squared_deviations, 0.0) / (n - 1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return MeanInterval(n=n, mean=mean, low=mean - half, high=mean + half)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """Mean and t interval of ``values`` (for tests and small lists; SQL aggregates large ones)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    return interval_from_moments(n, mean, math.fsum((v - mean) ** 2 for v in values), confidence)
