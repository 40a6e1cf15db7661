"""Triton kernels for fused Lp batch-norm on CUDA (tested on the CPU under ``TRITON_INTERPRET=1``).

Every kernel works on the canonical (A, C, B) view of :func:`normbench.kernels.fused.canonical`,
which is contiguous: element ``(a, c, b)`` sits at ``(a * C + c) * B + b``. A reduction program
owns a tile of channels and a slice of the ``A * B`` positions of each: for contiguous NCHW input
(B large) one channel and a run of B-contiguous positions, for channels_last (B = 1) a run of
contiguous channels and rows. Partial results of the slices are combined by a few torch ops on
(splits, C) tensors. Accumulation is in float32 (float64 for float64 input).

- ``_stats_kernel``: sum, max and min per channel (L-inf: one pass), or Welford mean and M2 (L2:
  one pass); L1 runs it for the mean, then ``_absdev_kernel`` for ``sum |x - mu|``.
- ``_apply_kernel``: ``y = x * a[c] + b[c]``.
- ``_bwd_sums_kernel``: ``sum(dy)``, ``sum(dy * u)`` and the p-specific sums in one pass.
- ``_bwd_apply_kernel``: the elementwise input gradient.
Top-k statistics use torch ops (:func:`normbench.kernels.fused._stats_topk`), the rest these kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# At most this many programs share one channel's reduction (enough to fill a GPU's SMs).
MAX_SPLITS = 256
P_L2, P_L1, P_MAX, P_TOPK = 0, 1, 2, 3


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(a_len: int, c: int, b_len: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_I, splits): a channel tile, a tile of positions, and how many slices of the
    A * B positions each channel is cut into (enough programs to fill a GPU)."""
    if b_len >= 64:
        block_c, block_i = 1, 1024
    else:
        block_c = min(64, triton.next_power_of_2(c))
        block_i = max(16, 2048 // block_c)
    n = a_len * b_len
    splits = max(1, min(MAX_SPLITS, triton.cdiv(n, block_i), triton.cdiv(1024, triton.cdiv(c, block_c))))
    return block_c, block_i, splits


@triton.jit
def _tile_offsets(pid_c, pid_s, it, C, B, N, per_split, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i = pid_s * per_split + it * BLOCK_I + tl.arange(0, BLOCK_I)
    a = i // B
    b = i - a * B
    offs = (a[None, :] * C + ch[:, None]) * B + b[None, :]
    mask = (ch[:, None] < C) & (i[None, :] < N) & (i[None, :] < (pid_s + 1) * per_split)
    return ch, offs, mask


@triton.jit
def _stats_kernel(X, OUT, C, B, N, per_split, n_iter,
                  WELFORD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_dt = OUT.dtype.element_ty
    s0 = tl.zeros([BLOCK_C], dtype=acc_dt)  # sum, or Welford count
    s1 = tl.zeros([BLOCK_C], dtype=acc_dt) + float("-inf")  # max, or Welford mean
    s2 = tl.zeros([BLOCK_C], dtype=acc_dt) + float("inf")  # min, or Welford M2
    if WELFORD:
        s1 = tl.zeros([BLOCK_C], dtype=acc_dt)
        s2 = tl.zeros([BLOCK_C], dtype=acc_dt)
    for it in range(n_iter):
        ch, offs, mask = _tile_offsets(pid_c, pid_s, it, C, B, N, per_split, BLOCK_C, BLOCK_I)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_dt)
        if WELFORD:
            cnt = tl.sum(mask.to(acc_dt), axis=1)
            safe = tl.maximum(cnt, 1.0)
            bmean = tl.sum(x, axis=1) / safe
            d = tl.where(mask, x - bmean[:, None], 0.0)
            bm2 = tl.sum(d * d, axis=1)
            tot = s0 + cnt
            delta = bmean - s1
            frac = tl.where(tot > 0, cnt / tl.maximum(tot, 1.0), 0.0)
            s1 = s1 + delta * frac
            s2 = s2 + bm2 + delta * delta * s0 * frac
            s0 = tot
        else:
            s0 += tl.sum(x, axis=1)
            s1 = tl.maximum(s1, tl.max(tl.where(mask, x, float("-inf")), axis=1))
            s2 = tl.minimum(s2, tl.min(tl.where(mask, x, float("inf")), axis=1))
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    base = pid_s * 3 * C + ch
    tl.store(OUT + base, s0, mask=ch < C)
    tl.store(OUT + base + C, s1, mask=ch < C)
    tl.store(OUT + base + 2 * C, s2, mask=ch < C)


@triton.jit
def _absdev_kernel(X, MEAN, OUT, C, B, N, per_split, n_iter, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_dt = OUT.dtype.element_ty
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(MEAN + ch, mask=ch < C, other=0.0)
    acc = tl.zeros([BLOCK_C], dtype=acc_dt)
    for it in range(n_iter):
        ch, offs, mask = _tile_offsets(pid_c, pid_s, it, C, B, N, per_split, BLOCK_C, BLOCK_I)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_dt)
        acc += tl.sum(tl.where(mask, tl.abs(x - mean[:, None]), 0.0), axis=1)
    tl.store(OUT + pid_s * C + ch, acc, mask=ch < C)  # OUT rows: one per split


@triton.jit
def _apply_kernel(X, Y, A, BSH, C, B, total, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    c = (e // B) % C
    a = tl.load(A + c, mask=mask, other=0.0)
    b = tl.load(BSH + c, mask=mask, other=0.0)
    x = tl.load(X + e, mask=mask, other=0.0).to(a.dtype)
    tl.store(Y + e, (x * a + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums_kernel(X, G, MEAN, STAT, OUT, C, B, N, per_split, n_iter,
                     P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_dt = OUT.dtype.element_ty
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(MEAN + ch, mask=ch < C, other=0.0)
    stat = tl.load(STAT + ch, mask=ch < C, other=0.0)
    sg = tl.zeros([BLOCK_C], dtype=acc_dt)
    sgu = tl.zeros([BLOCK_C], dtype=acc_dt)
    s3 = tl.zeros([BLOCK_C], dtype=acc_dt)
    s4 = tl.zeros([BLOCK_C], dtype=acc_dt)
    for it in range(n_iter):
        ch, offs, mask = _tile_offsets(pid_c, pid_s, it, C, B, N, per_split, BLOCK_C, BLOCK_I)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc_dt)
        g = tl.load(G + offs, mask=mask, other=0.0).to(acc_dt)
        u = tl.where(mask, x - mean[:, None], 0.0)
        sg += tl.sum(g, axis=1)
        sgu += tl.sum(g * u, axis=1)
        sgn = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
        if P == 1:
            s3 += tl.sum(sgn, axis=1)
        if P == 2:
            tie = tl.where(mask & (tl.abs(u) == stat[:, None]), 1.0, 0.0)
            s3 += tl.sum(tie * sgn, axis=1)
            s4 += tl.sum(tie, axis=1)
    base = pid_s * 4 * C + ch
    tl.store(OUT + base, sg, mask=ch < C)
    tl.store(OUT + base + C, sgu, mask=ch < C)
    tl.store(OUT + base + 2 * C, s3, mask=ch < C)
    tl.store(OUT + base + 3 * C, s4, mask=ch < C)


@triton.jit
def _bwd_apply_kernel(X, G, DX, MEAN, STAT, A, K1, K2, K3, C, B, total,
                      P: tl.constexpr, BLOCK: tl.constexpr):
    """dx = a * (g - k1 - term): k1 = sum(dy)/n; term per p from the per-channel K2, K3."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    c = (e // B) % C
    a = tl.load(A + c, mask=mask, other=0.0)
    acc_dt = a.dtype
    mean = tl.load(MEAN + c, mask=mask, other=0.0)
    k1 = tl.load(K1 + c, mask=mask, other=0.0)
    k2 = tl.load(K2 + c, mask=mask, other=0.0)
    k3 = tl.load(K3 + c, mask=mask, other=0.0)
    x = tl.load(X + e, mask=mask, other=0.0).to(acc_dt)
    g = tl.load(G + e, mask=mask, other=0.0).to(acc_dt)
    u = x - mean
    sgn = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    dx = g - k1
    if P == 0:  # L2: k2 = sum(dy u) / (n D)
        dx = dx - u * k2
    if P == 1:  # L1: k2 = C1 sum(dy xhat) / n, k3 = sum(sign) / n
        dx = dx - (sgn - k3) * k2
    if P == 2:  # max: k2 = Cinf sum(dy xhat) / ties, k3 = sum(sign over ties) / n
        stat = tl.load(STAT + c, mask=mask, other=0.0)
        tie = tl.where(tl.abs(u) == stat, 1.0, 0.0)
        dx = dx - (tie * sgn - k3) * k2
    if P == 3:  # top-k: k3 = the channel mean of its term (its k positions added by scatter)
        dx = dx + k3
    tl.store(DX + e, (dx * a).to(DX.dtype.element_ty), mask=mask)


def _reduce_launch(kernel, x3: torch.Tensor, out_rows: int, *args, **meta) -> torch.Tensor:
    a_len, c, b_len = x3.shape
    n = a_len * b_len
    block_c, block_i, splits = _tiles(a_len, c, b_len)
    per_split = triton.cdiv(triton.cdiv(n, splits), block_i) * block_i
    splits = triton.cdiv(n, per_split)
    out = torch.empty(splits, out_rows, c, device=x3.device, dtype=_acc_dtype(x3.dtype))
    grid = (triton.cdiv(c, block_c), splits)
    kernel[grid](x3, *args, out, c, b_len, n, per_split, per_split // block_i,
                 BLOCK_C=block_c, BLOCK_I=block_i, **meta)
    return out


def statistics(x3: torch.Tensor, p: float, k: int | None):
    """(mean, raw statistic, top-k positions or None) per channel of a canonical view."""
    if k is not None:
        from normbench.kernels.fused import _stats_topk

        return _stats_topk(x3, k)
    n = x3.shape[0] * x3.shape[2]
    if p == 2:
        cnt, mean_s, m2_s = _reduce_launch(_stats_kernel, x3, 3, WELFORD=True).unbind(1)
        mean = (cnt * mean_s).sum(0) / n
        var = (m2_s + cnt * (mean_s - mean) ** 2).sum(0) / n
        return mean, var, None
    total, high, low = _reduce_launch(_stats_kernel, x3, 3, WELFORD=False).unbind(1)
    mean = total.sum(0) / n
    if p == 1:
        return mean, _reduce_launch(_absdev_kernel, x3, 1, mean.contiguous())[:, 0].sum(0) / n, None
    return mean, torch.maximum(high.amax(0) - mean, mean - low.amin(0)), None


def apply(x3: torch.Tensor, mean, scale, weight, bias) -> torch.Tensor:
    """``y = weight * (x - mean) / scale + bias`` as one multiply-add per element."""
    a = 1.0 / scale if weight is None else weight.to(scale.dtype) / scale
    b = -mean * a if bias is None else bias.to(scale.dtype) - mean * a
    y = torch.empty_like(x3)
    total = x3.numel()
    block = 1024
    _apply_kernel[(triton.cdiv(total, block),)](x3, y, a.contiguous(), b.contiguous(), x3.shape[1], x3.shape[2],
                                                total, BLOCK=block)
    return y


def _p_code(p: float, k: int | None) -> int:
    if k is not None:
        return P_TOPK
    return {2.0: P_L2, 1.0: P_L1, math.inf: P_MAX}[p]


def backward_sums(x3, gy3, mean, scale, stat, p: float, k: int | None):
    """(sum(dy), sum(dy * xhat), s3, s4) per channel, as :func:`normbench.kernels.fused._backward_moments`."""
    code = _p_code(p, k)
    # the kernel's P selects the extra sums: 1 = sign (L1), 2 = ties (max); others none
    extra = {P_L1: 1, P_MAX: 2}.get(code, 0)
    part = _reduce_launch(_bwd_sums_kernel, x3, 4, gy3, mean.contiguous(), stat.contiguous(), P=extra).sum(0)
    sum_g, sum_gu, s3, s4 = part.unbind(0)
    if extra == 0:
        s3 = s4 = sum_g
    elif extra == 1:
        s4 = sum_g
    return sum_g, sum_gu / scale, s3, s4


def backward_apply(x3, gy3, mean, scale, stat, weight, sum_g, sum_gx, s3, s4, p, const, n, topk):
    """The input gradient, as :func:`normbench.kernels.fused._backward_apply`."""
    code = P_TOPK if topk else _p_code(p, None)
    a = 1.0 / scale if weight is None else weight.to(scale.dtype) / scale
    k1 = sum_g / n
    if code == P_L2:
        k2, k3 = sum_gx / (n * scale), sum_g
    elif code == P_L1:
        k2, k3 = const * sum_gx / n, s3 / n
    elif code == P_MAX:
        k2, k3 = const * sum_gx / s4, s3 / n
    else:
        k2, k3 = sum_g, s3 / n
    dx = torch.empty_like(x3)
    total = x3.numel()
    block = 1024
    _bwd_apply_kernel[(triton.cdiv(total, block),)](
        x3, gy3, dx, mean.contiguous(), stat.contiguous(), a.contiguous(),
        k1.contiguous(), k2.contiguous(), k3.contiguous(), x3.shape[1], x3.shape[2], total, P=code, BLOCK=block)
    return dx
