"""Floating-point formats the emulator rounds to: fp64, fp32, fp16, bf16 and the two fp8 formats.

A :class:`Format` knows its precision, exponent range and overflow behaviour, and rounds a float64
tensor to its values (returned as float64, so that every later operation can be computed exactly
or nearly so and rounded once). :meth:`Format.round` uses torch's own cast when torch has the
dtype (fast, and by definition what torch does); :func:`round_to_bits` is an independent
implementation from the format's parameters alone, used to check the casts and for formats torch
lacks.

Why a cast through float64 gives correctly rounded low-precision arithmetic: the emulator computes
each operation on format values in float64 and rounds the result to the format. For +, -, *, /
and sqrt of p-bit inputs, an intermediate rounding to p' >= 2p + 2 bits does not change the final
rounding to p bits (Figueroa 1995). torch casts float64 to the small formats through float32
(p' = 24 >= 2 * 11 + 2), and float64 itself has p' = 53 >= 2 * 24 + 2, so single operations on
fp32, fp16, bf16 and fp8 values are rounded exactly as the format's own arithmetic would round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from normbench.axes import dtype_name, parse_dtype


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: ``precision`` significand bits (the hidden bit counted),
    ``min_exp`` the exponent of the smallest normal number (2**min_exp), ``max_value`` the largest
    finite value, ``overflow`` what a too-large value becomes: ``"inf"`` (IEEE) or ``"saturate"``
    (torch's cast to float8_e4m3fn, which has no infinity, clamps to +-448)."""

    name: str
    precision: int
    min_exp: int
    max_value: float
    overflow: str = "inf"
    dtype: torch.dtype | None = None

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1 and the next larger value."""
        return 2.0 ** (1 - self.precision)

    @property
    def overflow_threshold(self) -> float:
        """The smallest magnitude that rounds beyond ``max_value`` (to inf, or clamped):
        ``max_value`` plus half its spacing."""
        return self.max_value + math.ldexp(self.eps / 2, math.floor(math.log2(self.max_value)))

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.min_exp

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exp - self.precision + 1)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (float64) rounded to the nearest value of this format, ties to even, returned as
        float64. No autograd: see :class:`normbench.numerics.emulator.Emulator` for that."""
        if self.dtype is None:
            return round_to_bits(x, self)
        if self.dtype == torch.float64:
            return x
        return x.to(self.dtype).to(torch.float64)


FORMATS: dict[str, Format] = {
    "fp64": Format("fp64", 53, -1022, float(torch.finfo(torch.float64).max), "inf", torch.float64),
    "fp32": Format("fp32", 24, -126, float(torch.finfo(torch.float32).max), "inf", torch.float32),
    "fp16": Format("fp16", 11, -14, 65504.0, "inf", torch.float16),
    "bf16": Format("bf16", 8, -126, float(torch.finfo(torch.bfloat16).max), "inf", torch.bfloat16),
    "fp8_e4m3": Format("fp8_e4m3", 4, -6, 448.0, "saturate", torch.float8_e4m3fn),
    "fp8_e5m2": Format("fp8_e5m2", 3, -14, 57344.0, "inf", torch.float8_e5m2),
}

FP8 = ("fp8_e4m3", "fp8_e5m2")


def get_format(dtype: str | torch.dtype) -> Format:
    """The :class:`Format` of a dtype or dtype name (``fp16``, ``torch.bfloat16`` ...)."""
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype_name(parse_dtype(dtype))
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"no emulated format for dtype {name!r}; use one of {', '.join(FORMATS)}") from None


def round_to_bits(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round float64 ``x`` to ``fmt`` from its parameters alone (no cast to a torch dtype).

    The quantum of a value is ``2**(e - precision + 1)`` with ``e`` its binary exponent, never less
    than ``min_exp`` (below it the spacing is fixed: subnormals). Dividing by the quantum is exact
    (a power of two), and torch.round rounds half to even, so the result is the IEEE round to
    nearest even. A result above ``max_value`` overflows to inf or saturates, per ``fmt.overflow``.
    """
    x = x.to(torch.float64)
    a = x.abs()
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): the leading bit is 2**(e - 1)
    e = torch.clamp(e.to(torch.float64) - 1, min=fmt.min_exp)
    quantum = torch.exp2(e - (fmt.precision - 1))
    r = torch.round(a / quantum) * quantum
    r = torch.where(torch.isfinite(a), r, a)
    too_big = r > fmt.max_value
    if fmt.overflow == "inf":
        r = torch.where(too_big, torch.full_like(r, math.inf), r)
    else:
        r = torch.where(too_big, torch.full_like(r, fmt.max_value), r)
    return torch.copysign(r, x)


def representable_values(fmt: Format, max_exp: int | None = None, min_exp: int | None = None) -> torch.Tensor:
    """Every non-negative finite value of ``fmt`` with exponent in ``[min_exp, max_exp]`` (default:
    from the subnormals up to ``max_value``), ascending, as float64: a grid for tests and plots."""
    lo = fmt.min_exp if min_exp is None else max(min_exp, fmt.min_exp)
    hi = math.floor(math.log2(fmt.max_value)) if max_exp is None else max_exp
    steps = 2 ** (fmt.precision - 1)
    values = [0.0]
    if min_exp is None:  # subnormals
        values += [k * fmt.smallest_subnormal for k in range(1, steps)]
    for e in range(lo, hi + 1):
        values += [(1 + k / steps) * 2.0**e for k in range(steps)]
    t = torch.tensor(values, dtype=torch.float64)
    return t[t <= fmt.max_value]
