"""Independent float64 oracles for every normbench layer, written row by row from the formulas of
docs/norms.md (sorting instead of topk, explicit reshapes instead of keepdim reductions).

Differentiable by autograd, with the tie rule of docs/norms.md written another way than the
library writes it: the sum of the k largest of a row is ``k * t + sum(relu(a - t))`` for its k-th
largest value t, and t is the maximum of the values not above it, whose gradient autograd's amax
shares equally among the values equal to t. Values above t get 1, those equal to t share k - G."""

from __future__ import annotations

import math

import torch

from normbench.kernels.constants import dispersion_constant


def largest_sum(a: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k largest values of each row of ``a`` (rows, n), keepdim, with the tie rule."""
    t0 = a.detach().sort(dim=1, descending=True).values[:, k - 1 : k]
    t = torch.where(a <= t0, a, torch.full_like(a, -math.inf)).amax(1, keepdim=True)
    return k * t + torch.relu(a - t).sum(1, keepdim=True)


def rows_statistic(u: torch.Tensor, p: float, k: int | None) -> torch.Tensor:
    """The raw statistic of each row of ``u``: mean of squares, of absolutes, of the k largest."""
    n = u.shape[1]
    if p == 2:
        return (u * u).sum(1, keepdim=True) / n
    if p == 1:
        return u.abs().sum(1, keepdim=True) / n
    return largest_sum(u.abs(), k or 1) / (k or 1)


def rows_normalized(rows: torch.Tensor, p: float, k: int | None, eps: float, center: bool = True) -> torch.Tensor:
    """Normalize each row of a 2-D float64 tensor."""
    assert rows.dtype == torch.float64
    n = rows.shape[1]
    u = rows - rows.mean(1, keepdim=True) if center else rows
    stat = rows_statistic(u, p, k)
    d = torch.sqrt(stat + eps) if p == 2 else dispersion_constant(p, n, k, center) * stat + eps
    return u / d


def batch_norm(x, weight=None, bias=None, p=2.0, k=None, eps=1e-5):
    """Lp batch-norm in training mode: statistics per channel over N and spatial positions."""
    x = x.double()
    c = x.shape[1]
    rows = x.transpose(0, 1).reshape(c, -1)
    y = rows_normalized(rows, p, k, eps).reshape(x.transpose(0, 1).shape).transpose(0, 1)
    return _channel_affine(y, weight, bias)


def _channel_affine(y, weight, bias):
    shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


def batch_norm_statistics(x, p=2.0, k=None, eps=1e-5):
    """(mean, running_var contribution) per channel: what running statistics track. p=2: the
    variance with Bessel's n/(n-1) (torch's); otherwise the value v with sqrt(v + eps) equal to
    the training D whose spread is scaled by sqrt(n/(n-1)) (docs/norms.md)."""
    x = x.double()
    c = x.shape[1]
    rows = x.transpose(0, 1).reshape(c, -1)
    n = rows.shape[1]
    stat = rows_statistic(rows - rows.mean(1, keepdim=True), p, k).reshape(-1)
    if p == 2:
        return rows.mean(1), stat * n / (n - 1)
    d = math.sqrt(n / (n - 1)) * dispersion_constant(p, n, k) * stat + eps
    return rows.mean(1), d * d - eps


def layer_norm(x, ndims, weight=None, bias=None, p=2.0, k=None, eps=1e-5, center=True):
    """Lp layer-norm (center=False: RMS-norm) over the last ``ndims`` dimensions."""
    x = x.double()
    inner = math.prod(x.shape[x.dim() - ndims:])
    y = rows_normalized(x.reshape(-1, inner), p, k, eps, center).reshape(x.shape)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def group_norm(x, groups, weight=None, bias=None, p=2.0, k=None, eps=1e-5):
    """Lp group-norm: per sample, per group of channels and all spatial positions."""
    x = x.double()
    y = rows_normalized(x.reshape(x.shape[0] * groups, -1), p, k, eps).reshape(x.shape)
    return _channel_affine(y, weight, bias)


# (p, k) combinations every test sweeps: L2, L1, L-inf (max) and top-k.
PK = [(2.0, None), (1.0, None), (math.inf, None), (math.inf, 3)]
PK_IDS = ["l2", "l1", "linf", "top3"]
