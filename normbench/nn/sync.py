"""Synchronized Lp batch-norm: the statistics of the whole batch across the ranks of a
``torch.distributed`` process group, exactly (up to rounding) what ``LpBatchNorm`` computes on the
concatenated batch, forward and backward, for every p. docs/distributed.md has the protocol.

Per training call and per layer, every rank takes part in these collectives (``C`` channels, all
values in the compute dtype: float64 for float64 input, float32 otherwise):

==========  =====================================================  =====================================
p           forward                                                backward (input gradient needed)
==========  =====================================================  =====================================
2           1 all_gather of (count, mean, M2): ``2 + 2C`` values    1 all_reduce of (sum g, sum g*y): 2C
1           1 all_reduce of (count, sum): ``2 + C``, then           1 all_reduce of (sum g, sum g*y,
            1 all_reduce of the sum of ``|x - mu|``: ``C``          sum sign(y)): 3C
inf, top-k  1 all_gather of (count, sum, the k smallest and the     1 all_reduce of (sum g, sum g*y,
            k largest values per channel): ``2 + C + 2kC``          G, E, signed sums above / at t): 6C
==========  =====================================================  =====================================

``g = weight * dL/dy``, ``M2`` the sum of squared deviations from the rank's own mean (combined by
Chan's parallel formula: no cancellation, unlike a sum of squares), ``k = 1`` for the maximum
(the k smallest and largest are the minimum and maximum). The k largest ``|x - mu|`` of the whole
batch are among the ranks' k largest and k smallest values, whatever the global mean ``mu``, so
one gather before ``mu`` is known suffices; the tie rule
(:func:`~normbench.kernels.reference.tie_weights`) is applied with the global counts ``G`` (above
the k-th largest deviation t) and ``E`` (equal to it), reduced in backward. p=1 needs two rounds:
the mean absolute deviation is taken around the global mean. A count travels as two numbers
(``n // 4096``, ``n % 4096``) so that it is exact in float32 up to 2^36 values per channel.

Weight and bias gradients are the rank's own (as torch's SyncBatchNorm): DistributedDataParallel
averages them with the other parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.kernels.constants import dispersion_constant
from normbench.kernels.reference import check_pk, compute_dtype, flatten_reduced, scale_from_statistic
from normbench.nn.convert import _BUFFERS, _PARAMETERS
from normbench.nn.functional import update_running_stats
from normbench.nn.modules import _LpBatchNorm

__all__ = ["SyncLpBatchNorm", "collectives"]

_BASE = 4096.0  # counts travel as (n // _BASE, n % _BASE): exact in float32 to 2^36


def _count_pair(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([n // int(_BASE), n % int(_BASE)], dtype=dtype, device=device)


def _counts(pairs: torch.Tensor) -> torch.Tensor:
    """Counts from their ``(hi, lo)`` pairs (last dimension 2), in float64."""
    return pairs[..., 0].double() * _BASE + pairs[..., 1].double()


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector viewed to broadcast against (N, C, *) input."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def _candidates(xf: torch.Tensor, kk: int) -> torch.Tensor:
    """The values of each row of ``xf`` (C, n) that can be among the kk largest deviations from any
    center: the kk smallest and the kk largest, disjoint, padded to (C, 2 kk) with zeros after
    ``min(n, 2 kk)`` valid values."""
    c, n = xf.shape
    if n > 2 * kk:
        return torch.cat([xf.topk(kk, dim=1, largest=False).values, xf.topk(kk, dim=1).values], dim=1)
    return torch.cat([xf, xf.new_zeros(c, 2 * kk - n)], dim=1)


def _gathered(t: torch.Tensor, group: Any) -> torch.Tensor:
    """``t`` of every rank, stacked (world, *t.shape): one all_gather."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _sync_statistics(xc: torch.Tensor, dims: tuple[int, ...], p: float, k: int | None,
                     group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """The whole batch's (mean, raw statistic, threshold t or None, count n) per channel, from the
    local compute-dtype input ``xc``; the collectives of the module docstring."""
    c = xc.shape[1]
    n_local = xc.numel() // c if c else 0
    pair = _count_pair(n_local, xc.dtype, xc.device)
    local_sum = xc.sum(dims)
    if p == 2:
        mean_r = local_sum / max(n_local, 1)
        m2_r = (xc - _view(mean_r, xc.dim())).square().sum(dims)
        rows = _gathered(torch.cat([pair, mean_r, m2_r]), group)
        counts = _counts(rows[:, :2]).to(xc.dtype)[:, None]  # (world, 1)
        n = int(counts.sum().item())
        _check_count(n, k)
        mean = (counts * rows[:, 2:2 + c]).sum(0) / n
        m2 = (rows[:, 2 + c:] + counts * (rows[:, 2:2 + c] - mean).square()).sum(0)
        return mean, m2 / n, None, n
    if p == 1:
        head = torch.cat([pair, local_sum])
        dist.all_reduce(head, group=group)
        n = int(_counts(head[:2]).item())
        _check_count(n, k)
        mean = head[2:] / n
        dev = (xc - _view(mean, xc.dim())).abs().sum(dims)
        dist.all_reduce(dev, group=group)
        return mean, dev / n, None, n
    kk = k or 1
    cand = _candidates(flatten_reduced(xc, dims), kk)
    rows = _gathered(torch.cat([pair, local_sum, cand.reshape(-1)]), group)
    counts = _counts(rows[:, :2])
    n = int(counts.sum().item())
    _check_count(n, k)
    mean = rows[:, 2:2 + c].sum(0) / n
    cand = rows[:, 2 + c:].reshape(-1, c, 2 * kk)  # (world, C, 2 kk)
    valid = torch.arange(2 * kk, device=xc.device) < counts.clamp(max=2 * kk).to(xc.device)[:, None]
    dev = (cand - mean[None, :, None]).abs()
    dev = torch.where(valid[:, None, :], dev, torch.full_like(dev, -math.inf))
    top = dev.permute(1, 0, 2).reshape(c, -1).topk(kk, dim=1).values  # (C, kk), descending
    return mean, top.sum(1) / kk, top[:, -1], n


def _check_count(n: int, k: int | None) -> None:
    """Raised on every rank alike (all see the same n), so no rank is left waiting."""
    if n <= 1:
        raise ValueError(f"batch-norm in training needs more than 1 value per channel over all ranks, got {n}")
    if k is not None and k > n:
        raise ValueError(f"top-k needs k <= the {n} values per statistic over all ranks, got k={k}")


class SyncLpNormFunction(torch.autograd.Function):
    """``y = weight * (x - mu) / D + bias`` with the statistics of the whole batch across ``group``;
    returns ``(y, mean, stat, n)``: the output, the global per-channel mean and raw statistic
    (compute dtype, not differentiable) and the global count per channel (an int), for the
    running statistics. Backward is :class:`~normbench.kernels.analytic.LpNormFunction`'s with
    every sum over the batch all-reduced."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, p: float,
                k: int | None, eps: float, group: Any):
        dims = (0, *range(2, x.dim()))
        xc = x.to(compute_dtype(x.dtype))
        mean, stat, threshold, n = _sync_statistics(xc, dims, p, k, group)
        scale = scale_from_statistic(stat, p, k, n, eps)
        y = (xc - _view(mean, x.dim())) / _view(scale, x.dim())
        if weight is not None:
            y = y * _view(weight, x.dim())
        if bias is not None:
            y = y + _view(bias, x.dim())
        ctx.p, ctx.k, ctx.n, ctx.group, ctx.dims = p, k, n, group, dims
        ctx.bias = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, scale, threshold)
        ctx.mark_non_differentiable(mean, stat)
        return y.to(x.dtype), mean, stat, n

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, _grad_mean, _grad_stat, _grad_n):
        x, weight, mean, scale, threshold = ctx.saved_tensors
        p, k, n, dims, nd = ctx.p, ctx.k, ctx.n, ctx.dims, x.dim()
        xc = x.to(compute_dtype(x.dtype))
        u = xc - _view(mean, nd)
        y = u / _view(scale, nd)
        gy = grad_y.to(xc.dtype)
        grad_weight = (gy * y).sum(dims).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = gy.sum(dims).to(ctx.bias) if ctx.bias is not None and ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[0]:  # the same on every rank (one model): no collective
            return None, grad_weight, grad_bias, None, None, None, None
        g = gy * _view(weight, nd) if weight is not None else gy
        sums = [g.sum(dims), (g * y).sum(dims)]
        sign = y.sign()
        if p == 1:
            sums.append(sign.sum(dims))
        elif p == math.inf:
            a = u.abs()
            t = _view(threshold, nd)
            above, at = (a > t).to(xc.dtype), (a == t).to(xc.dtype)
            sums += [above.sum(dims), at.sum(dims), (sign * above).sum(dims), (sign * at).sum(dims)]
        reduced = torch.stack(sums)
        dist.all_reduce(reduced, group=ctx.group)
        sum_g, mean_gy = reduced[0], reduced[1] / n
        if p == 2:
            coef, coef_sum = y, torch.zeros_like(sum_g)  # sum(y) = 0 over the batch
            factor = torch.ones_like(sum_g)
        elif p == 1:
            coef, coef_sum = sign, reduced[2]
            factor = torch.full_like(sum_g, dispersion_constant(1, n))
        else:
            kk = k or 1
            share = (kk - reduced[2]) / reduced[3].clamp(min=1)  # (k - G) / E: the tie rule
            coef = sign * (above + at * _view(share, nd))
            coef_sum = reduced[4] + share * reduced[5]
            factor = torch.full_like(sum_g, dispersion_constant(p, n, k) * n / kk)
        du = (g - coef * _view(factor * mean_gy, nd)) / _view(scale, nd)
        mean_du = (sum_g - factor * mean_gy * coef_sum) / (scale * n)
        return (du - _view(mean_du, nd)).to(x.dtype), grad_weight, grad_bias, None, None, None, None


def _sync_group(group: Any) -> Any:
    """The process group to synchronize over, or None to compute locally: torch.distributed
    unavailable or not initialized, or a group of one rank (as torch's SyncBatchNorm)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class SyncLpBatchNorm(_LpBatchNorm):
    """Lp batch-norm whose training statistics are those of the whole batch across the ranks of
    ``process_group`` (default: the world), for (N, C) to (N, C, D, H, W) input, contiguous or
    channels_last. Ranks may hold different batch sizes, also none (N = 0).

    In training with an initialized process group of more than one rank, every rank must call it
    (the collectives of :mod:`normbench.nn.sync`); otherwise (eval mode, torch.distributed not
    initialized, one rank) it is :class:`~normbench.nn.LpBatchNorm2d` and communicates nothing,
    as torch's SyncBatchNorm falls back to a local batch-norm. Running statistics are updated with
    the global statistics and global count, so they stay equal on every rank. ``impl`` is the
    local path's (eval and the fallback).
    """

    def __init__(
        self,
        num_features: int,
        p: float = 2,
        k: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
        impl: str = "auto",
    ) -> None:
        super().__init__(num_features, p, k, eps, momentum, affine, track_running_stats, device, dtype, impl)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (N, C, ...), got {input.dim()}D input")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (dim 1), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = _sync_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        y, mean, stat, n = SyncLpNormFunction.apply(input, self.weight, self.bias, self.p, self.k, self.eps, group)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            update_running_stats(self.running_mean, self.running_var, mean, stat, self.p, self.k, n, factor, self.eps)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every batch-norm in ``module`` (torch's ``BatchNorm1d/2d/3d`` and
        ``SyncBatchNorm``: p=2; normbench's ``LpBatchNorm*`` and ``SyncLpBatchNorm``: their p and
        k) by a ``SyncLpBatchNorm`` over ``process_group``, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
        does: the new layers hold the old ``Parameter`` objects (so ``requires_grad`` and an
        optimizer built earlier carry over) and buffers (running statistics), and the train/eval
        flag. Returns the converted module (a new one when ``module`` is itself a batch-norm).
        Convert before wrapping in DistributedDataParallel. Other ``_BatchNorm`` subclasses
        (an uninitialized ``LazyBatchNorm*``) are refused with a ValueError."""
        if isinstance(module, _BatchNorm):
            return cls._converted(module, process_group)
        for name, child in list(module.named_children()):
            module._modules[name] = cls.convert_sync_batchnorm(child, process_group)
        return module

    @classmethod
    def _converted(cls, bn: _BatchNorm, process_group: Any) -> nn.Module:
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(f"convert_sync_batchnorm: {type(bn).__name__} is not initialized yet (run one forward pass first)")
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, _LpBatchNorm)):
            raise ValueError(f"convert_sync_batchnorm: cannot convert {type(bn).__name__}")
        p, k = (bn.p, bn.k) if isinstance(bn, _LpBatchNorm) else (2.0, None)
        new = cls(bn.num_features, p=p, k=k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, process_group=process_group, device="meta",
                  impl=getattr(bn, "impl", "auto"))
        for name in _PARAMETERS:
            new._parameters[name] = bn._parameters.get(name)
        for name in _BUFFERS:
            new._buffers[name] = bn._buffers.get(name)
        new.training = bn.training
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


def collectives(p: float, k: int | None, channels: int, world: int, backward: bool = True) -> list[dict[str, Any]]:
    """The collectives one training call of a :class:`SyncLpBatchNorm` makes, in order: for each,
    ``op`` (all_gather or all_reduce), ``phase`` (forward or backward) and ``values`` (how many
    numbers each rank contributes); for reports (``normbench profile``) and docs."""
    p, k = check_pk(p, k)
    c = channels
    if p == 2:
        fwd = [("all_gather", 2 + 2 * c)]
        bwd = 2 * c
    elif p == 1:
        fwd = [("all_reduce", 2 + c), ("all_reduce", c)]
        bwd = 3 * c
    else:
        fwd = [("all_gather", 2 + c + 2 * (k or 1) * c)]
        bwd = 6 * c
    out = [{"op": op, "phase": "forward", "values": v, "world": world} for op, v in fwd]
    if backward:
        out.append({"op": "all_reduce", "phase": "backward", "values": bwd, "world": world})
    return out
