"""The verdicts of the paper's claim, on inputs built here (other shapes, seeds and values than
the command's embedded cases): L2 overflows in native fp16 once deviations pass 256 while L1 and
L-inf do not; a constant channel with eps=1e-12 gives non-finite fp16 output; a large mean over a
small spread loses bits in native low precision for every norm; N(0, 1) is fine everywhere."""

import pytest

from normbench.numerics.cases import Case
from normbench.numerics.runner import StabilitySpec, cells, iter_records


def measure(case: Case, **spec_args) -> dict[tuple[str, str, str], dict]:
    spec = StabilitySpec(**spec_args)
    records = list(iter_records(spec, grid=cells(spec, cases=[case])))
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records if r["status"] != "ok"]
    return {(r["norm"], r["dtype"], r["compute"]): r for r in records}


@pytest.mark.parametrize("case", [
    Case("deviation", (("value", 300.0), ("spread", 20.0)), (8, 3, 96), seed=5),
    Case("gauss", (("scale", 150.0),), (8, 3, 96), seed=6),  # |x - mu| reaches ~600
])
def test_l2_overflows_in_native_fp16_above_256_and_l1_linf_do_not(case):
    res = measure(case, norms=("l2", "l1", "linf"), dtypes=("fp16",), computes=("native",))
    l2 = res[("l2", "fp16", "native")]
    assert l2["overflow"] and l2["overflow_stage"] == "statistic"
    assert not l2["safe"]
    for norm in ("l1", "linf"):
        r = res[(norm, "fp16", "native")]
        assert not r["overflow"] and r["nonfinite_fraction"] == 0 and r["grad_nonfinite_fraction"] == 0
        assert r["err_ulps"] < 4 and r["grad_err_ulps"] < 16
        assert r["safe"]


def test_deviations_just_below_256_are_fine_for_l2():
    case = Case("deviation", (("value", 240.0), ("spread", 20.0)), (8, 3, 96), seed=5)
    r = measure(case, norms=("l2",), dtypes=("fp16",), computes=("native",))[("l2", "fp16", "native")]
    assert not r["overflow"] and r["safe"]


def test_constant_channel_with_eps_1e12_gives_nonfinite_fp16_output():
    case = Case("constant", (("value", 3.0),), (5, 3, 32))
    res = measure(case, norms=("l2", "l1", "linf"), dtypes=("fp16",), computes=("native",), eps=1e-12)
    for norm in ("l2", "l1", "linf"):
        r = res[(norm, "fp16", "native")]
        assert r["eps_in_dtype"] == 0.0  # 1e-12 rounds to zero in fp16 ...
        assert r["nonfinite_fraction"] > 0  # ... so 0 / 0
        assert not r["safe"]
    # with eps = 1e-3 (representable in fp16) the same channel normalizes to zeros
    ok = measure(case, norms=("l2",), dtypes=("fp16",), computes=("native",), eps=1e-3)[("l2", "fp16", "native")]
    assert ok["nonfinite_fraction"] == 0 and ok["max_rel_err"] == 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_large_mean_over_small_spread_loses_bits_in_native_for_every_norm(dtype):
    case = Case("offset", (("mean", 60.0), ("ratio", 300.0)), (16, 3, 64), seed=9)
    gauss = Case("gauss", (("scale", 1.0),), (16, 3, 64), seed=9)
    norms = ("l2", "l1", "linf", "top4", "layernorm")
    res = measure(case, norms=norms, dtypes=(dtype,))
    base = measure(gauss, norms=norms, dtypes=(dtype,), computes=("native",))
    for norm in norms:
        native, framework = res[(norm, dtype, "native")], res[(norm, dtype, "framework")]
        clean = base[(norm, dtype, "native")]
        # native loses at least 3 bits against both its own N(0, 1) accuracy and the framework's
        assert native["err_ulps"] > 8 * clean["err_ulps"], (norm, native["err_ulps"], clean["err_ulps"])
        assert native["err_ulps"] > 8 * framework["err_ulps"], (norm, native["err_ulps"], framework["err_ulps"])
        assert native["bits_of_agreement"] < clean["bits_of_agreement"] - 3


def test_standard_normal_input_is_fine_everywhere():
    case = Case("gauss", (("scale", 1.0),), (12, 5, 40), seed=21)
    norms = ("l2", "l1", "linf", "top5", "layernorm", "l1-rmsnorm", "linf-groupnorm")
    res = measure(case, norms=norms)
    assert len(res) == len(norms) * 5 * 2
    for key, r in res.items():
        assert r["safe"], (key, r["err_ulps"], r["grad_err_ulps"], r["overflow_stage"])
        assert r["err_ulps"] < 4 and r["grad_err_ulps"] < 8, key
