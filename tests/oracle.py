"""Independent float64 oracles for every normbench layer, written row by row from the formulas of
docs/norms.md (sorting instead of topk, explicit reshapes instead of keepdim reductions)."""

from __future__ import annotations

import math

import torch

from normbench.kernels.constants import C1, topk_constant


def rows_normalized(rows: torch.Tensor, p: float, k: int | None, eps: float, center: bool = True) -> torch.Tensor:
    """Normalize each row of a 2-D float64 tensor."""
    assert rows.dtype == torch.float64
    n = rows.shape[1]
    u = rows - rows.mean(1, keepdim=True) if center else rows
    if p == 2:
        d = torch.sqrt((u * u).sum(1, keepdim=True) / n + eps)
    elif p == 1:
        d = C1 * u.abs().sum(1, keepdim=True) / n + eps
    else:
        kk = k or 1
        largest = u.abs().sort(dim=1, descending=True).values[:, :kk]
        d = topk_constant(n, kk) * largest.sum(1, keepdim=True) / kk + eps
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


def batch_norm_statistics(x, p=2.0, k=None):
    """(mean, sigma^2 estimate with Bessel's n/(n-1)) per channel: what running stats track."""
    x = x.double()
    c = x.shape[1]
    rows = x.transpose(0, 1).reshape(c, -1)
    n = rows.shape[1]
    u = rows - rows.mean(1, keepdim=True)
    if p == 2:
        sigma2 = (u * u).mean(1)
    elif p == 1:
        sigma2 = (C1 * u.abs().mean(1)) ** 2
    else:
        kk = k or 1
        sigma2 = (topk_constant(n, kk) * u.abs().sort(1, descending=True).values[:, :kk].mean(1)) ** 2
    return rows.mean(1), sigma2 * n / (n - 1)


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
