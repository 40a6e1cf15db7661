"""The plain Lp normalization formula, differentiated by autograd: the reference every fast path
is checked against, and normbench's ``eager`` implementation.

One core serves every family. ``x`` is normalized over the dimensions ``dims`` (batch-norm: all
but the channel dimension; layer/RMS-norm: the last dimensions; group-norm: each group after a
reshape), with ``n`` values per statistic:

    mu = mean(x) (or 0 without centering),  u = x - mu
    p=2:   D = sqrt(mean(u^2) + eps)
    p=1:   D = C1 * mean(|u|) + eps
    p=inf: D = Ck(n) * mean(topk(|u|, k)) + eps       (k=None: the maximum)
    y = u / D

Statistics are computed in float32 for half-precision input (float64 stays float64), as torch's
own layers do; the caller casts the output back.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from normbench.kernels.constants import dispersion_constant

VALID_P = (1.0, 2.0, math.inf)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_pk(p: float, k: int | None) -> tuple[float, int | None]:
    """Validate (p, k) and return them canonical: p a float, k=1 written as None (the maximum)."""
    if p not in VALID_P:
        raise ValueError(f"p must be 1, 2 or float('inf'), got {p!r}")
    if k is not None:
        if p != math.inf:
            raise ValueError(f"k (top-k) goes only with p=float('inf'), got p={p!r}, k={k!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k == 1:
            k = None
    return float(p), k


def reduced_numel(shape: Sequence[int], dims: Sequence[int]) -> int:
    """How many values each statistic reduces over."""
    return math.prod([shape[d] for d in dims])


def flatten_reduced(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``t`` with the kept dimensions first and the reduced ones merged into one last dimension
    (a copy unless they are already adjacent): the layout torch.topk needs."""
    kept = [d for d in range(t.dim()) if d not in dims]
    moved = t.permute(*kept, *dims)
    return moved.reshape(*moved.shape[: len(kept)], -1)


def unflatten_reduced(flat: torch.Tensor, like: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`flatten_reduced`: back to the shape of ``like`` (a view)."""
    kept = [d for d in range(like.dim()) if d not in dims]
    order = [*kept, *dims]
    moved = flat.reshape([like.shape[d] for d in order])
    inverse = [order.index(d) for d in range(like.dim())]
    return moved.permute(*inverse)


def keepdim_shape(shape: Sequence[int], dims: Sequence[int]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(shape)]


def dispersion_statistic(
    u: torch.Tensor, dims: Sequence[int], p: float, k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The raw statistic of centered ``u`` (mean of squares, mean of absolutes, or mean of the k
    largest absolutes), keepdim; and for top-k the positions of the k largest in the layout of
    :func:`flatten_reduced`."""
    if p == 2:
        return (u * u).mean(dims, keepdim=True), None
    a = u.abs()
    if p == 1:
        return a.mean(dims, keepdim=True), None
    if k is None:
        return a.amax(dims, keepdim=True), None
    n = reduced_numel(u.shape, dims)
    if k > n:
        raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
    values, idx = flatten_reduced(a, dims).topk(k, dim=-1, sorted=False)
    return values.mean(-1).reshape(keepdim_shape(u.shape, dims)), idx


def scale_from_statistic(stat: torch.Tensor, p: float, k: int | None, n: int, eps: float) -> torch.Tensor:
    """The dispersion D from the raw statistic."""
    if p == 2:
        return (stat + eps).sqrt()
    return stat * dispersion_constant(p, n, k) + eps


def sigma_estimate_factor(p: float, k: int | None, n: int) -> float:
    """What running statistics track, for every p, so that eval mode is one formula: the statistic
    as an estimate of sigma^2, ``factor * stat`` for p=2 and ``factor * stat^2`` otherwise (the
    squared dispersion constant), bias-corrected by n / (n - 1) like torch's running variance."""
    ratio = n / (n - 1) if n > 1 else 1.0
    return ratio if p == 2 else ratio * dispersion_constant(p, n, k) ** 2


def lp_normalize(
    x: torch.Tensor,
    dims: Sequence[int],
    p: float = 2.0,
    k: int | None = None,
    eps: float = 1e-5,
    center: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Normalize ``x`` over ``dims`` by the plain formula (autograd-differentiable).

    Returns ``(y, mean, stat)`` in the compute dtype: the normalized values, the mean (None
    without centering) and the raw dispersion statistic, both keepdim.
    """
    p, k = check_pk(p, k)
    dims = tuple(sorted(d % x.dim() for d in dims))
    xc = x.to(compute_dtype(x.dtype))
    mean = xc.mean(dims, keepdim=True) if center else None
    u = xc - mean if center else xc
    stat, _ = dispersion_statistic(u, dims, p, k)
    n = reduced_numel(x.shape, dims)
    return u / scale_from_statistic(stat, p, k, n, eps), mean, stat


def affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y * weight + bias`` with broadcastable (already viewed) parameters; either may be None."""
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
