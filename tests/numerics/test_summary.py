"""Safe ranges from sweeps, analytic thresholds, --fail-on decisions."""

import math

import pytest

from normbench.numerics.summary import analytic_bounds, fails_threshold, safe_range, summarize


def sweep(flags):
    return [{"status": "ok", "case": {"name": "gauss", "scale": 10.0**e, "shape": [4, 2, 8]}, "safe": ok}
            for e, ok in flags]


def test_safe_range_is_the_run_around_scale_one():
    r = safe_range(sweep([(-4, False), (-3, True), (-2, True), (0, True), (2, True), (3, False), (5, True)]))
    assert (r["lo"], r["hi"], r["lo_open"], r["hi_open"]) == (1e-3, 1e2, False, False)
    open_both = safe_range(sweep([(-2, True), (0, True), (2, True)]))
    assert open_both["lo_open"] and open_both["hi_open"]
    # scale 1 itself unsafe: the longest run
    r = safe_range(sweep([(-6, True), (-5, True), (-4, True), (0, False), (3, True)]))
    assert (r["lo"], r["hi"]) == (1e-6, 1e-4)
    assert safe_range(sweep([(0, False)]))["lo"] is None


def test_analytic_fp16_l2_squares_bound_is_256():
    a = analytic_bounds("l2", "fp16", "native", "pairwise", n=4096, numel=4096, eps=1e-5, compute_dtype="fp16")
    z = a["hi"] * 0 + 1
    assert "squares" in a["hi_reason"]
    # the bound on the deviation is sqrt(65520) ~ 256, turned into a scale by E[max |z|] over 4096 values
    from normbench.numerics.cases import expected_max_deviation

    assert a["hi"] * expected_max_deviation(4096) == pytest.approx(math.sqrt(65520) * z)
    l1 = analytic_bounds("l1", "fp16", "native", "pairwise", 4096, 4096, 1e-5, "fp16")
    assert l1["hi"] > 200 * a["hi"]  # L1 is limited by the fp16 range itself, not by squares
    seq = analytic_bounds("l1", "fp16", "native", "sequential", 4096, 4096, 1e-5, "fp16")
    assert seq["hi"] < l1["hi"] and "sum" in seq["hi_reason"]
    fw = analytic_bounds("l2", "fp16", "framework", None, 4096, 4096, 1e-5, "fp16")
    assert "fp16 max" in fw["hi_reason"]  # float32 statistics: only the input range binds


def test_eps_rounding_to_zero_is_reported():
    assert analytic_bounds("l2", "fp16", "native", "pairwise", 64, 64, 1e-12, "fp16")["eps_rounds_to_zero"]
    assert not analytic_bounds("l2", "fp16", "native", "pairwise", 64, 64, 1e-5, "fp16")["eps_rounds_to_zero"]
    assert not analytic_bounds("l2", "bf16", "native", "pairwise", 64, 64, 1e-12, "bf16")["eps_rounds_to_zero"]


def test_fails_threshold():
    ok = {"status": "ok", "overflow": False, "grad_overflow": False, "nonfinite_fraction": 0,
          "grad_nonfinite_fraction": 0, "err_ulps": 3.0, "grad_err_ulps": 70.0}
    assert not fails_threshold(ok, overflow=True, max_ulps=None)
    assert fails_threshold(ok, overflow=False, max_ulps=64)
    assert not fails_threshold(ok, overflow=False, max_ulps=100)
    assert fails_threshold({**ok, "grad_nonfinite_fraction": 0.5}, overflow=True, max_ulps=None)
    assert not fails_threshold({"status": "skipped"}, overflow=True, max_ulps=1)


def test_summarize_groups_and_lists_failures():
    base = {"norm": "l2", "dtype": "fp16", "compute": "native", "compute_dtype": "fp16", "reduction": "pairwise",
            "eps": 1e-5, "status": "ok", "n": 64, "tolerance": 0.0078}
    recs = [
        {**base, "case": {"name": "gauss", "scale": 1.0, "shape": [4, 2, 32]}, "safe": True, "err_ulps": 0.5},
        {**base, "case": {"name": "deviation", "value": 260.0, "spread": 8.0, "shape": [4, 2, 32]}, "safe": False,
         "overflow": True, "overflow_stage": "statistic", "err_ulps": 1024.0},
        {**base, "case": {"name": "tiny", "shape": [2, 2, 2]}, "status": "skipped", "reason": "x"},
    ]
    (row,) = summarize(recs)
    assert row["measured"]["lo"] == 1.0 and row["skipped"] == 1
    assert row["worst_err_ulps"] == 1024.0
    assert row["failed_cases"][0]["short"] == "deviation(260) ovf@statistic"


def test_fail_on_error_counts_cells_whose_error_is_unbounded():
    """A non-finite output or gradient has no error in ulps (err_ulps None): error:N fails it, as
    it fails a cell with any non-finite value; a cell that ended in an error fails every
    --fail-on, a skipped one none."""
    all_nan = {"status": "ok", "overflow": False, "grad_overflow": False, "nonfinite_fraction": 1.0,
               "grad_nonfinite_fraction": 1.0, "err_ulps": None, "grad_err_ulps": None}
    assert fails_threshold(all_nan, overflow=False, max_ulps=64)
    grad_nan = {**all_nan, "nonfinite_fraction": 0.0, "err_ulps": 0.0}
    assert fails_threshold(grad_nan, overflow=False, max_ulps=1e30)
    partly = {**all_nan, "nonfinite_fraction": 0.25, "err_ulps": 1.0, "grad_nonfinite_fraction": 0.0,
              "grad_err_ulps": 1.0}
    assert fails_threshold(partly, overflow=False, max_ulps=64)
    # no row measured although nothing is counted non-finite (the reference was not finite): unbounded too
    assert fails_threshold({**grad_nan, "grad_nonfinite_fraction": 0.0}, overflow=False, max_ulps=64)
    error = {"status": "error", "reason": "RuntimeError: boom"}
    assert fails_threshold(error, overflow=True, max_ulps=None)
    assert fails_threshold(error, overflow=False, max_ulps=64)
    assert not fails_threshold(error, overflow=False, max_ulps=None)
    assert not fails_threshold({"status": "skipped", "reason": "x"}, overflow=True, max_ulps=64)


def test_a_sweep_of_skipped_cells_has_no_analytic_range():
    """top-10 on a 2x3 shape (2 values per channel): every sweep cell is skipped; the summary has
    no layer to bound (the analytic bounds used to raise from the top-k constant)."""
    recs = [{"norm": "top10", "impl": "normbench", "dtype": "fp16", "compute": "framework", "compute_dtype": "fp16",
             "reduction": None, "eps": 1e-5, "status": "skipped", "reason": "top-10 needs at least 10 values",
             "case": {"name": "gauss", "scale": s, "shape": [2, 3], "seed": 0}} for s in (0.1, 1.0, 10.0)]
    (row,) = summarize(recs)
    assert row["analytic"] is None and row["measured"]["scales"] == 0 and row["skipped"] == 3
