"""Confidence intervals and the signed-rank test of ``producer compare``, with the standard library alone.

The producer installs without numpy or scipy, so everything here is computed from closed forms:

- the Student t quantile from the closed form of the t distribution's CDF for integer degrees of
  freedom (Abramowitz & Stegun 26.7.3–26.7.4), inverted by bisection. The interval of a mean is then
  the textbook ``mean ± t_{0.975, n−1} · s / √n``: cheap from ``n``, the mean and the sum of squared
  deviations, which SQL computes for millions of values without moving them;
- the Wilson score interval of a proportion (Wilson, 1927), for 0/1 scores such as the pointing
  game: it stays inside [0, 1] and keeps a width at 0 or ``n`` successes, where a t interval runs
  past 1 or collapses to a point;
- Newcombe's hybrid score interval for the difference of two paired proportions (Newcombe, 1998,
  method 10), built from the two Wilson intervals, for the paired difference of 0/1 scores: it
  stays inside [−1, 1], where a t interval of the ±1/0 differences runs past the bounds;
- the two-sided p value of Wilcoxon's signed-rank test of paired differences, from ``n`` (non-zero
  differences), the sum of the positive differences' ranks ``W⁺`` and the tie term ``Σ (t³ − t)``,
  all three SQL aggregates: the exact null distribution for ``n ≤ 50`` without ties or zeros,
  otherwise the normal approximation with the tie correction. These are the choices of
  ``scipy.stats.wilcoxon`` (``zero_method="wilcox"``, no continuity correction), except that scipy
  runs a permutation test where ``n ≤ 13`` *with* ties or zeros; the tests compare both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "EXACT_SIGNED_RANK_LIMIT",
    "MeanInterval",
    "SignedRank",
    "interval_from_moments",
    "mean_interval",
    "paired_proportions_interval",
    "signed_rank",
    "signed_rank_p",
    "student_t_cdf_two_sided",
    "t_quantile",
    "wilson_interval",
]

# Beyond this many degrees of freedom the closed form's series gets long, and the Cornish–Fisher
# expansion is already exact to 1e-6.
_SERIES_LIMIT = 1000

# Up to this many non-zero differences without ties, the signed-rank p value comes from the exact
# null distribution (2ⁿ equally likely sign patterns, counted by dynamic programming); beyond it, or
# with ties or zeros, from the normal approximation. scipy's ``method="auto"`` draws the same line.
EXACT_SIGNED_RANK_LIMIT = 50


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


def wilson_interval(n: int, successes: float, confidence: float = 0.95) -> MeanInterval:
    """The Wilson score interval of the proportion ``successes / n`` (``None`` bounds for ``n < 2``).

    ``(p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the normal quantile: always
    inside [0, 1], and of non-zero width at 0 and ``n`` successes. ``successes`` may come from a SQL
    sum of 0/1 values; it is rounded to the nearest count.
    """
    if n < 1:
        raise ValueError(f"a proportion needs at least one value, got n = {n}")
    k = round(successes)
    if not 0 <= k <= n:
        raise ValueError(f"{successes} successes out of {n} is not a proportion")
    if n < 2:
        return MeanInterval(n=n, mean=k / n, low=None, high=None)
    p, low, high = _wilson(n, k, confidence)
    return MeanInterval(n=n, mean=p, low=low, high=high)


def _wilson(n: int, k: int, confidence: float) -> tuple[float, float, float]:
    """``k / n`` and its Wilson bounds, for ``n ≥ 1`` and ``0 ≤ k ≤ n``."""
    p = k / n
    z = _normal_quantile((1 + confidence) / 2)
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    # At 0 or n successes the bound on that side is exactly 0 or 1; rounding would leave ±1e-17.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return p, low, high


def paired_proportions_interval(
    both: int, first_only: int, second_only: int, neither: int, confidence: float = 0.95
) -> MeanInterval:
    """Newcombe's interval (1998, method 10) for ``p₁ − p₂`` of paired 0/1 scores (``None`` bounds for ``n < 2``).

    The counts are the paired 2 × 2 table: ``both`` (1, 1), ``first_only`` (1, 0), ``second_only``
    (0, 1), ``neither`` (0, 0). With ``(l₁, u₁)``, ``(l₂, u₂)`` the Wilson intervals of
    ``p₁ = (both + first_only)/n`` and ``p₂ = (both + second_only)/n`` and ``φ`` Newcombe's estimate
    of their correlation (``A = both · neither − first_only · second_only`` over the square root of the
    margins' product, with ``A − n/2`` for ``A > n/2``, 0 for ``0 ≤ A ≤ n/2`` and where a margin is
    empty), the bounds are ``Δ − √((p₁−l₁)² − 2φ(p₁−l₁)(u₂−p₂) + (u₂−p₂)²)``
    and ``Δ + √((u₁−p₁)² − 2φ(u₁−p₁)(p₂−l₂) + (p₂−l₂)²)``, ``Δ = p₁ − p₂``.
    """
    counts = (both, first_only, second_only, neither)
    if min(counts) < 0:
        raise ValueError(f"a paired table has no negative counts, got {counts}")
    n = sum(counts)
    if n < 1:
        raise ValueError("a paired table needs at least one pair")
    p1, low1, high1 = _wilson(n, both + first_only, confidence)
    p2, low2, high2 = _wilson(n, both + second_only, confidence)
    difference = p1 - p2
    if n < 2:
        return MeanInterval(n=n, mean=difference, low=None, high=None)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    association = both * neither - first_only * second_only
    phi = 0.0
    if margins and association > n / 2:
        phi = (association - n / 2) / math.sqrt(margins)
    elif margins and association < 0:
        phi = association / math.sqrt(margins)
    below_first, above_first = p1 - low1, high1 - p1
    below_second, above_second = p2 - low2, high2 - p2
    low = difference - math.sqrt(
        max(below_first**2 - 2 * phi * below_first * above_second + above_second**2, 0.0)
    )
    high = difference + math.sqrt(
        max(above_first**2 - 2 * phi * above_first * below_second + below_second**2, 0.0)
    )
    return MeanInterval(n=n, mean=difference, low=max(-1.0, low), high=min(1.0, high))


@dataclass(frozen=True)
class SignedRank:
    """Wilcoxon's signed-rank statistic of paired differences, zeros dropped (Wilcoxon's rule).

    ``n``: non-zero differences; ``r_plus``: the sum of the average ranks of ``|d|`` over the
    positive ones; ``tie_term``: ``Σ (t³ − t)`` over groups of ``t`` equal ``|d|``; ``ties``: whether
    any group has ``t > 1``; ``zeros``: whether any difference was zero (and dropped).
    """

    n: int
    r_plus: float
    tie_term: float
    ties: bool
    zeros: bool


def signed_rank(differences: Sequence[float]) -> SignedRank:
    """The statistic of a list of paired differences (tests and small lists; SQL ranks large ones)."""
    nonzero = sorted((abs(d), d > 0) for d in differences if d != 0)
    r_plus = tie_term = 0.0
    start = 0
    while start < len(nonzero):
        stop = start
        while stop < len(nonzero) and nonzero[stop][0] == nonzero[start][0]:
            stop += 1
        t = stop - start
        rank = (start + 1 + stop) / 2  # the average of ranks start + 1 … stop
        r_plus += rank * sum(positive for _, positive in nonzero[start:stop])
        tie_term += t**3 - t
        start = stop
    return SignedRank(
        n=len(nonzero),
        r_plus=r_plus,
        tie_term=tie_term,
        ties=tie_term > 0,
        zeros=len(nonzero) < len(differences),
    )


def signed_rank_p(statistic: SignedRank) -> float | None:
    """Two-sided p value of the signed-rank test; ``None`` when every difference is zero.

    Exact (``2 · min(P(W⁺ ≤ w), P(W⁺ ≥ w))``, at most 1) for ``n ≤ EXACT_SIGNED_RANK_LIMIT`` without
    ties or zeros; otherwise ``2 · Φ(−|z|)`` with ``z = (W⁺ − n(n+1)/4) / σ`` and
    ``σ² = n(n+1)(2n+1)/24 − Σ(t³ − t)/48``.
    """
    n = statistic.n
    if n == 0:
        return None
    if n <= EXACT_SIGNED_RANK_LIMIT and not (statistic.ties or statistic.zeros):
        counts = _signed_rank_counts(n)
        w = statistic.r_plus
        below = sum(counts[: math.ceil(w) + 1])
        above = sum(counts[math.floor(w) :])
        return min(1.0, 2 * min(below, above) / 2**n)
    variance = n * (n + 1) * (2 * n + 1) / 24 - statistic.tie_term / 48
    if variance <= 0:
        return None
    z = (statistic.r_plus - n * (n + 1) / 4) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2))


@functools.cache
def _signed_rank_counts(n: int) -> tuple[int, ...]:
    """How many of the ``2ⁿ`` sign patterns of ranks ``1 … n`` give each ``W⁺ = 0 … n(n+1)/2``.

    Cached: a ``compare`` asks for the same few ``n`` once per method × metric.
    """
    counts = [1]
    for rank in range(1, n + 1):
        grown = counts + [0] * rank
        for w, ways in enumerate(counts):
            grown[w + rank] += ways
        counts = grown
    return tuple(counts)
