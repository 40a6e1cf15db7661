"""Fused Lp row norms (layer-norm, RMS-norm, group-norm): one autograd Function over rows.

A row holds the n values one statistic reduces over. Forward reads each row once and writes it
once (the statistics from the row kept in cache or in registers), and keeps per row the mean, the
dispersion D and for L-inf and top-k the threshold t (the k-th largest deviation); backward reads
x and dy once and writes dx once (docs/performance.md, "Row norms"). The tie rule is
:func:`normbench.kernels.reference.tie_weights`'s, as for every implementation.

Kernels: numba on the CPU (:mod:`normbench.kernels.numba_rows`, float32, float64 and bfloat16),
Triton on CUDA (:mod:`normbench.kernels.triton_rows`, float16 too). Where neither takes the input
(float16 on the CPU, numba or triton missing, inside ``torch.compile``, which traces neither), the
``analytic`` Function runs: the same formula with a custom backward. The backend is
:func:`normbench.kernels.fused.set_backend`'s.
"""

from __future__ import annotations

import torch

from normbench.kernels import fused
from normbench.kernels.analytic import LpNormFunction
from normbench.kernels.constants import dispersion_constant


def _kernels(x: torch.Tensor, wait: bool):
    """The kernel module for rows of this tensor (numba or Triton), or None: the caller then runs
    ``analytic``. On the CPU, with ``wait=False``, None also while the kernels compile in the
    background (:func:`kernels_ready`)."""
    backend = fused.backend()
    if torch.compiler.is_compiling() or backend == "torch":
        return None
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        if not fused.triton_available() or x.dtype not in TRITON_DTYPES:
            return None
        from normbench.kernels import triton_rows

        return triton_rows if triton_rows.supports(x, x.shape[-1]) else None
    if x.is_cuda or not fused.numba_available() or x.dtype not in fused.NUMBA_DTYPES:
        return None
    if not kernels_ready(x, wait=wait):
        return None
    from normbench.kernels import numba_rows

    return numba_rows


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernels_ready(x: torch.Tensor, wait: bool = False) -> bool:
    """Whether the CPU row kernels for x's dtype are compiled; the first call starts compiling them
    (:mod:`normbench.kernels.background`). True for CUDA tensors."""
    if x.is_cuda:
        return True
    from normbench.kernels import background

    dtype = x.dtype

    def compile_kernels() -> None:
        from normbench.kernels import numba_rows

        numba_rows.warm(dtype)

    return background.ready(("numba_rows", dtype), compile_kernels, wait=wait)


# L2 and L1 on the CPU: below this many values a call's fixed cost (about 0.1 ms) outweighs what the
# kernels save; measured fwd+bwd over analytic, one thread: 0.8x at 16x128 and 32x256, 0.9-1.0x at
# 64x256, 1.3-1.5x at 128x512, 3x at 256x1024 (docs/performance.md, "Row norms")
CPU_MIN_NUMEL = 65536


def preferred(x: torch.Tensor, n: int, p: float = 2.0, k: int | None = None) -> bool:
    """Whether ``impl="auto"`` should take the fused row kernels for rows of n values of ``x``
    (measured: docs/performance.md, "Row norms"): on CUDA when triton imports and takes the rows;
    on the CPU for the dtypes the numba kernels take, once compiled (the first call starts their
    compilation), for L-inf and top-k at every size and for L2 and L1 from ``CPU_MIN_NUMEL``
    values."""
    if x.is_cuda:
        return _kernels(x, wait=False) is not None
    if p != float("inf") and k is None and x.numel() < CPU_MIN_NUMEL:
        return False
    return _kernels(x, wait=False) is not None


class FusedLpRowNorm(torch.autograd.Function):
    """``y = weight * (x - mu) / D + bias`` over each row of ``x`` (R, n), contiguous, with
    ``weight`` and ``bias`` (W, n) or None (row r takes weight row ``r % W``). Returns y in x's
    dtype. ``kernels`` is the module of :func:`_kernels` (numba_rows or triton_rows). Forward and
    backward do little beyond the kernel call: at 4k rows of 1k values a call's Python work
    weighed several percent of a CPU layer-norm's time (docs/performance.md, "Row norms")."""

    @staticmethod
    def forward(ctx, x, weight, bias, p: float, k: int | None, eps: float, center: bool, kernels):
        const = dispersion_constant(p, x.shape[1], k, center)
        y, stats = kernels.forward(x, weight, bias, p, k, const, eps, center)
        ctx.p, ctx.k, ctx.const, ctx.center, ctx.kernels = p, k, const, center, kernels
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, stats = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w, need_b = need_w and weight is not None, need_b and ctx.bias is not None
        rows = ctx.bias[0][0] if ctx.bias is not None else 1 if weight is None else weight.shape[0]
        dx, dw, db = ctx.kernels.backward(x, grad_y.contiguous(), weight, stats, ctx.p, ctx.k, ctx.const,
                                          ctx.center, need_w or need_b, rows)
        grad_w = dw.view(weight.shape).to(weight.dtype) if need_w else None
        grad_b = db.view(ctx.bias[0]).to(ctx.bias[1]) if need_b else None
        return dx if need_x else None, grad_w, grad_b, None, None, None, None, None


def row_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, p: float,
             k: int | None, eps: float, center: bool, wait: bool = True) -> torch.Tensor:
    """Normalize each row of ``x`` (R, n) by the fused kernels (``analytic`` where none take it):
    ``weight`` and ``bias`` are (W, n) or None, row r taking row ``r % W`` of them. ``wait`` waits
    for the CPU kernels to compile (``impl="fused"``); without it ``analytic`` runs meanwhile."""
    kernels = _kernels(x, wait=wait)
    if kernels is None:
        w_rows = 1 if weight is None else weight.shape[0]
        x3 = x.reshape(-1, w_rows, x.shape[1])
        y, _, _ = LpNormFunction.apply(x3, None if weight is None else weight[None], None if bias is None else bias[None],
                                       (2,), p, k, eps, center)
        return y.reshape(x.shape)
    if weight is not None and bias is not None and bias.shape != weight.shape:
        bias = bias.expand(weight.shape)  # one count of parameter rows for the kernels
    return FusedLpRowNorm.apply(x.contiguous(), weight, bias, p, k, eps, center, kernels)

