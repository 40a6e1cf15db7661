"""Input cases: named generators with parameters, each giving exact float64 values.

A :class:`Case` is a generator name, its parameters and a shape ``(N, C, L)``: dimension 1 is the
channel (batch-norm reduces over N and L per channel, layer/RMS-norm over L per (n, c) row,
group-norm over groups of channels). The values are drawn in float64 from a seeded generator, so
a case is the same on every run; the tested dtype rounds them afterwards. The record of a cell
holds :meth:`Case.describe`: the name, the parameters and the shape.

Generators (``--case`` names):

``gauss(scale)``             N(0, scale^2); swept over many decades: the safe range
``offset(mean, ratio)``      mean + N(0, (mean/ratio)^2): a large mean over a small spread
``heavy_tail(df)``           Student-t with ``df`` degrees of freedom (df=1 is Cauchy)
``outliers(magnitude, fraction)``  N(0, 1) with a fraction of values at +-magnitude
``constant(value)``          every channel constant (channel c holds value * (c + 1))
``mixed_scale(lo, hi)``      channel c of N(0, 1) scaled by 10^(lo .. hi), log-spaced over channels
``tiny``                     N(0, 1), 4 values per channel (2 per layer-norm row)
``large``                    N(0, 1), 2^16 values per channel and per layer-norm row
``deviation(value, spread)`` N(0, spread^2) with the first value of every last-dimension row at
                             +value: just below or above 256, where fp16 squares overflow
``beyond_range(value)``      N(0, 1) with the first value of every row at +value, beyond a dtype's range
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Params = tuple[tuple[str, Any], ...]


def _gauss(shape, gen, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _offset(shape, gen, mean: float = 100.0, ratio: float = 1e2) -> torch.Tensor:
    return mean + torch.randn(shape, generator=gen, dtype=torch.float64) * (mean / ratio)


def _heavy_tail(shape, gen, df: int = 1) -> torch.Tensor:
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    # chi-square with df degrees of freedom: a sum of df squared standard normals
    chi2 = sum(torch.randn(shape, generator=gen, dtype=torch.float64) ** 2 for _ in range(int(df)))
    return z / torch.sqrt(chi2 / df)


def _outliers(shape, gen, magnitude: float = 1e3, fraction: float = 1e-3) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = x.view(-1)
    count = max(1, round(fraction * flat.numel()))
    idx = torch.randperm(flat.numel(), generator=gen)[:count]
    signs = torch.where(torch.rand(count, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    flat[idx] = magnitude * signs.to(torch.float64)
    return x


def _constant(shape, gen, value: float = 0.5) -> torch.Tensor:
    per_channel = value * torch.arange(1, shape[1] + 1, dtype=torch.float64)
    return per_channel.view(1, -1, *([1] * (len(shape) - 2))).expand(shape).clone()


def _mixed_scale(shape, gen, lo: float = -3.0, hi: float = 3.0) -> torch.Tensor:
    c = shape[1]
    exps = torch.linspace(lo, hi, c, dtype=torch.float64) if c > 1 else torch.tensor([lo], dtype=torch.float64)
    scales = (10.0**exps).view(1, -1, *([1] * (len(shape) - 2)))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scales


def _spike(shape, gen, value: float, spread: float = 1.0) -> torch.Tensor:
    """N(0, spread^2) with the first value of every last-dimension row at ``value`` (for the
    default (N, C, L) shape: N values of each channel's N * L, one per layer-norm row)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    x[..., 0] = value
    return x


def _deviation(shape, gen, value: float = 260.0, spread: float = 8.0) -> torch.Tensor:
    return _spike(shape, gen, value, spread)


def _beyond_range(shape, gen, value: float = 1e5) -> torch.Tensor:
    return _spike(shape, gen, value, 1.0)


GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "gauss": _gauss,
    "offset": _offset,
    "heavy_tail": _heavy_tail,
    "outliers": _outliers,
    "constant": _constant,
    "mixed_scale": _mixed_scale,
    "tiny": _gauss,
    "large": _gauss,
    "deviation": _deviation,
    "beyond_range": _beyond_range,
}


@dataclass(frozen=True)
class Case:
    """One input: a generator, its parameters, a shape ``(N, C, L)`` and a seed; or (``tensor``
    set) a user's tensor, named by its file and key; or a layer of a model (``--model``): its
    captured input as ``tensor``, the gradient that reached it as ``grad`` (used instead of the
    seeded N(0, 1) upstream gradient), the ``family`` the requested norms are mapped to (None:
    the norms as named), the layer's own ``eps`` (None: the run's) and ``fields``, extra record
    fields of every cell on this case (the layer's name, kind, what was kept)."""

    name: str
    params: Params = ()
    shape: tuple[int, ...] = (32, 4, 128)
    seed: int = 0
    tensor: torch.Tensor | None = field(default=None, compare=False, hash=False)
    grad: torch.Tensor | None = field(default=None, compare=False, hash=False)
    family: str | None = None
    eps: float | None = None
    fields: Params = field(default=(), compare=False, hash=False)

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def describe(self) -> dict[str, Any]:
        """The record's ``case`` field: name, parameters, shape (and seed for generated cases)."""
        out: dict[str, Any] = {"name": self.name, **self.param_dict, "shape": list(self.shape)}
        if self.tensor is None:
            out["seed"] = self.seed
        return out

    def label(self) -> str:
        """A short human label: ``gauss(scale=100)``."""
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)
        return f"{self.name}({params})" if params else self.name

    def generate(self) -> torch.Tensor:
        """The case's exact values: float64 on the CPU."""
        if self.tensor is not None:
            return self.tensor.detach().to("cpu", torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        return GENERATORS[self.name](self.shape, gen, **self.param_dict)


CASE_NAMES = tuple(GENERATORS)


def sweep_scales(quick: bool = False) -> list[float]:
    """Scales of the Gaussian sweep: every decade from 1e-24 to 1e24 (quick: every second decade
    from 1e-12 to 1e12), wide enough to show bf16's range and fine enough for fp16's and fp8's."""
    exps = range(-12, 13, 2) if quick else range(-24, 25)
    return [10.0**e for e in exps]


def default_cases(
    names: tuple[str, ...] | None = None, quick: bool = False, seed: int = 0, shape: tuple[int, ...] | None = None
) -> list[Case]:
    """The embedded grid of cases (all generators, or those in ``names``). Quick runs use smaller
    shapes and a coarser sweep; the large case keeps 2^16 values per statistic in full runs and
    2^12 in quick ones. ``shape`` (2 to 5 dimensions, dimension 1 the channel) replaces the default
    shape of every case but ``tiny`` and ``large``, whose shapes are their point."""
    wanted = CASE_NAMES if names is None else names
    unknown = [n for n in wanted if n not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r}: use {', '.join(CASE_NAMES)}")
    if shape is not None and not 2 <= len(shape) <= 5:
        raise ValueError(f"case shapes have 2 to 5 dimensions (N, C, ...), got {list(shape)}")
    shape = tuple(shape) if shape is not None else ((16, 4, 64) if quick else (32, 4, 128))
    cases: list[Case] = []

    def add(name: str, shape=shape, **params: Any) -> None:
        cases.append(Case(name, tuple(params.items()), tuple(shape), seed))

    for name in wanted:
        if name == "gauss":
            for s in sweep_scales(quick):
                add("gauss", scale=s)
        elif name == "offset":
            for r in ((1e2, 1e4, 1e8) if quick else (1e2, 1e3, 1e4, 1e6, 1e8)):
                add("offset", mean=100.0, ratio=r)
        elif name == "heavy_tail":
            add("heavy_tail", df=1)
            if not quick:
                add("heavy_tail", df=3)
        elif name == "outliers":
            add("outliers", magnitude=1e3, fraction=1e-3)
        elif name == "constant":
            add("constant", value=0.5)
        elif name == "mixed_scale":
            add("mixed_scale", lo=-3.0, hi=3.0)
        elif name == "tiny":
            add("tiny", shape=(2, 4, 2))
        elif name == "large":
            add("large", shape=(1, 2, 2**12 if quick else 2**16))
        elif name == "deviation":
            add("deviation", value=250.0, spread=8.0)
            add("deviation", value=260.0, spread=8.0)
        elif name == "beyond_range":
            add("beyond_range", value=1e5)
            if not quick:
                add("beyond_range", value=1e39)
    return cases


@functools.lru_cache(maxsize=256)
def expected_max_deviation(n: int) -> float:
    """E[max |z|] over n standard normal values: how far the largest of n Gaussian deviations
    reaches, in units of sigma (used to turn a bound on |x - mu| into a bound on the scale)."""
    from normbench.kernels.constants import expected_topk_mean

    return expected_topk_mean(max(1, n), 1) if n > 1 else math.sqrt(2 / math.pi)
