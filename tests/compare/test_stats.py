"""The interval behind the profile verdict: Mann-Whitney quantiles and the Hodges-Lehmann
interval of the ratio, checked against known values and by simulation (coverage, false
positives on samples of one distribution)."""

from __future__ import annotations

import math
import random

import pytest

from compare.synthetic import times
from normbench.compare import stats
from normbench.compare.profile import verdict
from normbench.compare.stats import mean_std, ratio_interval, ratio_of_medians, u_lower_quantile


def test_u_counts_are_the_mann_whitney_distribution():
    assert stats._u_counts(3, 3) == (1, 1, 2, 3, 3, 3, 3, 2, 1, 1)
    for n, m in ((4, 9), (7, 7), (12, 5)):
        counts = stats._u_counts(n, m)
        assert len(counts) == n * m + 1 and sum(counts) == math.comb(n + m, n)
        assert counts == counts[::-1]  # symmetric about n*m/2


def test_quantiles_match_published_critical_values():
    # two-sided 5 % critical values of U: 8 for 7 and 7, 23 for 10 and 10 (P(U <= c) <= 2.5 %),
    # so the smallest u with P(U <= u) >= 2.5 % is one more
    assert u_lower_quantile(7, 7, 0.025) == 9
    assert u_lower_quantile(10, 10, 0.025) == 24
    assert u_lower_quantile(3, 3, 0.025) == 0  # 1/20 = 5 %: no 95 % interval from 3 and 3


def test_normal_approximation_agrees_with_the_exact_quantile(monkeypatch):
    exact = u_lower_quantile(50, 50, 0.025)
    monkeypatch.setattr(stats, "EXACT_LIMIT", 0)
    assert abs(u_lower_quantile(50, 50, 0.025) - exact) <= 1


def test_interval_brackets_a_known_ratio_and_is_unbounded_for_tiny_samples():
    base = times(1, n=20, sigma=0.01)
    new = [1.3 * t for t in times(2, n=20, sigma=0.01)]
    low, high = ratio_interval(base, new)
    assert 1.28 < low < 1.3 < high < 1.32
    assert ratio_of_medians(base, new) == pytest.approx(1.3, rel=0.01)
    assert ratio_interval(base[:3], new[:3]) == (0.0, math.inf)
    assert ratio_interval([], new) == (0.0, math.inf)


def test_identical_samples_give_an_interval_symmetric_about_one():
    for n, sigma in ((7, 0.3), (25, 0.05), (120, 0.1)):
        sample = times(n, n=n, sigma=sigma)
        low, high = ratio_interval(sample, sample)
        assert low <= 1 <= high and low * high == pytest.approx(1.0)
        assert verdict(low, high, 0.05) in ("same", "unsure")


def _simulate(trials: int, n: int, sigma: float, seed: int) -> tuple[float, float]:
    """(coverage of the true ratio 1, rate of slower or faster verdicts at 5 %) over ``trials``
    pairs of samples of one log-normal distribution."""
    rng = random.Random(seed)
    covered = moved = 0
    for _ in range(trials):
        a = [math.exp(rng.gauss(0, sigma)) for _ in range(n)]
        b = [math.exp(rng.gauss(0, sigma)) for _ in range(n)]
        low, high = ratio_interval(a, b)
        covered += low <= 1 <= high
        moved += verdict(low, high, 0.05) in ("slower", "faster")
    return covered / trials, moved / trials


@pytest.mark.parametrize("n, sigma", [(7, 0.05), (10, 0.2), (40, 0.05)])
def test_coverage_and_false_positives_on_one_distribution(n, sigma):
    coverage, false_positive = _simulate(400, n, sigma, seed=n)
    assert 0.92 <= coverage <= 0.99  # a 95 % interval, exact: not too narrow, not vacuous
    assert false_positive <= 0.025  # the documented bound: the interval must clear the threshold too


def test_mean_std():
    assert mean_std([]) == (None, None)
    assert mean_std([2.0]) == (2.0, None)
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
