"""Profile verdicts on synthetic samples with a known answer: same distribution, 10 % slower,
2x faster, too noisy to tell; records without raw times."""

from __future__ import annotations

import pytest

from compare.synthetic import profile_record, times
from normbench.compare.profile import NO_TIMES_NOTE, NO_TORCH_NOTE, judge, verdict


@pytest.mark.parametrize("low, high, expected", [
    (1.06, 1.2, "slower"), (0.5, 0.9, "faster"), (0.97, 1.04, "same"), (1 / 1.05, 1.05, "same"),
    (1.01, 1.2, "unsure"), (0.8, 1.01, "unsure"), (0.0, float("inf"), "unsure"),
])
def test_verdict_of_an_interval(low, high, expected):
    assert verdict(low, high, 0.05) == expected


def judged(base_samples, new_samples, threshold=0.05):
    return judge(profile_record(samples=base_samples), profile_record(samples=new_samples), threshold)


def test_same_distribution_is_same():
    row = judged(times(1, n=40, sigma=0.02), times(101, n=40, sigma=0.02))
    assert row["verdict"] == "same"
    assert row["ci_low"] < 1 < row["ci_high"] and 0.98 < row["ratio"] < 1.02


def test_ten_percent_slower_is_slower():
    row = judged(times(3, n=30, sigma=0.02), [1.10 * t for t in times(4, n=30, sigma=0.02)])
    assert row["verdict"] == "slower"
    assert 1.05 < row["ci_low"] < 1.10 < row["ci_high"] < 1.15
    assert row["ratio"] == pytest.approx(1.10, rel=0.02)


def test_twice_as_fast_is_faster():
    row = judged(times(5, n=10, sigma=0.05), [0.5 * t for t in times(6, n=10, sigma=0.05)])
    assert row["verdict"] == "faster" and row["ci_high"] < 0.6 and row["ratio"] == pytest.approx(0.5, rel=0.1)


def test_too_noisy_to_tell_is_unsure():
    row = judged(times(7, n=7, sigma=0.5), [1.10 * t for t in times(107, n=7, sigma=0.5)])
    assert row["verdict"] == "unsure" and row["ci_low"] < 1.05 < row["ci_high"]


def test_a_threshold_wider_than_the_change_calls_it_same():
    row = judged(times(3, n=30, sigma=0.02), [1.10 * t for t in times(4, n=30, sigma=0.02)], threshold=0.25)
    assert row["verdict"] == "same"


def test_too_few_repeats_for_an_interval_is_unsure_with_a_note():
    row = judged(times(1, n=3), [2 * t for t in times(2, n=3)])
    assert row["verdict"] == "unsure" and row["ci_low"] is None and "too few repeats" in row["note"]


def test_old_records_without_raw_times_compare_by_medians_and_are_unsure():
    base = profile_record(samples=times(1), raw=False)
    new = profile_record(samples=[2 * t for t in times(2)])
    row = judge(base, new, 0.05)
    assert row["verdict"] == "unsure" and row["note"] == NO_TIMES_NOTE
    assert row["ratio"] == pytest.approx(new["time_median_s"] / base["time_median_s"])
    assert row["ci_low"] is None and row["ci_high"] is None


def drifting(seed, n=30, cand=2e-3, drift=1.0):
    """(candidate times, torch times) of ``n`` rounds on a machine whose speed wanders from round
    to round (a common factor of up to 2x, times ``drift``), each term with 2 % noise of its own."""
    import math
    import random

    rng = random.Random(seed)
    factors = [drift * math.exp(rng.uniform(0, math.log(2))) for _ in range(n)]
    own = times(seed + 1000, n=2 * n, sigma=0.02, scale=1.0)
    return [cand * f * e for f, e in zip(factors, own[:n])], [1e-3 * f * e for f, e in zip(factors, own[n:])]


def test_vs_torch_cancels_the_drift_of_a_shared_machine():
    bt, btorch = drifting(1)
    nt, ntorch = drifting(2, drift=1.5)  # NEW ran while the machine was 1.5x slower: the code is the same
    base = profile_record(samples=bt, torch_times_s=btorch)
    new = profile_record(samples=nt, torch_times_s=ntorch)
    assert judge(base, new, 0.05)["verdict"] == "slower"  # plain times: the drift looks like a regression
    row = judge(base, new, 0.05, vs_torch=True)
    assert row["verdict"] == "same" and row["base_vs_torch"] == pytest.approx(2.0, rel=0.03)
    slower = profile_record(samples=[1.2 * t for t in nt], torch_times_s=ntorch)
    row = judge(base, slower, 0.05, vs_torch=True)
    assert row["verdict"] == "slower" and row["ratio"] == pytest.approx(1.2, rel=0.03)


def test_vs_torch_needs_torch_times_and_skips_torch_itself():
    base = profile_record(samples=times(1))
    assert judge(base, base, 0.05, vs_torch=True)["note"] == NO_TORCH_NOTE
    torch_cell = profile_record(impl="torch", samples=times(1))
    assert judge(torch_cell, torch_cell, 0.05, vs_torch=True)["verdict"] == "skipped"
    mismatched = profile_record(samples=times(1, n=10), torch_times_s=times(2, n=9))
    assert judge(mismatched, mismatched, 0.05, vs_torch=True)["verdict"] == "unsure"
