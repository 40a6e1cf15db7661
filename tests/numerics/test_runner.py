"""The runner: records carry the documented fields (docs/stability.md); a cell that cannot run is skipped and the run
goes on; skip() resumes; bad specs are user errors."""

import pytest

from normbench.errors import UserError
from normbench.numerics import StabilitySpec, cells, run
from normbench.numerics.runner import KEY_FIELDS

FIELDS = ("norm", "impl", "dtype", "compute", "case", "status", "reason", "nonfinite_fraction", "overflow",
          "underflow_fraction", "max_rel_err", "median_rel_err", "err_ulps", "bits_of_agreement", "grad_nonfinite_fraction",
          "grad_overflow", "grad_underflow_fraction", "grad_max_rel_err", "grad_median_rel_err", "grad_err_ulps",
          "grad_bits_of_agreement", "overflow_stage", "input_overflow", "input_underflow_fraction")


def test_records_and_skips():
    spec = StabilitySpec(norms=("l2", "top8"), dtypes=("fp16",), cases=("tiny", "deviation"), quick=True)
    seen = []
    records = run(spec, on_record=seen.append)
    assert seen == records and len(records) == len(cells(spec)) == 3 * 2 * 2
    for r in records:
        if r["status"] == "ok":
            assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
    tiny_top8 = [r for r in records if r["norm"] == "top8" and r["case"]["name"] == "tiny"]
    assert tiny_top8 and all(r["status"] == "skipped" and "top-8" in r["reason"] for r in tiny_top8)
    assert sum(r["status"] == "ok" for r in records) == 10  # 12 cells, top8 on tiny twice skipped


def test_skip_resumes():
    spec = StabilitySpec(norms=("l1",), dtypes=("bf16",), cases=("tiny",), quick=True)
    first = run(spec)
    done = {tuple(str(r[f]) for f in KEY_FIELDS) for r in first}
    again = run(spec, skip=lambda axes: tuple(str(axes[f]) for f in KEY_FIELDS) in done)
    assert again == []


def test_fp8_runs_in_the_chosen_compute_dtype():
    spec = StabilitySpec(norms=("l2",), dtypes=("fp8_e4m3",), cases=("tiny",), quick=True, fp8_compute="bf16")
    records = run(spec)
    assert {r["compute_dtype"] for r in records} == {"bf16"}
    assert all(r["status"] == "ok" for r in records)


@pytest.mark.parametrize("bad", [
    dict(norms=("l3",)), dict(dtypes=("fp64",)), dict(computes=("gpu",)), dict(reductions=("random",)),
    dict(cases=("nope",)), dict(eps=float("nan")), dict(fp8_compute="fp8_e4m3"),
])
def test_bad_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        StabilitySpec(**bad)


def test_torch_layers_for_l2_norms_only():
    spec = StabilitySpec(norms=("l2", "l1", "layernorm"), dtypes=("fp16",), computes=("framework",),
                         impls=("normbench", "torch"), cases=("deviation",), quick=True)
    records = run(spec)
    impls = {(r["norm"], r["impl"]) for r in records}
    assert impls == {("l2", "normbench"), ("l2", "torch"), ("l1", "normbench"), ("layernorm", "normbench"),
                     ("layernorm", "torch")}
    assert all(r["status"] == "ok" for r in records)
    # torch's own layer and normbench's L2 (identical formula, float32 statistics) agree to rounding
    for case_value in (250.0, 260.0):
        pair = {r["impl"]: r for r in records if r["norm"] == "l2" and r["case"]["value"] == case_value}
        assert abs(pair["torch"]["max_rel_err"] - pair["normbench"]["max_rel_err"]) < 2 * 2.0**-10
        assert not pair["torch"]["overflow"]  # float32 statistics: no fp16 squares to overflow


def test_saturated_fp8_e4m3_gradient_counts_as_overflow():
    """e4m3 has no infinity (torch's cast clamps to 448): a constant channel's L1 gradient,
    ~dy / eps, is clamped, not inf, and must still be reported as an overflow."""
    spec = StabilitySpec(norms=("l1",), dtypes=("fp8_e4m3",), computes=("framework",), cases=("constant",),
                         quick=True)
    (r,) = run(spec)
    assert r["grad_nonfinite_fraction"] == 0  # nothing non-finite: the cast saturated ...
    assert r["grad_overflow"] and r["grad_overflow_stage"] == "backward"  # ... and it is still an overflow
    assert not r["safe"]


def test_shape_replaces_the_generated_cases_shape():
    spec = StabilitySpec(norms=("l2", "groupnorm"), dtypes=("bf16",), computes=("native",), cases=("gauss", "tiny"),
                         quick=True, shape=(4, 32, 3, 3))
    records = run(spec)
    shapes = {r["case"]["name"]: r["shape"] for r in records}
    assert shapes == {"gauss": "4x32x3x3", "tiny": "2x4x2"}
    n = {(r["norm"], r["case"]["name"]): r["n"] for r in records if r["status"] == "ok"}
    assert n[("l2", "gauss")] == 4 * 9 and n[("groupnorm", "gauss")] == 32 * 9 // 32
