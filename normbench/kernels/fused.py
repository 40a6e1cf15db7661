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
  together, then one elementwise pass. Top-k and the maximum follow the tie rule of
  :func:`~normbench.kernels.reference.tie_weights`: forward keeps the threshold t (the k-th
  largest deviation, the statistic itself for the maximum; no positions), the reduction pass also
  counts G and E (the deviations above and at t) and their sign sums (:func:`tie_counts`), and
  the elementwise pass weighs each sign by a compare with t (1 above, ``(k - G) / E`` at it). The
  numba kernels list in forward where t is reached and do that work there only.

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
NUMBA_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # what the numba kernels store


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


def backend() -> str:
    """The kernels :func:`set_backend` picked (batch-norm and the row norms alike)."""
    return _BACKEND


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
    return x.dim() > 2 and _numba_takes(x)


def _numba_takes(x: torch.Tensor) -> bool:
    """Whether this tensor should run on the numba kernels (not inside torch.compile, which cannot
    trace numba: the compiled graph takes the torch stages). Imports no numba."""
    if _BACKEND not in ("auto", "numba") or x.is_cuda or torch.compiler.is_compiling() or not numba_available():
        return False
    return x.device.type == "cpu" and x.dtype in NUMBA_DTYPES


def _numba_kernels(x: torch.Tensor):
    """The numba kernel module when this tensor should run on it (:func:`_numba_takes`), else
    None; waits for the kernels of x's dtype to be compiled (:func:`kernels_ready`)."""
    if not _numba_takes(x):
        return None
    kernels_ready(x, wait=True)
    from normbench.kernels import numba_bn

    return numba_bn


def kernels_ready(x: torch.Tensor, wait: bool = False) -> bool:
    """Whether the CPU kernels for x's dtype are compiled; the first call starts their compilation
    (:mod:`normbench.kernels.background`: in a background thread unless its mode is ``wait``).
    ``impl="auto"`` runs ``analytic`` until this says True; ``wait=True`` blocks until it does.
    True for CUDA tensors (Triton compiles on the call, as torch's own kernels load)."""
    if x.is_cuda:
        return True
    from normbench.kernels import background

    dtype = x.dtype

    def compile_kernels() -> None:
        from normbench.kernels import numba_bn

        numba_bn.warm(dtype)

    return background.ready(("numba_bn", dtype), compile_kernels, wait=wait)


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


def unviewed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own (no view of another), sharing its memory. What an autograd
    Function returns must not be a view made inside it: autograd forbids modifying such a view in
    place (``ReLU(inplace=True)`` after a batch-norm, as torchvision's ResNets do), since that
    would bypass the Function's backward. A copy would cost a pass over memory; this costs none."""
    if t._base is None:
        return t
    if torch.compiler.is_compiling():  # traced: the compiled graph owns its outputs' memory
        return t.clone()
    out = t.new_empty(0)
    out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


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
    """Mean, mean of the k largest |x - mu| and the threshold t (the k-th largest; the statistic
    itself for k = 1), per channel.

    One pass over x finds the sum and each block's max and min; a block's largest deviation is
    ``max(max - mu, mu - min)``, and the k largest deviations lie in the k blocks with the largest
    such bound. Only those blocks are gathered and searched. t is computed as backward recomputes
    |x - mu| (the same mean, in the compute dtype), so backward's compares with it are exact."""
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
        stat = dev.amax(1)
        return mean, stat, stat
    vals = dev.topk(k, dim=1, sorted=False).values
    return mean, vals.mean(1), vals.amin(1)


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


def tie_counts(u3: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(C, 4) int64 per channel of the deviations ``u3`` (a canonical view) against the threshold
    t: [E, S_eq, G, S_gt], how many |u| equal t and the sum of their signs, how many exceed it and
    the sum of theirs (all exact integers)."""
    a, t = u3.abs(), _v(threshold)
    at, above, pos, neg = a == t, a > t, u3 > 0, u3 < 0
    return torch.stack([_sum02(at), _sum02(at & pos) - _sum02(at & neg),
                        _sum02(above), _sum02(above & pos) - _sum02(above & neg)], 1)


def tie_terms(counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From tie counts ([E, S_eq, G, S_gt] per channel), float64 per channel: the weight
    ``(k - G) / E`` the ties at the threshold share (the tie rule of
    :func:`~normbench.kernels.reference.tie_weights`), and ``sum(sign(u) w) = S_gt + S_eq (k - G) / E``."""
    n_eq, s_eq, n_gt, s_gt = counts.double().unbind(1)
    weq = (k - n_gt) / n_eq.clamp(min=1)  # E = 0 only for NaN input, where nothing compares
    return weq, s_gt + s_eq * weq


@_maybe_compiled
def _backward_moments(x3, gy3, mean, scale, threshold, p: float):
    """Per-channel sums for backward, in one pass: sum(dy), sum(dy * xhat), and for p=1
    sum(sign(u)), for top-k and the maximum the tie counts against the threshold
    (:func:`tie_counts`), else None."""
    cdt = scale.dtype
    u = x3.to(cdt) - _v(mean)
    g = gy3.to(cdt)
    sum_g, sum_gx = _sum02(g), _sum02(g * u) / scale
    if p == 1:
        return sum_g, sum_gx, _sum02(torch.sign(u))
    return sum_g, sum_gx, None if threshold is None else tie_counts(u, threshold)


@_maybe_compiled
def _backward_apply(x3, gy3, mean, scale, weight, sum_g, sum_gx, coef, sign_mean, threshold, weq, p: float, n: int):
    """The input gradient ``a * (dy - mean(dy) - term)``, ``a = weight / D`` per channel: p=2
    ``term = u sum(dy xhat) / (n D)``; p=1 ``coef (sign(u) - sign_mean)``; top-k and the maximum
    ``coef (sign(u) w - sign_mean)``, w the tie weights (1 above the threshold, ``weq`` at it, 0
    below) and ``sign_mean`` their signed channel mean."""
    cdt = scale.dtype
    u = x3.to(cdt) - _v(mean)
    a = 1.0 / scale if weight is None else weight.to(cdt) / scale
    dx = gy3.to(cdt) - _v(sum_g / n)
    if p == 2:
        dx = dx - u * _v(sum_gx / (n * scale))
    elif threshold is None:
        dx = dx - (torch.sign(u) - _v(sign_mean)) * _v(coef)
    else:
        d, t = u.abs(), _v(threshold)
        w = torch.where(d > t, 1.0, torch.where(d == t, _v(weq), 0.0))
        dx = dx - (torch.sign(u) * w - _v(sign_mean)) * _v(coef)
    return (dx * _v(a)).to(x3.dtype)


def _stats_torch(x3: torch.Tensor, p: float, k: int | None):
    if k is not None or p == math.inf:  # the maximum is top-1
        return _stats_topk(x3, k or 1)
    mean, stat = _stats_moments(x3, p)
    return mean, stat, None


class FusedLpBatchNorm(torch.autograd.Function):
    """Lp batch-norm of (N, C, *) input in training mode: ``(y, mean, stat)`` as
    :class:`~normbench.kernels.analytic.LpNormFunction` returns them (mean and stat flat, per channel).

    Backward keeps x, the weight, and per channel the mean and D; for top-k and the maximum also
    the threshold t (the k-th largest deviation: the statistic itself for the maximum) and, from
    the numba kernels, where the deviations that reach it lie (a count and one int32 per chunk,
    about k a channel; :func:`normbench.kernels.numba_bn.forward`). The torch stages and the
    Triton kernels count the ties in backward's reduction pass instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, p: float, k: int | None, eps: float):
        x3 = canonical(x)
        n = x3.shape[0] * x3.shape[2]
        if k is not None and k > n:
            raise ValueError(f"top-k needs k <= the {n} values per statistic, got k={k}")
        const = dispersion_constant(p, n, k)
        cpu_kernels = _numba_kernels(x)
        hot = None
        if cpu_kernels:
            y3, mean, stat, scale, threshold, hot = cpu_kernels.forward(x3, weight, bias, p, k, const, eps)
        else:
            kernels = _triton_kernels(x)
            mean, stat, threshold = (kernels.statistics if kernels else _stats_torch)(x3, p, k)
            scale = (stat + eps).sqrt() if p == 2 else stat * const + eps
            y3 = (kernels.apply if kernels else _apply)(x3, mean, scale, weight, bias)
        ctx.p, ctx.k, ctx.n, ctx.const = p, k, n, const
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, weight, mean, scale, threshold, hot)
        ctx.mark_non_differentiable(mean, stat)
        return unviewed(uncanonical(y3, x)), mean, stat

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_stat):
        x, weight, mean, scale, threshold, hot = ctx.saved_tensors
        p, k, n, const = ctx.p, ctx.k, ctx.n, ctx.const
        x3 = canonical(x)
        gy3 = canonical(grad_y.contiguous(memory_format=_memory_format(x)))
        cpu_kernels = _numba_kernels(x)
        if cpu_kernels:
            gx3, sum_g, sum_gx = cpu_kernels.backward(x3, gy3, weight, mean, scale, p, k, const, threshold, hot)
        else:
            gx3, sum_g, sum_gx = _backward_torch_or_triton(x, x3, gy3, weight, mean, scale, threshold, p, k, n, const)
        grad_x = uncanonical(gx3, x) if ctx.needs_input_grad[0] else None
        grad_w = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(ctx.bias[1]) if ctx.bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


def _backward_torch_or_triton(x, x3, gy3, weight, mean, scale, threshold, p, k, n, const):
    """``(grad_x3, sum_g, sum_gx)`` by the Triton kernels or the torch stages: one reduction pass
    (which also counts the ties against the threshold for top-k and the maximum), one elementwise
    pass."""
    kernels = _triton_kernels(x)
    scale = scale.to(compute_dtype(x3.dtype))  # the numba kernels' D is float64: |u| as forward had it
    sums = kernels.backward_sums if kernels else _backward_moments
    sum_g, sum_gx, extra = sums(x3, gy3, mean, scale, threshold, p)
    coef = sign_mean = weq = None
    if p == 1:
        coef, sign_mean = const * sum_gx / n, extra / n
    elif threshold is not None:  # D depends on the k largest |u_j|: dD/du_j = Ck/k sign(u_j) w_j
        kk = k or 1
        weq, signed = tie_terms(extra, kk)
        weq, coef, sign_mean = weq.to(scale.dtype), const * sum_gx / kk, (signed / n).to(scale.dtype)
    args = (x3, gy3, mean, scale, weight, sum_g, sum_gx, coef, sign_mean, threshold, weq, p, n)
    gx3 = (kernels.backward_apply if kernels else _backward_apply)(*args)
    return gx3, sum_g, sum_gx


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
