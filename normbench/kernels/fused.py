"""Fused Lp batch-norm: the fewest passes over memory, behind one autograd Function.

The formulation is shaped for memory traffic (docs/performance.md has the byte model):

- statistics in one pass where the math allows it: top-k (and L-inf, as top-1) from the sum and
  each block's max and min, then a search of the k most extreme blocks only; the Triton kernel
  takes L-inf from the sum, max and min together (``max|x - mu| = max(max - mu, mu - min)``) and
  L2 by Welford, while the compiled CPU stage takes L2 in two passes (measured faster there);
  p=1 needs the mean before the mean absolute deviation, so two passes;
- normalize and affine folded into one multiply-add per element, ``y = x * a + b`` with per-channel
  ``a = weight / D`` and ``b = bias - mu * a`` (the numba kernels: ``y = (x - mu) * a + bias``, free
  of cancellation when ``|mu|`` is much larger than D);
- backward: one pass that reduces ``sum(dy)`` and ``sum(dy * xhat)`` (and for p=1 ``sum(sign)``)
  together, then one elementwise pass; top-k and the maximum add the term of their k positions
  per channel by a scatter (the Triton kernels count tied maxima in the two passes instead).

On the CPU the numba kernels of :mod:`normbench.kernels.numba_bn` run it (float32, float64 and
bfloat16; a thread per group of adjacent channels, kept in cache between passes); on CUDA the Triton
kernels of :mod:`normbench.kernels.triton_bn`. Without numba, and for float16 on the CPU, the torch
stages below run, each compiled with ``torch.compile`` (once per shape, dtype and p; compile time
stays out of the timed numbers of ``normbench profile``). :func:`set_compile` turns compilation off
(the same code runs eagerly: the tests check the formulation on every p and layout without paying
compile time, and compile a few configurations); :func:`set_backend` picks the kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from normbench.kernels.constants import dispersion_constant
from normbench.kernels.reference import compute_dtype

_COMPILE = True
_BACKEND = "auto"
BACKENDS = ("auto", "torch", "triton", "numba")


def set_compile(enabled: bool) -> None:
    """Compile the torch stages with torch.compile (default) or run them eagerly."""
    global _COMPILE
    _COMPILE = bool(enabled)


def set_backend(name: str) -> None:
    """``auto`` (Triton kernels for CUDA tensors; numba kernels for CPU tensors they take, when numba
    is installed; torch stages otherwise), ``torch``, ``numba``, or ``triton`` (also for CPU tensors
    under ``TRITON_INTERPRET=1``: how the tests run the kernels)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    _BACKEND = name


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (the CUDA kernels need it)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@functools.cache
def numba_available() -> bool:
    """Whether numba imports (the CPU kernels need it)."""
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def preferred(x: torch.Tensor) -> bool:
    """Whether ``impl="auto"`` batch-norm should take the fused path for this input: on CUDA when
    triton imports; on the CPU when the numba kernels take it and it has spatial dimensions ((N, C)
    input runs the columns kernels, which measured slower than ``analytic`` on small batches)."""
    if x.is_cuda:
        return triton_available()
    return x.dim() > 2 and _numba_kernels(x) is not None


def _numba_kernels(x: torch.Tensor):
    """The numba kernel module when this tensor should run on it, else None (also inside
    torch.compile, which cannot trace numba: the compiled graph takes the torch stages)."""
    if _BACKEND not in ("auto", "numba") or x.is_cuda or torch.compiler.is_compiling() or not numba_available():
        return None
    from normbench.kernels import numba_bn

    return numba_bn if numba_bn.supports(x) else None


def _triton_kernels(x: torch.Tensor):
    """The Triton kernel module when this tensor should run on it, else None."""
    if _BACKEND in ("torch", "numba") or (_BACKEND == "auto" and not x.is_cuda):
        return None
    from normbench.kernels import triton_bn

    return triton_bn


def _maybe_compiled(fn: Callable) -> Callable:
    """``fn`` compiled on first use when compilation is on; eager otherwise."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if not _COMPILE or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            from torch import _dynamo

            # one graph per (shape, dtype, p, k, layout): allow more than dynamo's default of 8
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 512)
            compiled = torch.compile(fn, dynamic=False)
        return compiled(*args, **kwargs)

    return run


def canonical(x: torch.Tensor) -> torch.Tensor:
    """A (A, C, B) view of (N, C, *) input whose statistics reduce over dims 0 and 2: (N, C, S)
    for contiguous input, (N * S, C, 1) for channels_last. Reducing the contiguous inner dimension
    first (then over A) is what both eager ATen and the compiled code vectorize well."""
    c = x.shape[1]
    if x.dim() > 2 and not x.is_contiguous():
        if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
            return x.permute(0, *range(2, x.dim()), 1).reshape(-1, c, 1)
        x = x.contiguous()
    return x.reshape(x.shape[0], c, -1)


def uncanonical(t3: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`canonical`: a tensor of ``like``'s shape and memory format."""
    if t3.shape[2] == 1 and like.dim() > 2 and t3.shape[0] != like.shape[0]:
        nhwc = (like.shape[0], *like.shape[2:], like.shape[1])
        return t3.reshape(nhwc).permute(0, like.dim() - 1, *range(1, like.dim() - 1))
    return t3.reshape(like.shape)


def _v(t: torch.Tensor) -> torch.Tensor:
    """Per-channel vector -> (1, C, 1), broadcasting against a canonical view."""
    return t.view(1, -1, 1)


def _sum02(t: torch.Tensor) -> torch.Tensor:
    return t.sum(2).sum(0)


def _block_size(length: int, target: int = 64) -> int:
    """The largest divisor of ``length`` not above ``target``."""
    return next(d for d in range(min(target, length), 0, -1) if length % d == 0)


@_maybe_compiled
def _block_extrema(x3: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: the sum, and the max and min of every block of ``bs`` consecutive values
    (along B, or along A when B = 1), as (C, blocks)."""
    a_len, c, b_len = x3.shape
    xc = x3.to(compute_dtype(x3.dtype))
    if b_len > 1:
        blocks = xc.view(a_len, c, b_len // bs, bs)
        bmax, bmin = blocks.amax(3).transpose(0, 1), blocks.amin(3).transpose(0, 1)
        return _sum02(xc), bmax.reshape(c, -1), bmin.reshape(c, -1)
    blocks = xc.view(a_len // bs, bs, c)
    return xc.sum((0, 2)), blocks.amax(1).t(), blocks.amin(1).t()


def _stats_topk(x3: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, mean of the k largest |x - mu| and their offsets in the (contiguous) canonical view,
    per channel.

    One pass over x finds the sum and each block's max and min; a block's largest deviation is
    ``max(max - mu, mu - min)``, and the k largest deviations lie in the k blocks with the largest
    such bound. Only those blocks are gathered and searched."""
    a_len, c, b_len = x3.shape
    cdt = compute_dtype(x3.dtype)
    # blocks of whole rows when they are long (the row extremes are what a vectorized reduction
    # gives cheaply), cut so that k blocks hold a few thousand candidates at most
    bs = _block_size(b_len, max(32, 512 // k)) if b_len > 1 else _block_size(a_len, 32)
    total, bmax, bmin = _block_extrema(x3, bs)
    mean = total / (a_len * b_len)
    bound = torch.maximum(bmax - mean[:, None], mean[:, None] - bmin)
    blk = bound.topk(min(k, bound.shape[1]), dim=1, sorted=False).indices  # (C, kb)
    ch = torch.arange(c, device=x3.device)[:, None]
    if b_len > 1:  # block j of channel c: a = j // (B / bs), b = (j % (B / bs)) * bs + r
        nb = b_len // bs
        start = ((blk // nb) * c + ch) * b_len + (blk % nb) * bs
        step = 1
    else:  # block j of channel c: a = j * bs + r
        start = blk * bs * c + ch
        step = c
    pos = (start[:, :, None] + torch.arange(bs, device=x3.device) * step).reshape(c, -1)
    dev = (x3.view(-1)[pos].to(cdt) - mean[:, None]).abs()
    if k == 1:
        vals, sel = dev.max(1, keepdim=True)
    else:
        vals, sel = dev.topk(k, dim=1, sorted=False)
    return mean, vals.mean(1), pos.gather(1, sel)


@_maybe_compiled
def _stats_moments(x3: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and raw statistic per channel for p = 1 or 2, in two passes (the mean, then the
    deviations): on the CPU the compiled two-pass variance measured faster than a compiled Welford
    pass, and it is as robust to a large mean."""
    xc = x3.to(compute_dtype(x3.dtype))
    rows = x3.shape[0] * x3.shape[2]
    mean = _sum02(xc) / rows
    u = xc - _v(mean)
    return mean, _sum02(u * u if p == 2 else u.abs()) / rows


@_maybe_compiled
def _apply(x3, mean, scale, weight, bias):
    a = 1.0 / scale if weight is None else weight.to(scale.dtype) / scale
    b = -mean * a if bias is None else bias.to(scale.dtype) - mean * a
    return (x3.to(scale.dtype) * _v(a) + _v(b)).to(x3.dtype)


@_maybe_compiled
def _backward_moments(x3, gy3, mean, scale, p: float):
    """Per-channel sums for backward, in one pass: sum(dy), sum(dy * xhat), and for p=1
    sum(sign(u)) (the fourth value is unused here; the Triton kernels count ties in it)."""
    cdt = scale.dtype
    u = x3.to(cdt) - _v(mean)
    g = gy3.to(cdt)
    sum_g, sum_gx = _sum02(g), _sum02(g * u) / scale
    return sum_g, sum_gx, _sum02(torch.sign(u)) if p == 1 else sum_g, sum_g


@_maybe_compiled
def _backward_apply(x3, gy3, mean, scale, stat, weight, sum_g, sum_gx, s3, s4, p: float, const: float, n: int,
                    positions: bool):
    """The input gradient. With ``positions`` (top-k, the maximum) only the channel mean ``s3 / n``
    of the top-k term is applied here; the caller scatters its k terms."""
    cdt = scale.dtype
    u = x3.to(cdt) - _v(mean)
    a = 1.0 / scale if weight is None else weight.to(cdt) / scale
    dx = gy3.to(cdt) - _v(sum_g / n)
    if positions:
        dx = dx + _v(s3 / n)
    elif p == 2:
        dx = dx - u * _v(sum_gx / (n * scale))
    else:
        dx = dx - (torch.sign(u) - _v(s3 / n)) * _v(const * sum_gx / n)
    return (dx * _v(a)).to(x3.dtype)


def _stats_torch(x3: torch.Tensor, p: float, k: int | None):
    if k is not None:
        return _stats_topk(x3, k)
    if p == math.inf:  # the maximum is top-1: its position spares backward a tie mask
        return _stats_topk(x3, 1)
    mean, stat = _stats_moments(x3, p)
    return mean, stat, None


def _backward_sums_torch(x3, gy3, mean, scale, stat, p: float, k: int | None):
    # L-inf and top-k take their sign sum over their own positions (in FusedLpBatchNorm.backward)
    return _backward_moments(x3, gy3, mean, scale, p)


class FusedLpBatchNorm(torch.autograd.Function):
    """Lp batch-norm of (N, C, *) input in training mode: ``(y, mean, stat)`` as
    :class:`~normbench.kernels.analytic.LpNormFunction` returns them (mean and stat flat, per channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, p: float, k: int | None, eps: float):
        x3 = canonical(x)
        n = x3.shape[0] * x3.shape[2]
        if k is not None and k > n:
            raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
        const = dispersion_constant(p, n, k)
        cpu_kernels = _numba_kernels(x)
        if cpu_kernels:
            y3, mean, stat, scale, pos = cpu_kernels.forward(x3, weight, bias, p, k, const, eps)
        else:
            kernels = _triton_kernels(x)
            mean, stat, pos = (kernels.statistics if kernels else _stats_torch)(x3, p, k)
            scale = (stat + eps).sqrt() if p == 2 else stat * const + eps
            y3 = (kernels.apply if kernels else _apply)(x3, mean, scale, weight, bias)
        ctx.p, ctx.k, ctx.n, ctx.const = p, k, n, const
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, weight, mean, scale, stat, pos)
        ctx.mark_non_differentiable(mean, stat)
        return uncanonical(y3, x), mean, stat

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_stat):
        x, weight, mean, scale, stat, pos = ctx.saved_tensors
        p, k, n, const = ctx.p, ctx.k, ctx.n, ctx.const
        x3 = canonical(x)
        gy3 = canonical(grad_y.contiguous(memory_format=_memory_format(x)))
        cpu_kernels = _numba_kernels(x)
        if cpu_kernels:
            gx3, sum_g, sum_gx = cpu_kernels.backward(x3, gy3, weight, mean, scale, p, k, const, pos)
        else:
            gx3, sum_g, sum_gx = _backward_torch_or_triton(x, x3, gy3, weight, mean, scale, stat, pos, p, k, n, const)
        grad_x = uncanonical(gx3, x) if ctx.needs_input_grad[0] else None
        grad_w = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(ctx.bias[1]) if ctx.bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


def _backward_torch_or_triton(x, x3, gy3, weight, mean, scale, stat, pos, p, k, n, const):
    """``(grad_x3, sum_g, sum_gx)`` by the Triton kernels or the torch stages."""
    kernels = _triton_kernels(x)
    sums = kernels.backward_sums if kernels else _backward_sums_torch
    sum_g, sum_gx, s3, s4 = sums(x3, gy3, mean, scale, stat, p, k)
    if pos is not None:
        # D depends only on the k largest |u_j| (the max: k=1): c = Ck/k * sum(dy * xhat) per
        # channel; its channel mean goes in the elementwise pass, the k terms by scatter
        c = const * sum_gx / pos.shape[1]
        sign_k = torch.sign(x3.view(-1)[pos].to(scale.dtype) - mean[:, None])
        s3 = c * sign_k.sum(1)
    args = (x3, gy3, mean, scale, stat, weight, sum_g, sum_gx, s3, s4, p, const, n, pos is not None)
    gx3 = (kernels.backward_apply if kernels else _backward_apply)(*args)
    if pos is not None:
        a = 1.0 / scale if weight is None else weight.to(scale.dtype) / scale
        gx3.view(-1).index_add_(0, pos.reshape(-1), (-(a * c)[:, None] * sign_k).reshape(-1).to(gx3.dtype))
    return gx3, sum_g, sum_gx


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
