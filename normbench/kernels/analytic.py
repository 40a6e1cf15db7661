"""Lp normalization as a custom autograd Function with an analytic backward.

Forward is the formula of :mod:`normbench.kernels.reference` with the affine transform folded in.
Backward keeps only what it needs: the input ``x`` (already alive in most graphs), the per-row
mean and dispersion ``D``, the weight, and for top-k the positions of the k largest deviations.
It recomputes ``y = (x - mu) / D`` instead of storing it.

Backward, with ``g = dL/dy * weight`` and ``S = sum(g * y)`` over a row of n values
(``u = x - mu``, ``y = u / D``):

    dL/du_j = (g_j - S * dD/du_j) / D
        p=2:   dD/du_j = y_j / n                     ->  (g - y * mean(g y)) / D
        p=1:   dD/du_j = C1 sign(u_j) / n            ->  (g - C1 sign(y) mean(g y)) / D
        p=inf: dD/du_j = Ck/k sign(u_j) w_j          ->  (g - Ck n/k sign(y) w mean(g y)) / D
    dL/dx = dL/du - mean(dL/du)       (with centering; u_j depends on every x through mu)

``w`` are the tie weights of :func:`~normbench.kernels.reference.tie_weights` (the indicator of
the k largest |u| without ties; tied values at the k-th largest share what is left), recomputed in
backward from ``|u|`` and the saved threshold (the k-th largest |u|, one value per row).
"""

from __future__ import annotations

from typing import Sequence

import torch

from normbench.kernels.constants import dispersion_constant
from normbench.kernels.reference import (
    affine,
    compute_dtype,
    dispersion_statistic,
    reduced_numel,
    scale_from_statistic,
    tie_weights,
)


def _sum_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sum ``t`` over the dimensions in which ``shape`` (same ndim) broadcasts."""
    dims = [d for d in range(t.dim()) if shape[d] == 1 and t.shape[d] != 1]
    return t.sum(dims, keepdim=True) if dims else t


class LpNormFunction(torch.autograd.Function):
    """``y = weight * (x - mu) / D + bias`` over ``dims``; returns ``(y, mean, stat)``.

    ``weight`` and ``bias`` come viewed to broadcast against ``x`` (same ndim) or None; ``mean``
    (None without centering) and ``stat`` (the raw dispersion statistic) are keepdim, in the
    compute dtype, not differentiable: the caller uses them for running statistics.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        dims: Sequence[int],
        p: float,
        k: int | None,
        eps: float,
        center: bool,
    ):
        xc = x.to(compute_dtype(x.dtype))
        mean = xc.mean(dims, keepdim=True) if center else None
        u = xc - mean if center else xc
        stat, threshold = dispersion_statistic(u, dims, p, k)
        n = reduced_numel(x.shape, dims)
        scale = scale_from_statistic(stat, p, k, n, eps, center)
        y = affine(u / scale, weight, bias).to(x.dtype)
        ctx.dims, ctx.p, ctx.k, ctx.n, ctx.center = tuple(dims), p, k, n, center
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, weight, mean, scale, stat, threshold)
        if mean is not None:
            ctx.mark_non_differentiable(mean, stat)
        else:
            ctx.mark_non_differentiable(stat)
        return y, mean, stat

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, _grad_mean, _grad_stat):
        x, weight, mean, scale, stat, threshold = ctx.saved_tensors
        dims, p, k, n = ctx.dims, ctx.p, ctx.k, ctx.n
        cdt = compute_dtype(x.dtype)
        xc = x.to(cdt)
        u = xc - mean if mean is not None else xc
        y = u / scale
        gy = grad_y.to(cdt)

        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = _sum_to(gy * y, weight.shape).to(weight.dtype)
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            grad_bias = _sum_to(gy, ctx.bias[0]).to(ctx.bias[1])
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, grad_bias, None, None, None, None, None

        g = gy * weight if weight is not None else gy
        mean_gy = (g * y).mean(dims, keepdim=True)
        if p == 2:
            du = g - y * mean_gy
        elif p == 1:
            du = g - y.sign() * (dispersion_constant(1, n, None, ctx.center) * mean_gy)
        else:
            weights = tie_weights(u.abs(), threshold, dims, k)
            coef = mean_gy * (dispersion_constant(p, n, k, ctx.center) * n / (k or 1))
            du = g - y.sign() * weights * coef
        du = du / scale
        if mean is not None:
            du = du - du.mean(dims, keepdim=True)
        return du.to(x.dtype), grad_weight, grad_bias, None, None, None, None, None
