"""CPU kernels for the fused Lp row norms (layer-norm, RMS-norm, group-norm), compiled by numba.

A row is the values one statistic reduces over: the last dimensions of a layer-norm's input, a
group's channels and positions of a group-norm's. Rows arrive as a contiguous (R, 1, n) view (the
scalar helpers of :mod:`normbench.kernels.numba_common` index three dimensions); each thread owns
a stretch of adjacent rows and makes every pass over a row before the next, so a row of up to 16k
values (64 KB in float32) stays in the L2 cache between passes: forward reads x from memory once
and writes y once; backward reads x and dy once and writes dx once. Per-row sums accumulate in
float32 (float64 for float64 input) with reassociation, so the loops vectorize.

The pass that reads a row from memory runs in the same loop as the previous row's last pass, the
one that writes: forward sums row r + 1 while it writes row r's y, backward makes row r + 1's
reduction pass while it writes row r's dx. One thread then keeps reads and writes in flight
together, as a copy does; with the passes one after the other, memory sat idle during the passes
from cache and the kernels ran at about 60% of the copy bandwidth (4096 x 1024 float32, one
thread: forward 2.9 ms before, 2.0-2.4 ms after; backward 4.4 ms before, 3.5 ms after).

Forward, per row (``u = x - mu``, or ``u = x`` without centering):

- the mean (the pass from memory; without centering it only brings the row into cache), then the
  statistic over the row in cache: the mean of ``u^2`` (L2) or of
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

import functools
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
    _tie_step,
    as_numpy,
    compile_only,
    launch,
    sync_threads,
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
def _forward(x, y, w, b, p_code, k, const, eps, center, bounds, stats):
    """Normalize every row of x (R, 1, n) into y; per row r the mean, D and (top-k, L-inf) the
    threshold into ``stats[0:3, r]`` (float64). Rows ``bounds[t]:bounds[t + 1]`` are thread t's.
    The pass that reads row r + 1 from memory, its sum, runs in the loop that writes row r's y
    (see the module docstring); without centering the sum only brings the row into cache."""
    n = x.shape[2]
    n_w = w.shape[0]
    for t in prange(bounds.shape[0] - 1):
        lo, hi = bounds[t], bounds[t + 1]
        top = np.empty(max(k, 1))
        chunk_top = np.empty((n + _CHUNK - 1) // _CHUNK if p_code == P_TOPK else 0)
        scratch = np.empty(n if (p_code == P_TOPK and k > _INSERT_K) else 0)
        total = _cast(x, 0.0)
        if lo < hi:
            for j in range(n):
                total += _load(x, lo, 0, j)
        for r in range(lo, hi):
            mu = _cast(x, total / n) if center else _cast(x, 0.0)
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
            q = min(r + 1, hi - 1)  # the next row (the last row sums itself again, from cache)
            total = _cast(x, 0.0)
            for j in range(n):
                total += _load(x, q, 0, j)
                _store(y, r, 0, j, (_load(x, r, 0, j) - mu) * (inv * wr[j]) + br[j])
            stats[0, r] = mu
            stats[1, r] = scale
            stats[2, r] = thr


@njit(inline="always")
def _reduce_step(x, p_code, gv, u, t_r, sums):
    """One value's share of a row's backward sums: ``sum(g)``, ``sum(g u)``, and ``sum(u)`` (L2),
    ``sum(sign(u))`` (L1) or the tie counts against t (top-k, L-inf), as the tuple ``sums``."""
    s_g, s_gu, s_x, n_eq, s_eq, n_gt, s_gt = sums
    s_g += gv
    s_gu += gv * u
    if p_code == P_L2:
        s_x += u
    elif p_code == P_L1:
        s_x += _cast(x, u > 0) - _cast(x, u < 0)
    else:
        n_eq, s_eq, n_gt, s_gt = _tie_step(u, t_r, n_eq, s_eq, n_gt, s_gt)
    return s_g, s_gu, s_x, n_eq, s_eq, n_gt, s_gt


@njit(inline="always")
def _dx_value(x, p_code, gv, u, t_r, c_u, c_at, inv, sh):
    """One value's input gradient ``(g - coef * term(u)) / D - shift`` (module docstring)."""
    if p_code == P_L2:
        return (gv - u * c_u) * inv - sh
    if p_code == P_L1:
        return (gv - (_cast(x, u > 0) - _cast(x, u < 0)) * c_u) * inv - sh
    d = abs(u)
    cf = c_u if d > t_r else (c_at if d == t_r else c_u - c_u)
    return (gv - (-cf if u < 0 else cf)) * inv - sh


@njit(inline="always")
def _row_pass(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, p_code, write_dx, reduce_q):
    """One loop over the values of a row: row r's elementwise pass (``write_dx``, with its
    coefficients ``coefs``) and row q's reduction pass (``reduce_q``, adding to its partial weight
    and bias gradient rows), returning q's sums. Inlined: where ``p_code``, ``write_dx`` and
    ``reduce_q`` are constants (:func:`_row_pass_p`) the call site is a loop with no branch inside;
    a stretch's first and last row pass ``p_code`` as it comes (one loop for every p)."""
    n, n_w = x.shape[2], w.shape[0]
    c_u, c_at, sh = coefs
    mu, inv, t_r, wr = _cast(x, stats[0, r]), _cast(x, 1.0 / stats[1, r]), _cast(x, stats[2, r]), w[r % n_w]
    mu_q, inv_q, t_q, wq = _cast(x, stats[0, q]), _cast(x, 1.0 / stats[1, q]), _cast(x, stats[2, q]), w[q % n_w]
    dwq, dbq = dw_rows[q % n_w], db_rows[q % n_w]
    zero = _cast(x, 0.0)
    sums = (zero, zero, zero, 0, 0, 0, 0)
    for j in range(n):
        if write_dx:
            u = _load(x, r, 0, j) - mu
            _store(dx, r, 0, j, _dx_value(x, p_code, _load(g, r, 0, j) * wr[j], u, t_r, c_u, c_at, inv, sh))
        if reduce_q:
            gy = _load(g, q, 0, j)
            u = _load(x, q, 0, j) - mu_q
            sums = _reduce_step(x, p_code, gy * wq[j], u, t_q, sums)
            dwq[j] += gy * (u * inv_q)
            dbq[j] += gy
    return sums


@njit(inline="always")
def _row_pass_p(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, p_code, write_dx, reduce_q):
    """:func:`_row_pass` with ``p_code`` made a constant at each of its three call sites (the
    loop of every row but a stretch's first and last)."""
    if p_code == P_L2:
        return _row_pass(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, P_L2, write_dx, reduce_q)
    if p_code == P_L1:
        return _row_pass(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, P_L1, write_dx, reduce_q)
    if write_dx and reduce_q:  # top-k, L-inf: with their compares with t, two loops ran faster than one
        _row_pass(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, P_TOPK, True, False)
        return _row_pass(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, P_TOPK, False, True)
    return _row_pass(x, g, dx, w, stats, dw_rows, db_rows, r, coefs, q, P_TOPK, write_dx, reduce_q)


@njit(inline="always")
def _coefficients(x, p_code, k, const, center, n, scale, thr, sums):
    """Row coefficients of the elementwise pass from its sums: (coef, coef at t, shift), in x's
    arithmetic type."""
    s_g, s_gu, s_x, n_eq, s_eq, n_gt, s_gt = sums
    mgy = np.float64(s_gu) / scale / n  # mean(g * xhat)
    weq = 0.0
    if p_code == P_L2:
        coef = mgy / scale  # the term is u: g - xhat mean(g xhat) = g - u (mgy / D)
        term_sum = np.float64(s_x)
    elif p_code == P_L1:
        coef = const * mgy
        term_sum = np.float64(s_x)
    else:
        coef = const * n / k * mgy
        weq = (k - n_gt) / max(n_eq, 1)  # E = 0 only for NaN input, where nothing compares
        term_sum = s_gt + s_eq * weq
    shift = (np.float64(s_g) - coef * term_sum) / scale / n if center else 0.0
    return _cast(x, coef), _cast(x, 0.0 if thr == 0 else coef * weq), _cast(x, shift)  # ties at t = 0 have sign 0


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward(x, g, dx, w, stats, p_code, k, const, center, bounds, dw_part, db_part, dwb):
    """dx of every row (see the module docstring), from forward's ``stats``; the weight's and
    bias's gradients summed over thread t's rows into ``dw_part[t]`` and ``db_part[t]`` ((W, n)
    each) in the reduction pass, then over the threads into ``dwb[0]`` and ``dwb[1]`` (float64).
    The reduction pass of row r + 1 runs in the loop that writes row r's dx."""
    n = x.shape[2]
    n_w = w.shape[0]
    for t in prange(bounds.shape[0] - 1):
        for i in range(n_w):
            for j in range(n):
                dw_part[t, i, j] = 0.0
                db_part[t, i, j] = 0.0
        lo, hi = bounds[t], bounds[t + 1]
        if lo == hi:
            continue
        none = (_cast(x, 0.0), _cast(x, 0.0), _cast(x, 0.0))
        # the first and the last row of a stretch take one loop for every p (fewer loops to compile)
        sums = _row_pass(x, g, dx, w, stats, dw_part[t], db_part[t], lo, none, lo, p_code, False, True)
        for r in range(lo, hi):
            coefs = _coefficients(x, p_code, k, const, center, n, stats[1, r], stats[2, r], sums)
            if r + 1 < hi:
                sums = _row_pass_p(x, g, dx, w, stats, dw_part[t], db_part[t], r, coefs, r + 1, p_code, True, True)
            else:
                _row_pass(x, g, dx, w, stats, dw_part[t], db_part[t], r, coefs, r, p_code, True, False)

    for i in range(n_w):  # after the parallel loop: on the calling thread
        for j in range(n):
            sw = 0.0
            sb = 0.0
            for t in range(bounds.shape[0] - 1):
                sw += dw_part[t, i, j]
                sb += db_part[t, i, j]
            dwb[0, i, j] = sw
            dwb[1, i, j] = sb


# ----------------------------------------------------------------------------- torch entry points
def supports(x: torch.Tensor) -> bool:
    """Whether these kernels take this tensor (CPU, float32/float64/bfloat16)."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED


def _p_code(p: float, k: int | None) -> int:
    return P_TOPK if (k is not None or p == math.inf) else (P_L2 if p == 2 else P_L1)


def _acc(dtype: torch.dtype) -> type:
    return np.float64 if dtype == torch.float64 else np.float32


@functools.lru_cache(maxsize=256)
def _bounds(rows: int, threads: int) -> np.ndarray:
    """Row bounds of the threads' stretches: one stretch a thread (each keeps partial weight
    gradients of W x n values, so more stretches would cost more than the balance they buy).
    Cached, as every call's fixed cost counts: the kernels only read it."""
    count = max(1, min(rows, threads))
    return np.array([rows * t // count for t in range(count + 1)], dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _filled(fill: float, rows: int, n: int, acc: type) -> np.ndarray:
    """The (rows, n) values of a missing parameter (cached; the kernels only read them)."""
    return np.full((rows, n), fill, acc)


def _affine_rows(t: torch.Tensor | None, fill: float, n: int, acc: type, rows: int) -> np.ndarray:
    """A (rows, n) parameter as values of the arithmetic type (``fill`` without one): a view of a
    float32 (float64) contiguous parameter, a copy otherwise."""
    if t is None:
        return _filled(fill, rows, n, acc)
    cdt = torch.float64 if acc is np.float64 else torch.float32
    t = t.detach()
    if t.dtype != cdt or not t.is_contiguous():  # guarded: even a no-op ``to`` costs microseconds a call
        t = t.to(cdt).contiguous()
    return t.numpy()


def _param_rows(weight: torch.Tensor | None, bias: torch.Tensor | None) -> int:
    """W, the rows of the parameters (the same for both where both are given)."""
    for t in (weight, bias):
        if t is not None:
            return t.shape[0]
    return 1


def _rows3(t: torch.Tensor) -> np.ndarray:
    """A numpy (R, 1, n) view of contiguous rows (R, n), the layout the kernels index."""
    return as_numpy(t).reshape(t.shape[0], 1, t.shape[1])


def forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, p: float,
            k: int | None, const: float, eps: float, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, stats)`` for rows x (R, n), contiguous: y in x's dtype and ``stats`` (3, R) float64,
    per row the mean (0 without centering), D and the threshold (-1 unless L-inf or top-k).
    ``weight`` and ``bias`` are (W, n) (float32 or float64 values) or None."""
    rows, n = x.shape
    acc = _acc(x.dtype)
    rows_w = _param_rows(weight, bias)
    y = torch.empty_like(x)
    stats = np.empty((3, rows))
    launch(_forward, _rows3(x), _rows3(y), _affine_rows(weight, 1.0, n, acc, rows_w), _affine_rows(bias, 0.0, n, acc, rows_w),
           _p_code(p, k), 1 if k is None else k, float(const), float(eps), bool(center), _bounds(rows, sync_threads()), stats)
    return y, torch.from_numpy(stats)


def backward(x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor | None, stats: torch.Tensor, p: float,
             k: int | None, const: float, center: bool, want_params: bool, param_rows: int = 1):
    """``(dx, dweight, dbias)`` for rows x and their upstream gradient gy (R, n), contiguous, and
    forward's ``stats``: the input gradient in x's dtype and, with ``want_params``, the gradients
    of a (W, n) weight and bias (W = ``param_rows``) as float64 (W, n) tensors (else None, None)."""
    rows, n = x.shape
    acc = _acc(x.dtype)
    dx = torch.empty_like(x)
    w = _affine_rows(weight, 1.0, n, acc, param_rows)
    bounds = _bounds(rows, sync_threads())
    shape = (len(bounds) - 1, w.shape[0], n)  # summed in the reduction pass even when not wanted: no branch there
    dwb = np.empty((2, w.shape[0], n))
    launch(_backward, _rows3(x), _rows3(gy), _rows3(dx), w, stats.numpy(), _p_code(p, k), 1 if k is None else k,
           float(const), bool(center), bounds, np.empty(shape, acc), np.empty(shape, acc), dwb)
    if not want_params:
        return dx, None, None
    dwb = torch.from_numpy(dwb)
    return dx, dwb[0], dwb[1]


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) both kernels for ``dtype`` without running them:
    the job of :func:`normbench.kernels.fused_rows.kernels_ready`."""
    with compile_only():
        x = torch.zeros(2, 3, dtype=dtype)
        y, stats = forward(x, None, None, 2.0, None, 1.0, 1e-5, True)
        backward(x, x, None, stats, 2.0, None, 1.0, True, True)
