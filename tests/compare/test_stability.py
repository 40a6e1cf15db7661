"""Stability verdicts: safety flips both ways, overflow appearing and disappearing, error ratios."""

from __future__ import annotations

import math

import pytest

from compare.synthetic import stability_record
from normbench.compare.stability import error_ratio, judge


def test_safe_to_unsafe_is_unstable_and_back_is_stabler():
    safe = stability_record(safe=True, err_ulps=2.0)
    unsafe = stability_record(safe=False, err_ulps=2.0)
    row = judge(safe, unsafe)
    assert row["verdict"] == "unstable" and "safe -> unsafe" in row["changes"]
    assert (row["base_safe"], row["new_safe"]) == (True, False)
    back = judge(unsafe, safe)
    assert back["verdict"] == "stabler" and back["changes"] == ["unsafe -> safe"]
    assert row["moved"] > 100 and back["moved"] > 100  # flips sort before any error ratio


def test_overflow_appearing_and_disappearing():
    fine = stability_record()
    over = stability_record(overflow=True, safe=False, err_ulps=None, grad_err_ulps=None, nonfinite_fraction=0.5)
    row = judge(fine, over)
    assert row["verdict"] == "unstable"
    assert {"overflow appears", "non-finite values appear", "safe -> unsafe"} <= set(row["changes"])
    assert row["err_ratio"] is None  # a non-finite output has no error
    assert judge(over, fine)["verdict"] == "stabler"


def test_error_ratios_in_ulps():
    base = stability_record(err_ulps=2.0, grad_err_ulps=4.0)
    assert judge(base, stability_record(err_ulps=8.0, grad_err_ulps=4.0))["verdict"] == "worse"
    better = judge(base, stability_record(err_ulps=0.5, grad_err_ulps=1.0))
    assert better["verdict"] == "better" and better["err_ratio"] == 0.25 and better["grad_err_ratio"] == 0.25
    same = judge(base, stability_record(err_ulps=3.0, grad_err_ulps=5.0))
    assert same["verdict"] == "same" and same["err_ratio"] == 1.5 and same["changes"] == []
    assert judge(base, base)["verdict"] == "same"


def test_worse_outranks_a_fixed_overflow():
    base = stability_record(overflow=True, safe=False, err_ulps=1.0)
    row = judge(base, stability_record(overflow=False, safe=False, err_ulps=10.0))
    assert row["verdict"] == "worse" and "overflow disappears" in row["changes"]


def test_error_ratio_edges():
    assert error_ratio(0.0, 0.0) == 1.0
    assert math.isinf(error_ratio(0.0, 3.0))
    assert error_ratio(None, 3.0) is None and error_ratio(2.0, float("nan")) is None
    assert error_ratio(2.0, 1.0) == pytest.approx(0.5)
    row = judge(stability_record(err_ulps=0.0), stability_record(err_ulps=3.0))
    assert row["verdict"] == "worse" and row["err_ratio"] is None and "error 0 -> 3 ulps" in row["changes"]
