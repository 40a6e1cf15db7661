"""Triton kernels for the fused Lp row norms on CUDA (tested on the CPU under ``TRITON_INTERPRET=1``).

Rows arrive as a contiguous (R, n) tensor (:mod:`normbench.kernels.fused_rows`). One program
owns a whole row while it fits one block (``n`` up to :data:`MAX_BLOCK` values, in registers or
spilled to local memory): forward reads x once and writes y once, the 2E minimum, and backward
reads x and dy once and writes dx once. Accumulation is in float32 (float64 for float64 input);
storage float16, bfloat16, float32 or float64.

- ``_forward_kernel``: per row the mean (with centering), the statistic (mean of ``u^2`` or
  ``|u|``, or the maximum ``|u|``, which is also the threshold t of the tie rule), D, and
  ``y = u * (weight / D) + bias``. Top-k with k > 1 takes the mean, the statistic and t from
  torch ops (``topk`` over the rows, in the arithmetic the kernels recompute ``|u|`` in, so the
  compares with t are exact) and the kernel normalizes: a second read of x there.
- ``_backward_kernel``: a program loops over rows ``pid, pid + P, ...``; per row ``sum(g)``,
  ``sum(g u)`` and the p-specific sum (``sum(u)``, ``sum(sign u)``, or the tie counts against t),
  then ``dx = (g - coef * term(u)) / D - shift`` as :mod:`normbench.kernels.numba_rows` writes it;
  the weight's and bias's gradients accumulate into the program's own partial rows (no atomics),
  summed over programs by torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_BLOCK = 65536  # the longest row one program takes; longer rows run on analytic
BACKWARD_PROGRAMS = 1024  # at most this many programs share the rows in backward (each with partials)
P_L2, P_L1, P_TOPK = 0, 1, 2


def supports(x: torch.Tensor, n: int) -> bool:
    """Whether these kernels take rows of n values of this tensor."""
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and triton.next_power_of_2(n) <= MAX_BLOCK


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _p_code(p: float, k: int | None) -> int:
    return P_TOPK if (k is not None or p == math.inf) else (P_L2 if p == 2 else P_L1)


@triton.jit
def _forward_kernel(X, Y, W, B, MEAN, SCALE, STAT, THR, CONSTS, N, NW,
                    P: tl.constexpr, CENTER: tl.constexpr, PRESTATS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    acc_dt = SCALE.dtype.element_ty
    const = tl.load(CONSTS)  # the constant, eps and k in the compute dtype (a Python float argument is fp32)
    eps = tl.load(CONSTS + 1)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + r * N + cols, mask=mask, other=0.0).to(acc_dt)
    if PRESTATS:
        mu = tl.load(MEAN + r)
        stat = tl.load(STAT + r)
    else:
        if CENTER:
            mu = tl.sum(x, axis=0) / N
        else:
            mu = tl.sum(x * 0.0, axis=0)
        u = tl.where(mask, x - mu, 0.0)
        if P == 0:
            stat = tl.sum(u * u, axis=0) / N
        elif P == 1:
            stat = tl.sum(tl.abs(u), axis=0) / N
        else:
            stat = tl.max(tl.abs(u), axis=0)
            tl.store(THR + r, stat)
        tl.store(MEAN + r, mu)
        tl.store(STAT + r, stat)
    if P == 0:
        scale = tl.sqrt(stat + eps)
    else:
        scale = stat * const + eps
    tl.store(SCALE + r, scale)
    row_w = (r % NW) * N
    w = tl.load(W + row_w + cols, mask=mask, other=0.0).to(acc_dt)
    b = tl.load(B + row_w + cols, mask=mask, other=0.0).to(acc_dt)
    y = (x - mu) * (w / scale) + b
    tl.store(Y + r * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(X, G, DX, W, MEAN, SCALE, THR, DWP, DBP, CONSTS, R, N, NW,
                     P: tl.constexpr, CENTER: tl.constexpr, WANT_WB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    const = tl.load(CONSTS)
    k = tl.load(CONSTS + 2)
    programs = tl.num_programs(0)
    acc_dt = SCALE.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    for r in range(pid, R, programs):
        x = tl.load(X + r * N + cols, mask=mask, other=0.0).to(acc_dt)
        gy = tl.load(G + r * N + cols, mask=mask, other=0.0).to(acc_dt)
        row_w = (r % NW) * N
        w = tl.load(W + row_w + cols, mask=mask, other=0.0).to(acc_dt)
        mu = tl.load(MEAN + r)
        scale = tl.load(SCALE + r)
        u = tl.where(mask, x - mu, 0.0)
        g = gy * w
        s_g = tl.sum(g, axis=0)
        mgy = tl.sum(g * u, axis=0) / scale / N  # mean(g * xhat)
        if P == 0:
            coef = mgy / scale
            term = u
        elif P == 1:
            coef = const * mgy
            term = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
        else:
            t = tl.load(THR + r)
            d = tl.abs(u)
            n_gt = tl.sum(tl.where(mask & (d > t), 1.0, 0.0), axis=0)
            n_eq = tl.sum(tl.where(mask & (d == t), 1.0, 0.0), axis=0)
            weq = (k - n_gt) / tl.maximum(n_eq, 1.0)  # E = 0 only for NaN input
            sgn = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))  # 0 at u = 0: ties at t = 0 add nothing
            coef = const * mgy * N / k
            term = sgn * tl.where(d > t, 1.0, tl.where(d == t, weq, 0.0))
        if CENTER:
            shift = (s_g - coef * tl.sum(tl.where(mask, term, 0.0), axis=0)) / scale / N
        else:
            shift = s_g * 0.0
        dx = (g - coef * term) / scale - shift
        tl.store(DX + r * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if WANT_WB:
            part = (pid * NW + r % NW) * N + cols
            tl.store(DWP + part, tl.load(DWP + part, mask=mask, other=0.0) + gy * (u / scale), mask=mask)
            tl.store(DBP + part, tl.load(DBP + part, mask=mask, other=0.0) + gy, mask=mask)


def _param(t: torch.Tensor | None, fill: float, n: int, acc: torch.dtype, rows: int, device) -> torch.Tensor:
    if t is None:
        return torch.full((rows, n), fill, dtype=acc, device=device)
    return t.detach().to(acc).reshape(rows, n).contiguous()


def _consts(const: float, eps: float, k: int | None, acc: torch.dtype, device) -> torch.Tensor:
    """[const, eps, k] in the compute dtype: the kernels load them (float arguments would be fp32)."""
    return torch.tensor([const, eps, float(k or 1)], dtype=acc, device=device)


def _rows_of(weight: torch.Tensor | None, bias: torch.Tensor | None) -> int:
    for t in (weight, bias):
        if t is not None:
            return t.shape[0]
    return 1


def forward(x: torch.Tensor, weight, bias, p: float, k: int | None, const: float, eps: float, center: bool):
    """``(y, stats)`` as :func:`normbench.kernels.numba_rows.forward` returns them for rows x (R, n)
    (``stats`` (3, R) in the compute dtype: the mean, D and the threshold, -1 unless L-inf or top-k)."""
    rows, n = x.shape
    acc = _acc(x.dtype)
    dev = x.device
    p_code = _p_code(p, k)
    w_rows = _rows_of(weight, bias)
    w, b = _param(weight, 1.0, n, acc, w_rows, dev), _param(bias, 0.0, n, acc, w_rows, dev)
    y = torch.empty_like(x)
    stats = torch.empty((3, rows), dtype=acc, device=dev)
    mean, scale, thr = stats.unbind(0)
    stat = torch.empty(rows, dtype=acc, device=dev)
    thr.fill_(-1.0)
    prestats = p_code == P_TOPK and k not in (None, 1)
    if prestats:  # top-k: the k largest deviations by torch, as backward recomputes |u|
        xc = x.to(acc)
        mean.copy_(xc.mean(1) if center else torch.zeros(rows, dtype=acc, device=dev))
        vals = (xc - mean[:, None]).abs().topk(k, dim=1, sorted=True).values
        stat.copy_(vals.mean(1))
        thr.copy_(vals[:, -1])
    if rows:
        _forward_kernel[(rows,)](x, y, w, b, mean, scale, stat, thr, _consts(const, eps, k, acc, dev), n, w_rows,
                                 P=p_code, CENTER=bool(center), PRESTATS=prestats,
                                 BLOCK=triton.next_power_of_2(n))
    return y, stats


def backward(x, gy, weight, stats, p: float, k: int | None, const: float, center: bool,
             want_params: bool, param_rows: int = 1):
    """``(dx, dweight, dbias)`` as :func:`normbench.kernels.numba_rows.backward` returns them
    (the parameter gradients as (W, n) tensors in the compute dtype, or None)."""
    rows, n = x.shape
    acc = _acc(x.dtype)
    dev = x.device
    w = _param(weight, 1.0, n, acc, param_rows, dev)
    dx = torch.empty_like(x)
    programs = max(1, min(rows, BACKWARD_PROGRAMS))
    shape = (programs, param_rows, n) if want_params else (1, 1, 1)
    dw_part = torch.zeros(shape, dtype=acc, device=dev)
    db_part = torch.zeros(shape, dtype=acc, device=dev)
    stats = stats.to(acc)
    if rows:
        _backward_kernel[(programs,)](x, gy, dx, w, stats[0], stats[1], stats[2], dw_part, db_part,
                                      _consts(const, 0.0, k, acc, dev), rows, n, param_rows, P=_p_code(p, k), CENTER=bool(center),
                                      WANT_WB=bool(want_params), BLOCK=triton.next_power_of_2(n))
    if not want_params:
        return dx, None, None
    return dx, dw_part.sum(0), db_part.sum(0)
