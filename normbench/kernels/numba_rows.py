"""CPU kernels for the fused Lp row norms (layer-norm, RMS-norm, group-norm), compiled by numba.

A row is the values one statistic reduces over: the last dimensions of a layer-norm's input, a
group's channels and positions of a group-norm's. Rows arrive as a contiguous (R, 1, n) view (the
scalar helpers of :mod:`normbench.kernels.numba_common` index three dimensions); each thread owns
a stretch of adjacent rows and makes every pass over a row before the next, so a row of up to 16k
values (64 KB in float32) stays in the L2 cache between passes: forward reads x from memory once
and writes y once; backward reads x and dy once and writes dx once. Per-row sums accumulate in
float32 (float64 for float64 input) with reassociation, so the loops vectorize.

Forward, per row (``u = x - mu``, or ``u = x`` without centering):

- the mean (one pass), then the statistic over the row in cache: the mean of ``u^2`` (L2) or of
  ``|u|`` (L1), the maximum ``|u|`` (L-inf), or the k largest ``|u|`` (top-k: chunks of 16 values
  whose vectorized maximum beats the k-th largest so far are inserted value by value; k above 32
  by a partition of the row's deviations);
- ``y = u * (weight / D) + bias``.

It keeps, per row, the mean, D and for L-inf and top-k the threshold t (the k-th largest ``|u|``,
in the arithmetic backward recomputes ``|u|`` in, so that backward's compares with it are exact).

Backward, per row, one reduction pass over x and dy (``sum(g)``, ``sum(g u)``, and the sum of
``u`` (L2), of ``sign(u)`` (L1), or the tie counts against t (L-inf, top-k): G and E, the
deviations above and at t, and their sign sums), then one elementwise pass:

    dx = (g - coef * term(u)) / D - mean over the row of the same   (the mean only with centering)

with ``g = dy * weight``, ``term = u / D`` (L2), ``sign(u)`` (L1), ``sign(u) w`` (top-k: the tie
weights of :func:`normbench.kernels.reference.tie_weights`, 1 above t, ``(k - G) / E`` at it, 0
below). The weight's and bias's gradients are summed in the reduction pass, over each thread's
rows, into per-thread partial rows (in cache), then over threads.

The affine parameters are one row of n values per "weight row": a layer-norm has one (its
elementwise weight); a group-norm one per group (its per-channel weight repeated over the
positions), and row r uses weight row ``r % W``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from normbench.kernels.numba_common import (
    _FASTMATH,
    SUPPORTED,
    _cast,
    _insert,
    _load,
    _maxnum,
    _store,
    as_numpy,
    compile_only,
    launch,
    sync_threads,
    threads,
)

P_L2, P_L1, P_TOPK = 0, 1, 2
_CHUNK = 16  # top-k: values whose vectorized maximum is taken before a value-by-value look
_INSERT_K = 32  # top-k: the largest k kept by insertion rather than found by a partition


@njit(inline="always")
def _chunk_max(x, r, mu, q, end):
    """The largest ``|x[r, q:end] - mu|`` (-1 for no values); a full chunk has a fixed trip count,
    so its loop vectorizes."""
    m = _cast(x, -1.0)
    if end - q == _CHUNK:
        for j in range(_CHUNK):
            m = _maxnum(m, abs(_load(x, r, 0, q + j) - mu))
    else:
        for j in range(q, end):
            m = _maxnum(m, abs(_load(x, r, 0, j) - mu))
    return m


@njit(inline="always")
def _row_topk(x, r, mu, k, top, chunk_top, scratch):
    """The k largest ``|x[r] - mu|`` of row r: their sum and the k-th largest, the threshold t
    (both in float64 from values of x's arithmetic). For k up to ``_INSERT_K``: one vectorized
    pass takes each chunk's largest deviation into ``chunk_top``; the k-th largest of those is a
    floor for t (k values reach it), so only the chunks that reach it are looked at value by
    value, each value that beats the k-th largest so far inserted into ``top``. Larger k: a
    partition of the row's deviations in ``scratch``."""
    n = x.shape[2]
    if k > _INSERT_K:
        for j in range(n):
            scratch[j] = abs(_load(x, r, 0, j) - mu)
        part = np.partition(scratch, n - k)
        total = 0.0
        for j in range(n - k, n):
            total += part[j]
        return total, part[n - k]
    chunks = (n + _CHUNK - 1) // _CHUNK
    for c in range(chunks):
        chunk_top[c] = _chunk_max(x, r, mu, c * _CHUNK, min((c + 1) * _CHUNK, n))
    for i in range(k):
        top[i] = -1.0
    floor = -1.0
    if chunks >= k:
        for c in range(chunks):
            _insert(top, chunk_top[c])
        floor = top[k - 1]
        for i in range(k):
            top[i] = -1.0
    for c in range(chunks):
        if chunk_top[c] >= floor and chunk_top[c] > top[k - 1]:
            for j in range(c * _CHUNK, min((c + 1) * _CHUNK, n)):
                d = abs(_load(x, r, 0, j) - mu)
                if d >= floor:  # no deviation below the floor is among the k largest
                    _insert(top, d)
    total = 0.0
    for i in range(k):
        total += top[i]
    return total, top[k - 1]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward(x, y, w, b, p_code, k, const, eps, center, bounds, mean_out, scale_out, stat_out, thr_out):
    """Normalize every row of x (R, 1, n) into y; per row the mean, D, the raw statistic and (top-k,
    L-inf) the threshold, in float64. Rows ``bounds[t]:bounds[t + 1]`` are thread t's."""
    n = x.shape[2]
    n_w = w.shape[0]
    for t in prange(bounds.shape[0] - 1):
        top = np.empty(max(k, 1))
        chunk_top = np.empty((n + _CHUNK - 1) // _CHUNK if p_code == P_TOPK else 0)
        scratch = np.empty(n if (p_code == P_TOPK and k > _INSERT_K) else 0)
        for r in range(bounds[t], bounds[t + 1]):
            mu = _cast(x, 0.0)
            if center:
                s = _cast(x, 0.0)
                for j in range(n):
                    s += _load(x, r, 0, j)
                mu = _cast(x, s / n)
            if p_code == P_TOPK:
                if k == 1:
                    m = _cast(x, -1.0)
                    for j in range(n):
                        m = _maxnum(m, abs(_load(x, r, 0, j) - mu))
                    stat = np.float64(m)  # as backward recomputes |u|: the compares with t are exact
                    thr = stat
                else:
                    total, thr = _row_topk(x, r, mu, k, top, chunk_top, scratch)
                    stat = total / k
                scale = stat * const + eps
            else:
                acc = _cast(x, 0.0)
                if p_code == P_L2:
                    for j in range(n):
                        u = _load(x, r, 0, j) - mu
                        acc += u * u
                else:
                    for j in range(n):
                        acc += abs(_load(x, r, 0, j) - mu)
                stat = np.float64(acc) / n
                thr = -1.0
                scale = math.sqrt(stat + eps) if p_code == P_L2 else stat * const + eps
            inv = _cast(x, 1.0 / scale)
            wr, br = w[r % n_w], b[r % n_w]
            for j in range(n):
                _store(y, r, 0, j, (_load(x, r, 0, j) - mu) * (inv * wr[j]) + br[j])
            mean_out[r] = mu
            scale_out[r] = scale
            stat_out[r] = stat
            thr_out[r] = thr


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward(x, g, dx, w, mean, scale, thr, p_code, k, const, center, bounds, dw_part, db_part):
    """dx of every row (see the module docstring); the weight's and bias's gradients summed over
    thread t's rows into ``dw_part[t]`` and ``db_part[t]`` ((W, n) each), in the reduction pass."""
    n = x.shape[2]
    n_w = w.shape[0]
    for t in prange(bounds.shape[0] - 1):
        for i in range(n_w):
            for j in range(n):
                dw_part[t, i, j] = 0.0
                db_part[t, i, j] = 0.0
        for r in range(bounds[t], bounds[t + 1]):
            mu = _cast(x, mean[r])
            inv = _cast(x, 1.0 / scale[r])
            t_r = _cast(x, thr[r])
            wr = w[r % n_w]
            dwr, dbr = dw_part[t, r % n_w], db_part[t, r % n_w]  # the weight's and bias's gradients
            s_g = _cast(x, 0.0)
            s_gu = _cast(x, 0.0)
            s_x = _cast(x, 0.0)  # L2: sum(u); L1: sum(sign(u))
            n_eq = s_eq = n_gt = s_gt = 0
            if p_code == P_L2:
                for j in range(n):
                    gy = _load(g, r, 0, j)
                    gv = gy * wr[j]
                    u = _load(x, r, 0, j) - mu
                    s_g += gv
                    s_gu += gv * u
                    s_x += u
                    dwr[j] += gy * (u * inv)
                    dbr[j] += gy
            elif p_code == P_L1:
                for j in range(n):
                    gy = _load(g, r, 0, j)
                    gv = gy * wr[j]
                    u = _load(x, r, 0, j) - mu
                    s_g += gv
                    s_gu += gv * u
                    s_x += _cast(x, u > 0) - _cast(x, u < 0)
                    dwr[j] += gy * (u * inv)
                    dbr[j] += gy
            else:
                for j in range(n):
                    gy = _load(g, r, 0, j)
                    gv = gy * wr[j]
                    u = _load(x, r, 0, j) - mu
                    s_g += gv
                    s_gu += gv * u
                    dwr[j] += gy * (u * inv)
                    dbr[j] += gy
                    d = abs(u)
                    sg = np.int64(u > 0) - np.int64(u < 0)
                    eq = np.int64(d == t_r)
                    gt = np.int64(d > t_r)
                    n_eq += eq
                    s_eq += sg * eq
                    n_gt += gt
                    s_gt += sg * gt
            mgy = np.float64(s_gu) / scale[r] / n  # mean(g * xhat)
            weq = 0.0
            if p_code == P_L2:
                coef = mgy / scale[r]  # the term is u: g - xhat mean(g xhat) = g - u (mgy / D)
                term_sum = np.float64(s_x)
            elif p_code == P_L1:
                coef = const * mgy
                term_sum = np.float64(s_x)
            else:
                coef = const * n / k * mgy
                weq = (k - n_gt) / max(n_eq, 1)  # E = 0 only for NaN input, where nothing compares
                term_sum = s_gt + s_eq * weq
            shift = (np.float64(s_g) - coef * term_sum) / scale[r] / n if center else 0.0
            c_u = _cast(x, coef)
            c_at = _cast(x, 0.0 if thr[r] == 0 else coef * weq)  # ties at t = 0 have sign 0
            sh = _cast(x, shift)
            if p_code == P_L2:
                for j in range(n):
                    gv = _load(g, r, 0, j) * wr[j]
                    u = _load(x, r, 0, j) - mu
                    _store(dx, r, 0, j, (gv - u * c_u) * inv - sh)
            elif p_code == P_L1:
                for j in range(n):
                    gv = _load(g, r, 0, j) * wr[j]
                    u = _load(x, r, 0, j) - mu
                    sgn = _cast(x, u > 0) - _cast(x, u < 0)
                    _store(dx, r, 0, j, (gv - sgn * c_u) * inv - sh)
            else:
                for j in range(n):
                    gv = _load(g, r, 0, j) * wr[j]
                    u = _load(x, r, 0, j) - mu
                    d = abs(u)
                    cf = c_u if d > t_r else (c_at if d == t_r else c_u - c_u)
                    signed = -cf if u < 0 else cf
                    _store(dx, r, 0, j, (gv - signed) * inv - sh)


# ----------------------------------------------------------------------------- torch entry points
def supports(x: torch.Tensor) -> bool:
    """Whether these kernels take this tensor (CPU, float32/float64/bfloat16)."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED


def _p_code(p: float, k: int | None) -> int:
    return P_TOPK if (k is not None or p == math.inf) else (P_L2 if p == 2 else P_L1)


def _acc(dtype: torch.dtype) -> type:
    return np.float64 if dtype == torch.float64 else np.float32


def _bounds(rows: int) -> np.ndarray:
    """Row bounds of the threads' stretches: one stretch a thread (each keeps partial weight
    gradients of W x n values, so more stretches would cost more than the balance they buy)."""
    count = max(1, min(rows, threads()))
    return np.linspace(0, rows, count + 1).astype(np.int64)


def _affine_rows(t: torch.Tensor | None, fill: float, n: int, acc: type, rows: int) -> np.ndarray:
    """A parameter as (rows, n) values of the arithmetic type (``fill`` without one)."""
    if t is None:
        return np.full((rows, n), fill, acc)
    cdt = torch.float64 if acc is np.float64 else torch.float32
    return t.detach().to(cdt).reshape(rows, n).contiguous().numpy()


def _param_rows(weight: torch.Tensor | None, bias: torch.Tensor | None) -> int:
    """W, the rows of the parameters (the same for both where both are given)."""
    for t in (weight, bias):
        if t is not None:
            return t.shape[0]
    return 1


def forward(x3: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, p: float,
            k: int | None, const: float, eps: float, center: bool):
    """``(y3, mean, scale, threshold)`` for rows x3 (R, 1, n), contiguous: the output in x's dtype
    and per row (float64) the mean (0 without centering), D and the threshold (-1 unless L-inf
    or top-k). ``weight`` and ``bias`` are (W, n) (float32 or float64 values) or None."""
    sync_threads()
    rows, _, n = x3.shape
    acc = _acc(x3.dtype)
    kk = 1 if k is None else k
    y3 = torch.empty_like(x3)
    rows_w = _param_rows(weight, bias)
    w = _affine_rows(weight, 1.0, n, acc, rows_w)
    b = _affine_rows(bias, 0.0, n, acc, rows_w)
    mean, scale, stat, thr = (np.empty(rows) for _ in range(4))
    launch(_forward, as_numpy(x3), as_numpy(y3), w, b, _p_code(p, k), kk, float(const), float(eps), bool(center),
           _bounds(rows), mean, scale, stat, thr)
    return y3, torch.from_numpy(mean), torch.from_numpy(scale), torch.from_numpy(thr)


def backward(x3: torch.Tensor, gy3: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
             scale: torch.Tensor, threshold: torch.Tensor, p: float, k: int | None, const: float,
             center: bool, want_params: bool, param_rows: int = 1):
    """``(dx3, dweight, dbias)``: the input gradient in x's dtype and, with ``want_params``, the
    gradients of a (W, n) weight and bias (W = ``param_rows``) as float64 (W, n) arrays (else
    None, None)."""
    sync_threads()
    rows, _, n = x3.shape
    acc = _acc(x3.dtype)
    kk = 1 if k is None else k
    dx3 = torch.empty_like(x3)
    w = _affine_rows(weight, 1.0, n, acc, param_rows)
    bounds = _bounds(rows)
    shape = (len(bounds) - 1, w.shape[0], n)  # summed in the reduction pass even when not wanted: no branch there
    dw_part, db_part = np.empty(shape, acc), np.empty(shape, acc)
    launch(_backward, as_numpy(x3), as_numpy(gy3), as_numpy(dx3), w, mean.numpy(), scale.numpy(), threshold.numpy(),
           _p_code(p, k), kk, float(const), bool(center), bounds, dw_part, db_part)
    if not want_params:
        return dx3, None, None
    return dx3, dw_part.sum(0, dtype=np.float64), db_part.sum(0, dtype=np.float64)


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) both kernels for ``dtype`` without running them:
    the job of :func:`normbench.kernels.fused_rows.kernels_ready`."""
    with compile_only():
        x3 = torch.zeros(2, 1, 3, dtype=dtype)
        y3, mean, scale, thr = forward(x3, None, None, 2.0, None, 1.0, 1e-5, True)
        backward(x3, x3, None, mean, scale, thr, 2.0, None, 1.0, True, True)
        backward(x3, x3, None, mean, scale, thr, 2.0, None, 1.0, True, False)
