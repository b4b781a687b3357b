"""The t interval of ``producer compare``, computed without scipy, against textbook values."""

from __future__ import annotations

import math

import pytest

from common.stats import interval_from_moments, mean_interval, student_t_cdf_two_sided, t_quantile


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
