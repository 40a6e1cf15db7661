"""Functional Lp normalization: batch-norm, layer-norm, RMS-norm and group-norm with an L2, L1,
L-inf or top-k dispersion. The formulas are in docs/norms.md and :mod:`normbench.kernels.reference`.

Every function takes ``impl``: ``"eager"`` runs the plain formula under autograd (the reference),
``"analytic"`` the custom autograd Function with an analytic backward that keeps only the input and
per-row statistics, ``"fused"`` the pass-minimal kernels (Triton on CUDA, numba on the CPU):
:mod:`normbench.kernels.fused` for batch-norm, :mod:`normbench.kernels.fused_rows` for layer-,
RMS- and group-norm (``analytic`` where no kernel takes the input). ``"auto"`` (default) is
``fused`` where those kernels take the input and measured faster
(:func:`~normbench.kernels.fused.preferred`, :func:`~normbench.kernels.fused_rows.preferred`) and
``analytic`` otherwise, and also while the CPU kernels of a dtype compile in the background on
their first use (:mod:`normbench.kernels.background`): the first call never waits for numba.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from normbench.kernels.analytic import LpNormFunction
from normbench.kernels.fused import FusedLpBatchNorm, kernels_ready, preferred
from normbench.kernels.fused_rows import preferred as rows_preferred
from normbench.kernels.fused_rows import row_norm
from normbench.kernels.constants import C1, dispersion_constant, paper_linf_constant, topk_constant
from normbench.kernels.reference import (
    affine,
    check_pk,
    lp_normalize,
    bessel,
    reduced_numel,
    running_variance,
)

__all__ = [
    "lp_batch_norm",
    "lp_layer_norm",
    "lp_rms_norm",
    "lp_group_norm",
    "lp_normalize",
    "C1",
    "dispersion_constant",
    "topk_constant",
    "paper_linf_constant",
]

IMPLS = ("auto", "eager", "analytic", "fused")


def _normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dims: Sequence[int],
    p: float,
    k: int | None,
    eps: float,
    center: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Dispatch to an implementation; returns ``(y in x.dtype, mean, stat)``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    p, k = check_pk(p, k)
    n = reduced_numel(x.shape, dims)
    if k is not None and k > n:
        raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
    if impl == "eager":
        y, mean, stat = lp_normalize(x, dims, p, k, eps, center)
        return affine(y, weight, bias).to(x.dtype), mean, stat
    if impl == "fused":
        raise ValueError("impl='fused' over these dimensions is not implemented: the row norms take it")
    return LpNormFunction.apply(x, weight, bias, tuple(dims), p, k, eps, center)


def _rows(
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    p: float,
    k: int | None,
    eps: float,
    center: bool,
    impl: str,
) -> torch.Tensor | None:
    """The row norms' fused path: rows ``x2`` (R, n), parameters (W, n) or None (row r takes row
    ``r % W``). None where ``impl`` asks for another path (``auto`` takes this one where
    :func:`~normbench.kernels.fused_rows.preferred`, and runs ``analytic`` while the CPU kernels
    compile in the background)."""
    if impl not in ("auto", "fused"):
        return None
    p, k = check_pk(p, k)
    n = x2.shape[1]
    if k is not None and k > n:
        raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
    if impl == "auto" and not rows_preferred(x2, n, p, k):
        return None
    return row_norm(x2, weight, bias, p, k, eps, center, wait=impl == "fused")


def _channel_view(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    return None if t is None else t.view(1, -1, *([1] * (ndim - 2)))


def lp_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    p: float = 2,
    k: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Lp batch-norm of ``input`` (N, C, *): statistics per channel over N and every spatial
    position. Same arguments as ``torch.nn.functional.batch_norm`` plus ``p``, ``k`` and ``impl``.

    In training the batch statistics normalize and, when given, ``running_mean`` and
    ``running_var`` are updated in place with ``momentum``; ``running_var`` tracks, for every p, what
    makes ``sqrt(running_var + eps)`` the training dispersion D with the spread bias-corrected as
    torch does (:func:`~normbench.kernels.reference.running_variance`). Otherwise the running
    statistics normalize: ``weight * (x - running_mean) / sqrt(running_var + eps) + bias``, the same
    for every p, so p=2 is exactly torch's BatchNorm in both modes and eval reproduces training once
    the running statistics have converged, for every p.
    """
    if input.dim() < 2:
        raise ValueError(f"batch-norm expects (N, C, ...) input with 2 to 5 dimensions, got shape {tuple(input.shape)}")
    c = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != c:
            raise ValueError(f"input has {c} channels (dim 1) but {name} has {t.numel()} values")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch-norm in eval mode needs running_mean and running_var (or training=True)")
        if impl == "eager":
            shift, scale = _channel_view(running_mean, input.dim()), _channel_view((running_var + eps).sqrt(), input.dim())
            y = (input.to(scale.dtype) - shift) / scale
            return affine(y, _channel_view(weight, input.dim()), _channel_view(bias, input.dim())).to(input.dtype)
        p, k = check_pk(p, k)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)

    dims = (0, *range(2, input.dim()))
    n = reduced_numel(input.shape, dims)
    if n <= 1:
        raise ValueError(
            f"batch-norm in training needs more than 1 value per channel, got input shape {tuple(input.shape)}"
        )
    if impl == "auto":  # analytic while the kernels compile in the background (no first-call stall)
        impl = "fused" if preferred(input) and kernels_ready(input) else "analytic"
    if impl == "fused":
        p, k = check_pk(p, k)
        if k is not None and k > n:
            raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
        y, mean, stat = FusedLpBatchNorm.apply(input, weight, bias, p, k, eps)
    else:
        y, mean, stat = _normalize(
            input, _channel_view(weight, input.dim()), _channel_view(bias, input.dim()), dims, p, k, eps, True, impl
        )
    if running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean.reshape(-1), stat.reshape(-1), *check_pk(p, k), n, momentum, eps)
    return y


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         stat: torch.Tensor, p: float, k: int | None, n: int, momentum: float, eps: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place, for the mean and for
    :func:`~normbench.kernels.reference.running_variance`: what every Lp batch-norm does with the
    batch ``mean`` and dispersion statistic ``stat`` of ``n`` values per channel (the layers here,
    SyncLpBatchNorm, and the low-precision layers of ``plot halfprec``). p=2 in two fused ops without
    temporaries (torch's update; this runs on every training call, where small ops cost more
    than the arithmetic); p != 2 from a per-channel vector computed in float64."""
    running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    if p == 2:
        running_var.mul_(1 - momentum).add_(stat, alpha=momentum * bessel(n))
    else:
        running_var.mul_(1 - momentum).add_(running_variance(stat, p, k, n, eps).to(running_var.dtype), alpha=momentum)


def _check_normalized_shape(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"normalized_shape {list(shape)} must match the last dimensions of the input, got shape {tuple(x.shape)}"
        )
    return tuple(range(x.dim() - len(shape), x.dim()))


def _elementwise_view(t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    return None if t is None else t.view(*([1] * (ndim - t.dim())), *t.shape)


def lp_layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    p: float = 2,
    k: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Lp layer-norm over the last ``len(normalized_shape)`` dimensions (p=2: torch's LayerNorm)."""
    dims = _check_normalized_shape(input, normalized_shape)
    if impl in IMPLS:
        n = reduced_numel(input.shape, dims)
        rows = _rows(input.reshape(-1, n), _param_row(weight, n), _param_row(bias, n), p, k, eps, True, impl)
        if rows is not None:
            return rows.reshape(input.shape)
    y, _, _ = _normalize(
        input, _elementwise_view(weight, input.dim()), _elementwise_view(bias, input.dim()), dims, p, k, eps, True, impl
    )
    return y


def lp_rms_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    p: float = 2,
    k: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Lp RMS-norm: layer-norm without centering (p=2: torch's RMSNorm; eps=None is the input
    dtype's machine epsilon, as there)."""
    dims = _check_normalized_shape(input, normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if impl in IMPLS:
        n = reduced_numel(input.shape, dims)
        rows = _rows(input.reshape(-1, n), _param_row(weight, n), None, p, k, eps, False, impl)
        if rows is not None:
            return rows.reshape(input.shape)
    y, _, _ = _normalize(input, _elementwise_view(weight, input.dim()), None, dims, p, k, eps, False, impl)
    return y


def lp_group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    p: float = 2,
    k: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Lp group-norm of (N, C, *) input: statistics per sample over each group of C / num_groups
    channels and every spatial position (p=2: torch's GroupNorm). Keeps channels_last input's
    memory format."""
    if input.dim() < 2:
        raise ValueError(f"group-norm expects (N, C, ...) input, got shape {tuple(input.shape)}")
    n_batch, c = input.shape[:2]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"{c} channels cannot be split into {num_groups} groups")
    fmt = None
    if input.dim() in (4, 5) and not input.is_contiguous():
        fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        fmt = fmt if input.is_contiguous(memory_format=fmt) else None
    per_group = input.numel() // (n_batch * num_groups) if input.numel() else 0
    if impl in IMPLS and per_group:  # rows: one per sample and group, contiguous (a copy for channels_last)
        spatial = per_group // (c // num_groups)
        rows = _rows(input.reshape(n_batch * num_groups, per_group), _group_rows(weight, num_groups, spatial),
                     _group_rows(bias, num_groups, spatial), p, k, eps, True, impl)
        if rows is not None:
            y = rows.reshape(input.shape)
            return y.contiguous(memory_format=fmt) if fmt is not None else y
    grouped = input.reshape(n_batch, num_groups, c // num_groups, *input.shape[2:])
    view = (1, num_groups, c // num_groups, *([1] * (input.dim() - 2)))
    w = None if weight is None else weight.view(view)
    b = None if bias is None else bias.view(view)
    y, _, _ = _normalize(grouped, w, b, tuple(range(2, grouped.dim())), p, k, eps, True, impl)
    y = y.reshape(input.shape)
    return y.contiguous(memory_format=fmt) if fmt is not None else y


def _param_row(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """An elementwise parameter as one row of n values (a view)."""
    return None if t is None else t.reshape(1, n)


def _group_rows(t: torch.Tensor | None, groups: int, spatial: int) -> torch.Tensor | None:
    """A per-channel parameter as one row per group: each channel's value repeated over the
    positions of its channel (G, C / G * spatial), differentiable back to the channels."""
    if t is None:
        return None
    per = t.numel() // groups
    return t.reshape(groups, per, 1).expand(groups, per, spatial).reshape(groups, per * spatial)

