"""The plain Lp normalization formula, differentiated by autograd: the reference every fast path
is checked against, and normbench's ``eager`` implementation.

One core serves every family. ``x`` is normalized over the dimensions ``dims`` (batch-norm: all
but the channel dimension; layer/RMS-norm: the last dimensions; group-norm: each group after a
reshape), with ``n`` values per statistic:

    mu = mean(x) (or 0 without centering),  u = x - mu
    p=2:   D = sqrt(mean(u^2) + eps)
    p=1:   D = C1(n) * mean(|u|) + eps
    p=inf: D = Ck(n) * mean(topk(|u|, k)) + eps       (k=None: the maximum)
    y = u / D

The constants (:mod:`normbench.kernels.constants`) make ``D`` average what L2 divides by for
Gaussian input at the same n. Ties: top-k (and the maximum, k=1) is differentiated by one rule,
:func:`tie_weights`: weight 1 for every deviation above the k-th largest value t, and the k - G
weights left (G deviations above t) shared equally among the E deviations equal to t. That is
the average of the subgradients over every order of the tied values, so it does not depend on
how an implementation breaks ties; for the maximum, tied maxima share equally (as autograd's
amax does). Every implementation follows it.

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


def kth_largest(a: torch.Tensor, dims: Sequence[int], k: int | None) -> torch.Tensor:
    """The k-th largest value of ``a`` over ``dims`` (k=None: the maximum), keepdim: the threshold
    of :func:`tie_weights`."""
    if k is None:
        return a.amax(dims, keepdim=True)
    n = reduced_numel(a.shape, dims)
    if k > n:
        raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
    t = flatten_reduced(a, dims).topk(k, dim=-1, sorted=True).values[..., -1]
    return t.reshape(keepdim_shape(a.shape, dims))


def tie_weights(a: torch.Tensor, t: torch.Tensor, dims: Sequence[int], k: int | None) -> torch.Tensor:
    """d(sum of the k largest of ``a``)/da by the tie rule: 1 where ``a > t``, ``(k - G) / E`` where
    ``a == t`` (G values above the threshold t, the k-th largest, and E equal to it), 0 below.
    The weights of a row sum to k; without ties they are the indicator of the k largest."""
    kk = 1 if k is None else k
    above = a > t
    at = a == t
    g = above.sum(dims, keepdim=True).to(a.dtype)
    e = at.sum(dims, keepdim=True).clamp(min=1).to(a.dtype)  # 0 only for a row of NaN (nothing compares)
    return above.to(a.dtype) + at.to(a.dtype) * ((kk - g) / e)


def dispersion_statistic(
    u: torch.Tensor, dims: Sequence[int], p: float, k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The raw statistic of ``u`` (mean of squares, mean of absolutes, or mean of the k largest
    absolutes), keepdim, differentiable with the tie rule of :func:`tie_weights`; and for p=inf the
    threshold t (the k-th largest |u|, keepdim, not differentiable) that backward needs."""
    if p == 2:
        return (u * u).mean(dims, keepdim=True), None
    a = u.abs()
    if p == 1:
        return a.mean(dims, keepdim=True), None
    t = kth_largest(a.detach(), dims, k)
    if k is None:  # autograd's amax shares the gradient of tied maxima equally: the rule for k=1
        return a.amax(dims, keepdim=True), t
    weights = tie_weights(a.detach(), t, dims, k)
    return (a * weights).sum(dims, keepdim=True) / k, t


def scale_from_statistic(
    stat: torch.Tensor, p: float, k: int | None, n: int, eps: float, center: bool = True
) -> torch.Tensor:
    """The dispersion D from the raw statistic."""
    if p == 2:
        return (stat + eps).sqrt()
    return stat * dispersion_constant(p, n, k, center) + eps


def bessel(n: int) -> float:
    """Torch's bias correction of a variance over n values, ``n / (n - 1)`` (1 for n = 1)."""
    return n / (n - 1) if n > 1 else 1.0


def running_variance(stat: torch.Tensor, p: float, k: int | None, n: int, eps: float) -> torch.Tensor:
    """What one training batch contributes to ``running_var``, per channel, so that eval mode's
    ``sqrt(running_var + eps)`` is, for every p, the training dispersion D with the spread
    bias-corrected as torch does (its ``n / (n - 1)`` on the variance, that is a factor
    ``b = sqrt(n / (n - 1))`` on a deviation):

        p=2:    running_var <- mean(u^2) * n/(n-1)                   (torch's BatchNorm)
        p!=2:   running_var <- (b * C * stat + eps)^2 - eps

    so a model evaluates with torch's batch-norm formula for every p and eval reproduces training
    on the statistics it converged to, for spreads near eps too. For p != 2 the value is negative
    where ``b * C * stat + eps < sqrt(eps)``: eval then divides by that D < sqrt(eps), as training
    did (``running_var + eps`` stays positive). Computed in float64 from ``stat``."""
    s = stat.double()
    if p == 2:
        return s * bessel(n)
    d = s * (math.sqrt(bessel(n)) * dispersion_constant(p, n, k)) + eps
    return d * d - eps


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
    return u / scale_from_statistic(stat, p, k, n, eps, center), mean, stat


def affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y * weight + bias`` with broadcastable (already viewed) parameters; either may be None."""
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
