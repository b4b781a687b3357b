"""The statistics of ``producer compare``, computed without scipy: the t interval against textbook
values, the Wilson interval and Wilcoxon's signed-rank test against ``scipy.stats``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats  # the independent reference; the producer computes without it

from common.stats import (
    SignedRank,
    interval_from_moments,
    mean_interval,
    paired_proportions_interval,
    signed_rank,
    signed_rank_p,
    student_t_cdf_two_sided,
    t_quantile,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("df", "quantile"),
    [
        (1, 12.7062),
        (2, 4.3027),
        (3, 3.1824),
        (5, 2.5706),
        (10, 2.2281),
        (30, 2.0423),
        (120, 1.9799),
        (10**6, 1.96),
    ],
)
def test_t_quantiles_match_the_tables(df: int, quantile: float) -> None:
    assert t_quantile(0.95, df) == pytest.approx(quantile, abs=1e-4)


def test_the_cdf_is_the_two_sided_probability() -> None:
    assert student_t_cdf_two_sided(0.0, 7) == 0.0
    assert student_t_cdf_two_sided(1.0, 1) == pytest.approx(0.5)  # Cauchy: atan(1) · 2 / π
    assert student_t_cdf_two_sided(t_quantile(0.99, 9), 9) == pytest.approx(0.99)


def test_mean_interval() -> None:
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.1824 * math.sqrt(5 / 3) / 2
    assert interval.mean == 2.5
    assert interval.low == pytest.approx(2.5 - half, abs=1e-3)
    assert interval.high == pytest.approx(2.5 + half, abs=1e-3)
    assert mean_interval([0.7]).low is None
    assert interval_from_moments(1, 0.7, 0.0).high is None


@pytest.mark.parametrize("n", [1, 2, 5, 13, 24, 32, 50])
def test_signed_rank_p_is_scipys_exact_test_without_ties_or_zeros(n: int) -> None:
    rng = np.random.default_rng(n)
    for shift in (0.0, 0.4, 1.5):
        d = rng.normal(shift, 1.0, n)
        statistic = signed_rank(d.tolist())
        assert (statistic.ties, statistic.zeros, statistic.n) == (False, False, n)
        expected = scipy_stats.wilcoxon(d, method="exact").pvalue
        assert signed_rank_p(statistic) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "d",
    [
        np.random.default_rng(1).normal(0.2, 1.0, 51),  # past the exact limit
        np.round(np.random.default_rng(2).normal(0.3, 1.0, 40), 1),  # ties and zeros
        np.array([1.0, -1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),  # 0/1 hits
        np.array([0.5, 0.5, 0.5, 0.25, -0.25, 0.75]),  # ties only
    ],
)
def test_signed_rank_p_is_scipys_normal_approximation_otherwise(d: np.ndarray) -> None:
    expected = scipy_stats.wilcoxon(d, method="asymptotic", correction=False).pvalue
    assert signed_rank_p(signed_rank(d.tolist())) == pytest.approx(expected, rel=1e-12)


def test_signed_rank_statistic_drops_zeros_and_averages_tied_ranks() -> None:
    # |d| = 1, 2, 2, 3 once the zeros are dropped: ranks 1, 2.5, 2.5, 4; the positive ones are 2 and 3.
    statistic = signed_rank([0.0, 2.0, -1.0, 3.0, 0.0, -2.0])
    assert statistic == SignedRank(n=4, r_plus=2.5 + 4, tie_term=6.0, ties=True, zeros=True)
    assert signed_rank_p(signed_rank([0.0, 0.0])) is None
    assert signed_rank_p(signed_rank([5.0])) == 1.0  # one sign out of two patterns: p = 2 · 1/2


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (10, 10), (29, 32), (3, 7), (1, 2), (500, 1000)])
def test_wilson_interval_is_scipys_and_stays_inside_zero_one(successes: int, n: int) -> None:
    interval = wilson_interval(n, successes)
    expected = scipy_stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), rel=1e-12, abs=1e-15)
    assert 0.0 <= interval.low <= interval.mean <= interval.high <= 1.0
    assert interval.high - interval.low > 0  # even at 0 or n hits, where a t interval has no width


def test_wilson_interval_refuses_what_is_not_a_proportion() -> None:
    assert wilson_interval(1, 1).low is None
    with pytest.raises(ValueError, match="at least one value"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="11 successes out of 10"):
        wilson_interval(10, 11)


def test_paired_proportions_interval_is_newcombes() -> None:
    """Fagerland, Lydersen & Laake, *Statistical Analysis of Contingency Tables* (2017), ch. 8: complete
    response before and after consolidation therapy (Cavo et al., 2012), Newcombe square-and-add
    −0.0621 (95 % CI −0.1186 to −0.0046)."""
    interval = paired_proportions_interval(59, 6, 16, 80)
    assert interval.mean == pytest.approx(-0.0621, abs=5e-5)
    assert (interval.low, interval.high) == pytest.approx((-0.1186, -0.0046), abs=5e-5)


@pytest.mark.parametrize(
    "table",
    [(0, 31, 0, 1), (0, 32, 0, 0), (0, 0, 32, 0), (10, 0, 0, 10), (30, 1, 0, 1), (3, 4, 5, 6), (0, 1, 0, 1)],
)
def test_paired_proportions_interval_stays_inside_minus_one_one(table: tuple[int, int, int, int]) -> None:
    """Where the t interval of the ±1/0 differences runs past ±1 or has no width, this one does neither."""
    interval = paired_proportions_interval(*table)
    assert interval.low is not None
    assert interval.high is not None
    assert -1.0 <= interval.low <= interval.mean <= interval.high <= 1.0
    assert interval.high - interval.low > 0
    assert interval.mean == pytest.approx((table[1] - table[2]) / sum(table))


def test_paired_proportions_interval_refuses_what_is_not_a_table() -> None:
    assert paired_proportions_interval(1, 0, 0, 0).low is None
    with pytest.raises(ValueError, match="at least one pair"):
        paired_proportions_interval(0, 0, 0, 0)
    with pytest.raises(ValueError, match="no negative counts"):
        paired_proportions_interval(1, -1, 0, 0)
