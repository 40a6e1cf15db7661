"""Rounding to each format: the independent bit-level rounding and the cast-based one agree with
torch's casts on every representable value of a small grid, its midpoints and its neighbours."""

import math

import pytest
import torch

from normbench.numerics.formats import FORMATS, Format, get_format, representable_values, round_to_bits

SMALL = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def _grid(fmt: Format) -> torch.Tensor:
    """Every representable value from the subnormals up to 2^4 (and up to max for fp8), the
    midpoints between neighbours (ties), the quarter points, and values beyond the largest one."""
    hi = None if fmt.name.startswith("fp8") else 4
    v = representable_values(fmt, max_exp=hi)
    mids = (v[1:] + v[:-1]) / 2
    gaps = v[1:] - v[:-1]
    beside = torch.cat([mids + gaps / 4, mids - gaps / 4])
    top = fmt.max_value
    quarter = (fmt.overflow_threshold - top) / 2  # a quarter of the top gap
    beyond = torch.tensor([top, top + quarter, fmt.overflow_threshold, fmt.overflow_threshold + quarter, 2 * top, math.inf],
                          dtype=torch.float64)
    g = torch.cat([v, mids, beside, beyond])
    return torch.cat([g, -g])


@pytest.mark.parametrize("name", SMALL)
def test_bit_rounding_matches_torch_cast(name):
    fmt = FORMATS[name]
    x = _grid(fmt)
    expected = x.to(fmt.dtype).to(torch.float64)
    got = round_to_bits(x, fmt)
    assert torch.equal(got, expected), (x[got != expected][:5], got[got != expected][:5], expected[got != expected][:5])


def test_torch_cast_from_float64_rounds_twice():
    """torch casts float64 to the small formats through float32: a value a hair above a tie
    (closer than float32 resolves) rounds as the tie does. round_to_bits rounds once, correctly.
    The emulator's arithmetic is unaffected (single operations on format values never land that
    close to a tie unless exactly on it), but this is why the grid above avoids such points."""
    fmt = FORMATS["fp16"]
    tie = torch.tensor([1 + 2.0**-11], dtype=torch.float64)  # halfway between 1 and 1 + 2^-10
    above = tie * (1 + 1e-12)
    assert fmt.round(above).item() == 1.0  # the cast: float32 first makes it the tie, even wins
    assert round_to_bits(above, fmt).item() == 1 + 2.0**-10  # correct rounding: up


@pytest.mark.parametrize("name", SMALL)
def test_representable_values_round_to_themselves(name):
    fmt = FORMATS[name]
    v = representable_values(fmt)
    assert torch.equal(fmt.round(v), v)
    assert torch.equal(round_to_bits(v, fmt), v)
    # the grid has no repeats: each value is a distinct representable number
    assert torch.unique(v).numel() == v.numel()


def test_format_constants_match_torch_finfo():
    for name in SMALL + ("fp32",):
        fmt = FORMATS[name]
        info = torch.finfo(fmt.dtype)
        assert fmt.max_value == info.max
        assert fmt.eps == info.eps
        assert fmt.smallest_normal == info.smallest_normal


def test_overflow_behaviour():
    fp16 = FORMATS["fp16"]
    assert fp16.round(torch.tensor([65519.0, 65520.0], dtype=torch.float64)).tolist() == [65504.0, math.inf]
    # torch's float8_e4m3fn cast saturates (no infinity in the format), e5m2 overflows to inf
    e4 = FORMATS["fp8_e4m3"]
    assert e4.round(torch.tensor([1e6, -math.inf], dtype=torch.float64)).tolist() == [448.0, -448.0]
    e5 = FORMATS["fp8_e5m2"]
    assert e5.round(torch.tensor([61439.0, 61440.0], dtype=torch.float64)).tolist() == [57344.0, math.inf]


def test_eps_below_half_the_smallest_subnormal_rounds_to_zero():
    fp16 = FORMATS["fp16"]
    values = fp16.round(torch.tensor([1e-12, 1e-8, 1e-5], dtype=torch.float64))
    assert values[0] == 0 and values[1] == 0
    assert 0 < values[2] < fp16.smallest_normal  # 1e-5 is subnormal in fp16


def test_get_format_by_name_and_dtype():
    assert get_format("float16") is FORMATS["fp16"]
    assert get_format(torch.bfloat16) is FORMATS["bf16"]
