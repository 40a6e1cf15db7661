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
- ``_bwd_sums_kernel``: ``sum(dy)``, ``sum(dy * u)`` and the p-specific sums in one pass: for L1
  ``sum(sign(u))``, for top-k and the maximum the tie counts against the threshold t (the k-th
  largest |u|): E and G, the deviations at and above t, and their sign sums.
- ``_bwd_apply_kernel``: the elementwise input gradient; for top-k and the maximum each sign is
  weighed by the tie rule (:func:`normbench.kernels.reference.tie_weights`) with a compare
  against t: 1 above it, ``(k - G) / E`` at it, 0 below (for the maximum, tied maxima share).
Top-k statistics (mean, statistic, t) use torch ops (:func:`normbench.kernels.fused._stats_topk`);
t is computed in the arithmetic the kernels recompute ``|x - mu|`` in (float32, float64 for
float64), so their compares with it are exact. The rest runs on these kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# At most this many programs share one channel's reduction (enough to fill a GPU's SMs).
MAX_SPLITS = 256
P_L2, P_L1, P_THRESHOLD = 0, 1, 2  # the kernels' P: top-k and the maximum share P_THRESHOLD


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
def _bwd_sums_kernel(X, G, MEAN, THR, OUT, C, B, N, per_split, n_iter,
                     P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """sum(dy), sum(dy * u); P=1 (L1): sum(sign(u)); P=2 (top-k, the maximum): the tie counts
    against the threshold t, E, S_eq, G, S_gt (how many |u| equal t and their sign sum, how many
    exceed it and theirs)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_dt = OUT.dtype.element_ty
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(MEAN + ch, mask=ch < C, other=0.0)
    thr = tl.load(THR + ch, mask=ch < C, other=0.0)
    sg = tl.zeros([BLOCK_C], dtype=acc_dt)
    sgu = tl.zeros([BLOCK_C], dtype=acc_dt)
    s3 = tl.zeros([BLOCK_C], dtype=acc_dt)
    s4 = tl.zeros([BLOCK_C], dtype=acc_dt)
    s5 = tl.zeros([BLOCK_C], dtype=acc_dt)
    s6 = tl.zeros([BLOCK_C], dtype=acc_dt)
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
            d = tl.abs(u)
            tie = tl.where(mask & (d == thr[:, None]), 1.0, 0.0)
            above = tl.where(mask & (d > thr[:, None]), 1.0, 0.0)
            s3 += tl.sum(tie, axis=1)
            s4 += tl.sum(tie * sgn, axis=1)
            s5 += tl.sum(above, axis=1)
            s6 += tl.sum(above * sgn, axis=1)
    base = pid_s * 6 * C + ch
    tl.store(OUT + base, sg, mask=ch < C)
    tl.store(OUT + base + C, sgu, mask=ch < C)
    tl.store(OUT + base + 2 * C, s3, mask=ch < C)
    tl.store(OUT + base + 3 * C, s4, mask=ch < C)
    tl.store(OUT + base + 4 * C, s5, mask=ch < C)
    tl.store(OUT + base + 5 * C, s6, mask=ch < C)


@triton.jit
def _bwd_apply_kernel(X, G, DX, MEAN, THR, A, K1, K2, K3, K4, C, B, total,
                      P: tl.constexpr, BLOCK: tl.constexpr):
    """dx = a * (g - k1 - term): k1 = sum(dy)/n; term per p from the per-channel K2, K3, K4."""
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
    if P == 2:  # top-k, the maximum: k2 = Ck sum(dy xhat) / k, k3 = sum(sign w) / n, k4 = (k - G) / E
        thr = tl.load(THR + c, mask=mask, other=0.0)
        k4 = tl.load(K4 + c, mask=mask, other=0.0)
        d = tl.abs(u)
        w = tl.where(d > thr, 1.0, tl.where(d == thr, k4, 0.0))
        dx = dx - (sgn * w - k3) * k2
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
    """(mean, raw statistic, threshold or None) per channel of a canonical view: the threshold of
    the tie rule, the k-th largest |x - mu|, for top-k and the maximum (there the statistic)."""
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
    # rounding is monotone, so max - mu and mu - min are exactly the largest rounded |x - mu|
    stat = torch.maximum(high.amax(0) - mean, mean - low.amin(0))
    return mean, stat, stat


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


def _p_code(p: float, threshold) -> int:
    """The kernels' P: 0 = L2, 1 = L1, 2 = top-k and the maximum (a threshold)."""
    return P_THRESHOLD if threshold is not None else (P_L2 if p == 2 else P_L1)


def backward_sums(x3, gy3, mean, scale, threshold, p: float):
    """(sum(dy), sum(dy * xhat), extra) per channel, as :func:`normbench.kernels.fused._backward_moments`:
    extra is sum(sign(u)) for L1, the tie counts (C, 4) [E, S_eq, G, S_gt] for a threshold, else None."""
    code = _p_code(p, threshold)
    thr = mean if threshold is None else threshold
    part = _reduce_launch(_bwd_sums_kernel, x3, 6, gy3, mean.contiguous(), thr.contiguous(), P=code)
    sums = part.sum(0)
    sum_g, sum_gx = sums[0], sums[1] / scale
    if code == P_L1:
        return sum_g, sum_gx, sums[2]
    if code == P_L2:
        return sum_g, sum_gx, None
    return sum_g, sum_gx, part[:, 2:].double().sum(0).t()  # counts exact in float64 across splits


def backward_apply(x3, gy3, mean, scale, weight, sum_g, sum_gx, coef, sign_mean, threshold, weq, p, n):
    """The input gradient, as :func:`normbench.kernels.fused._backward_apply`."""
    code = _p_code(p, threshold)
    a = 1.0 / scale if weight is None else weight.to(scale.dtype) / scale
    k1 = sum_g / n
    if code == P_L2:
        k2, k3 = sum_gx / (n * scale), sum_g
    else:
        k2, k3 = coef.to(scale.dtype), sign_mean.to(scale.dtype)
    thr = mean if threshold is None else threshold
    k4 = k3 if weq is None else weq
    dx = torch.empty_like(x3)
    total = x3.numel()
    block = 1024
    _bwd_apply_kernel[(triton.cdiv(total, block),)](
        x3, gy3, dx, mean.contiguous(), thr.contiguous(), a.contiguous(),
        k1.contiguous(), k2.contiguous(), k3.contiguous(), k4.contiguous(), x3.shape[1], x3.shape[2], total,
        P=code, BLOCK=block)
    return dx
