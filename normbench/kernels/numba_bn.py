"""CPU kernels for fused Lp batch-norm, compiled by numba: each pass of the byte model in one loop.

Every kernel works on the canonical (A, C, B) view of :func:`normbench.kernels.fused.canonical`
(contiguous). Two layouts:

- rows (B > 1, contiguous NCHW): one thread owns a group of adjacent channels at a time
  (:func:`_group`) and makes all of its passes in a row, each pass in memory order (for every
  batch index, the group's rows are one stretch of memory). The group stays in cache between the
  passes (a quarter of the L3 for all threads' groups together), so the second statistics pass of
  L1 and L2, the top-k search and the normalize pass cost no memory traffic: forward reads x once
  and writes y once; backward reads x and dy once and writes dx once.
- columns (B = 1: channels_last, or (N, C) input): threads own slices of the rows and vectorize
  over the channels; partial results per slice are combined, and every pass reads memory.

Statistics accumulate in float32 within a row of B values and in float64 across rows (float64
throughout for float64 input). bfloat16 travels as its int16 bits and is widened in registers
(``x << 16``) and rounded to nearest-even on store, as torch rounds. Max and min use LLVM's
``maxnum``/``minnum`` so that their reductions vectorize (numba's ``max`` does not).

Top-k (the maximum is top-1): both layouts bound each block's largest deviation by its max and
min (blocks of a row's values, or of rows of a channel) and search only the values that reach the
k-th largest bound (:func:`_search_blocks`); small k are kept by insertion as values are met,
larger k by a partition of the candidates. Only values are kept, no positions: the gradient
follows the tie rule of :func:`normbench.kernels.reference.tie_weights` (weight 1 above the k-th
largest deviation t, the k - G left shared by the E deviations equal to t), which positions
cannot express. Forward keeps t per channel (the statistic itself for the maximum), computed as
backward recomputes ``|x - mu|`` (the same mean rounded to the same arithmetic, one subtraction),
so backward's compares with t are exact, and lists where the deviations that reach t are: the
chunks of ``_CHUNK`` values (rows layout; the search takes each chunk's maximum anyway) or the
blocks of rows (columns) whose largest deviation reaches t, at most G + E of them (k without
ties), with room for ``_HOT_SPARE`` more. Backward counts G, E and the sign sums over
``{|u| > t}`` and ``{|u| == t}`` in the listed stretches only and adds the tie term there alone
(rows; the columns kernels apply it with a compare per value); a channel with more stretches than
forward had room for (heavy ties, as in integer-valued input) counts in the reduction pass and
applies the term with a compare per value.
"""

from __future__ import annotations

import math

import numba  # noqa: F401 - the tests reach numba.get_num_threads through it
import numpy as np
import torch
from numba import njit, prange

from normbench.kernels.numba_common import (  # noqa: F401 - _f32_to_bf16: the tests reach it here
    _FASTMATH,
    SUPPORTED,
    _bf16_to_f32,
    _cast,
    _f32_to_bf16,
    _insert,
    _load,
    _load1,
    _maxnum,
    _minnum,
    _store,
    _tie_step,
    as_numpy as _np,
    compile_only,
    launch,
    sync_threads as _sync_threads,
    threads as _threads,
)

P_L2, P_L1, P_TOPK = 0, 1, 2


_CHUNK = 16  # top-k search: values whose maximum is taken before a value-by-value look
_INSERT_K = 32  # top-k: the largest k kept by insertion rather than found by a partition
_BLOCK = 256  # top-k: the extent of the block extrema that bound where the k largest can be


@njit(inline="always")
def _row_sum_and_block_extrema(x, a, c, block_hi, block_lo):
    """Sum of row (a, c), and the max and min of each of its blocks of ``_BLOCK`` values into
    ``block_hi``/``block_lo`` (the row's stretch of them)."""
    row = x[a, c]
    row_sum = _cast(x, 0.0)
    for j in range(block_hi.shape[0]):
        seg = row[j * _BLOCK:(j + 1) * _BLOCK]  # loops from 0 over a view: they vectorize
        hi = _cast(x, -np.inf)
        lo = _cast(x, np.inf)
        for i in range(seg.shape[0]):
            v = _load1(seg, i)
            row_sum += v
            hi = _maxnum(hi, v)
            lo = _minnum(lo, v)
        block_hi[j] = hi
        block_lo[j] = lo
    return row_sum


@njit(inline="always")
def _block_bounds(x, mu_c, hi, lo):
    """Each block's largest deviation ``max(hi - mu, mu - lo)`` from its max and min, in the
    arithmetic of the values, so that each bound is exactly some value's deviation (rounding is
    monotone: ``hi - mu`` rounds to the largest rounded ``x - mu`` of the block)."""
    bound = np.empty(hi.shape[0])
    for j in range(hi.shape[0]):
        bound[j] = max(_cast(x, hi[j]) - mu_c, mu_c - _cast(x, lo[j]))
    return bound


@njit(inline="always")
def _floor(bound, k):
    """The k-th largest block bound: k values (one per block) reach it, so no deviation below it
    is among the k largest. -1 (no floor) with fewer than k blocks. For small k an insertion into
    the k largest so far (most bounds fail one compare) costs a third of ``np.partition``."""
    blocks = bound.shape[0]
    if blocks < k:
        return -1.0
    if k == 1:
        return bound.max()
    if k > _INSERT_K:
        return np.partition(bound, blocks - k)[blocks - k]
    top = np.full(k, -np.inf)
    for j in range(blocks):
        _insert(top, bound[j])
    return top[k - 1]


@njit(inline="always")
def _candidate_space(bound, low, per_block, k):
    """Room for every value of the blocks whose bound reaches ``low`` (none for k <= ``_INSERT_K``:
    :func:`_meet` inserts those values as they are met)."""
    searched = 0
    if k > _INSERT_K:
        for j in range(bound.shape[0]):
            searched += bound[j] >= low
    return np.empty(searched * per_block)


@njit(inline="always")
def _meet(d, vals, cand, m):
    """A deviation that reaches the floor: inserted among the k largest so far for small k, else
    kept as the m-th candidate for :func:`_take_largest`. The new count of candidates."""
    if vals.shape[0] <= _INSERT_K:
        _insert(vals, d)
        return m
    cand[m] = d
    return m + 1


@njit(inline="always")
def _take_largest(cand, vals):
    """For k > ``_INSERT_K``, the k largest candidates into ``vals`` by a partition, the k-th
    largest last (smaller k are already there, inserted as met, in descending order)."""
    k, m = vals.shape[0], cand.shape[0]
    if k <= _INSERT_K or m < k:  # m < k only for NaN input, where nothing compares
        return
    part = np.partition(cand, m - k)
    vals[k - 1] = part[m - k]
    vals[:k - 1] = part[m - k + 1:]


@njit(inline="always")
def _search_blocks(x, c, mu_c, bound, vals, hot):
    """The k largest |x - mu| of channel c (rows layout) into ``vals`` (filled with -1), the k-th
    largest t last (the values only: the tie rule makes positions irrelevant), and the chunks of
    ``_CHUNK`` values that reach t into ``hot`` (:func:`_list_hot`). The k-th largest block bound
    (``bound``, :func:`_block_bounds`; -1 with fewer blocks than k) is a floor for t, so only the
    values that reach it are candidates: met in memory order in the blocks whose bound reaches it,
    value by value only in the chunks whose maximum does and beats the k-th largest kept so far.
    Each such chunk's maximum is kept, and the chunks whose maximum reaches t are the hot ones.
    k = 1 is the maximum: the largest bound, whose blocks are only scanned for their hot chunks."""
    n_b = x.shape[2]
    per_row = (n_b + _BLOCK - 1) // _BLOCK
    k = vals.shape[0]
    low = _floor(bound, k)
    if k == 1:
        vals[0] = low
    searched = 0
    for j in range(bound.shape[0]):
        searched += bound[j] >= low
    cand = np.empty(searched * _BLOCK if k > _INSERT_K else 0)
    per_block = (min(n_b, _BLOCK) + _CHUNK - 1) // _CHUNK
    seen_at = np.empty(searched * per_block, np.int64)
    seen_top = np.empty(searched * per_block)
    m = seen = 0
    for j in range(bound.shape[0]):
        if not bound[j] >= low:
            continue
        a, b0 = j // per_row, (j % per_row) * _BLOCK
        seg = x[a, c, b0:b0 + _BLOCK]
        for q in range(0, seg.shape[0], _CHUNK):
            chunk = seg[q:q + _CHUNK]
            top = _cast(x, -1.0)
            for i in range(chunk.shape[0]):
                top = _maxnum(top, abs(_load1(chunk, i) - mu_c))
            if top < low:
                continue
            seen_at[seen] = a * n_b + b0 + q
            seen_top[seen] = top
            seen += 1
            if k == 1 or not top > vals[k - 1]:
                continue
            for i in range(chunk.shape[0]):
                d = abs(_load1(chunk, i) - mu_c)
                if d >= low:
                    m = _meet(d, vals, cand, m)
    _take_largest(cand[:m], vals)
    _list_hot(seen_at[:seen], seen_top[:seen], vals[k - 1], hot)


@njit(inline="always")
def _list_hot(at, top, t, hot):
    """Of the stretches starting at ``at`` with largest deviations ``top``, those that reach the
    threshold t (the only ones holding a deviation that reaches it, and at most G + E of them: k
    without hidden ties) into ``hot``: their number first, then their starts while there is room
    (a count beyond the room: too many to list)."""
    nhot = 0
    for i in range(at.shape[0]):
        if top[i] >= t:
            if nhot < hot.shape[0] - 1:
                hot[1 + nhot] = at[i]
            nhot += 1
    hot[0] = nhot


@njit(inline="always")
def _count_tie(u, t, run):
    """Add one deviation ``u`` that reaches the threshold t to the tie counts (:func:`_count_ties`)."""
    s = np.int64(u > 0) - np.int64(u < 0)
    if abs(u) > t:
        run[2] += 1
        run[3] += s
    else:
        run[0] += 1
        run[1] += s


@njit(inline="always")
def _count_ties(x, a0, a1, c, b0, b1, mu_c, t, run):
    """Add the deviations of channel c's values ``x[a0:a1, c, b0:b1]`` to the tie counts ``run``
    against the threshold ``t``: (E, S_eq, G, S_gt) = how many |u| equal t and the sum of their
    signs, how many exceed it and the sum of theirs."""
    n_eq = s_eq = n_gt = s_gt = 0
    for a in range(a0, a1):
        for b in range(b0, b1):  # scalar accumulators: the loop vectorizes
            n_eq, s_eq, n_gt, s_gt = _tie_step(_load(x, a, c, b) - mu_c, t, n_eq, s_eq, n_gt, s_gt)
    run[0] += n_eq
    run[1] += s_eq
    run[2] += n_gt
    run[3] += s_gt


_HOT_SPARE = 15  # top-k: room for this many hot stretches beyond k (ties at the threshold) a channel


@njit(inline="always")
def _tie_weight(counts, k):
    """From tie counts (E, S_eq, G, S_gt): the weight ``(k - G) / E`` the ties at the threshold
    share and the channel's ``sum(sign(u) w) = S_gt + S_eq (k - G) / E``."""
    weq = (k - counts[2]) / max(counts[0], 1)  # E = 0 only for NaN input, where nothing compares
    return weq, counts[3] + counts[1] * weq


@njit(inline="always")
def _scale_of(stat, p_code, const, eps):
    return math.sqrt(stat + eps) if p_code == P_L2 else stat * const + eps


# ----------------------------------------------------------------------------- rows (B > 1)
@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _forward_rows(x, y, w, bias, p_code, k, const, eps, group, mean_out, stat_out, scale_out, thr_out, hot_out):
    n_a, n_c, n_b = x.shape
    n = n_a * n_b
    per_row = (n_b + _BLOCK - 1) // _BLOCK
    for g in prange((n_c + group - 1) // group):
        c0 = g * group
        m = min(group, n_c - c0)
        total = np.zeros(m)
        topk = p_code == P_TOPK
        block_hi = np.empty((m, n_a * per_row if topk else 0))
        block_lo = np.empty((m, n_a * per_row if topk else 0))
        for a in range(n_a):  # the group's rows of each a are adjacent in memory: one stream
            for j in range(m):
                if topk:
                    blocks = slice(a * per_row, (a + 1) * per_row)
                    total[j] += _row_sum_and_block_extrema(x, a, c0 + j, block_hi[j, blocks], block_lo[j, blocks])
                else:
                    row_sum = _cast(x, 0.0)
                    for b in range(n_b):
                        row_sum += _load(x, a, c0 + j, b)
                    total[j] += row_sum
        mean = total / n
        mul = np.empty(m)
        dev = np.zeros(m)
        if not topk:
            for a in range(n_a):
                for j in range(m):
                    mu_c = _cast(x, mean[j])
                    row = _cast(x, 0.0)
                    for b in range(n_b):
                        u = _load(x, a, c0 + j, b) - mu_c
                        row += u * u if p_code == P_L2 else abs(u)
                    dev[j] += row
        for j in range(m):
            c = c0 + j
            if topk:
                mu_c = _cast(x, mean[j])  # as backward recomputes |x - mu|: the threshold compares exactly
                bound = _block_bounds(x, mu_c, block_hi[j], block_lo[j])
                vals = np.full(k, -1.0)
                _search_blocks(x, c, mu_c, bound, vals, hot_out[c])
                stat = vals.sum() / k
                thr_out[c] = vals[k - 1]
            else:
                stat = dev[j] / n
            scale = _scale_of(stat, p_code, const, eps)
            mul[j] = w[c] / scale
            mean_out[c] = mean[j]
            stat_out[c] = stat
            scale_out[c] = scale
        for a in range(n_a):
            for j in range(m):
                c = c0 + j
                mu_c = _cast(x, mean[j])
                mul_c = _cast(x, mul[j])
                add_c = _cast(x, bias[c])  # (x - mu) * mul + bias: no cancellation when |mu| >> D
                for b in range(n_b):
                    _store(y, a, c, b, (_load(x, a, c, b) - mu_c) * mul_c + add_c)


@njit(inline="always")
def _sgn(x, u):
    """torch.sign(u) in the arithmetic type of ``x``'s values."""
    return _cast(x, u > 0) - _cast(x, u < 0)


@njit(inline="always")
def _tie_term(u, t, above, at):
    """The top-k term ``sign(u) w(|u|) * coef`` of deviation ``u``: ``above`` (the coefficient)
    beyond the threshold ``t``, ``at`` (the shared weight (k - G) / E times it) on it, 0 below;
    negated for u < 0. Selects only (no sign arithmetic), which measured 25% faster in bf16;
    ``at`` must be 0 where t = 0, whose ties have sign 0. (The conditional expressions stay out of
    the store's argument: numba 0.68 compiled one there, after a nested one, to no stores.)"""
    d = abs(u)
    cf = above if d > t else (at if d == t else above - above)
    signed = -cf if u < 0 else cf
    return signed


@njit(inline="always")
def _reaching(x, c, mu_c, t, hot, counts, where):
    """In channel c's listed hot chunks (rows layout), the deviations that reach the threshold t:
    their tie counts into ``counts`` and their offsets ``a * B + b`` into ``where`` (the only
    values with a tie term, about k a channel without ties); their number."""
    n_b = x.shape[2]
    found = 0
    for i in range(hot[0]):
        a, b0 = hot[1 + i] // n_b, hot[1 + i] % n_b
        for b in range(b0, min(b0 + _CHUNK, n_b)):
            u = _load(x, a, c, b) - mu_c
            if abs(u) >= t:
                _count_tie(u, t, counts)
                where[found] = a * n_b + b
                found += 1
    return found


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _backward_rows(x, g, dx, w, mean, scale, p_code, k, const, group, thr, hot, sum_g_out, sum_gx_out):
    n_a, n_c, n_b = x.shape
    n = n_a * n_b
    per_row = (n_b + _BLOCK - 1) // _BLOCK
    room = hot.shape[1] - 1
    for grp in prange((n_c + group - 1) // group):
        c0 = grp * group
        m = min(group, n_c - c0)
        signs = np.empty((m, n_a * n_b if p_code == P_L1 else 0), np.int8)
        # top-k: tie counts (E, S_eq, G, S_gt); channels with more hot chunks than forward listed
        # count them in the reduction pass, the others in their hot chunks afterwards
        counts = np.zeros((m, 4), np.int64)
        where = np.empty((m, room * _CHUNK if p_code == P_TOPK else 0), np.int64)  # offsets a * B + b
        reach = np.zeros(m, np.int64)
        sum_g = np.zeros(m)
        sum_gu = np.zeros(m)
        sum_sign = np.zeros(m)
        for a in range(n_a):
            for j in range(m):
                c = c0 + j
                mu_c = _cast(x, mean[c])
                r_g = _cast(x, 0.0)
                r_gu = _cast(x, 0.0)
                r_s = 0
                if p_code == P_L1:
                    row_s = signs[j, a * n_b:(a + 1) * n_b]
                    for b in range(n_b):
                        gv = _load(g, a, c, b)
                        u = _load(x, a, c, b) - mu_c
                        r_g += gv
                        r_gu += gv * u
                        s = np.int8(u > 0) - np.int8(u < 0)
                        row_s[b] = s
                        r_s += np.int32(s)
                else:
                    for b in range(n_b):
                        gv = _load(g, a, c, b)
                        r_g += gv
                        r_gu += gv * (_load(x, a, c, b) - mu_c)
                    if p_code == P_TOPK and hot[c, 0] > room:
                        _count_ties(x, a, a + 1, c, 0, n_b, mu_c, _cast(x, thr[c]), counts[j])
                sum_g[j] += r_g
                sum_gu[j] += r_gu
                sum_sign[j] += r_s
        # dx = mul * (g - mean(g) - coef_u * u - coef_s * (sign(u) w - its mean)): w = 1 for L1, the
        # tie weights for top-k
        k_g = np.empty(m)
        k_0 = np.empty(m)
        k_x = np.empty(m)  # the coefficient of u (L2) or of sign(u) w (L1, top-k)
        k_at = np.zeros(m)  # top-k: the coefficient of sign(u) at the threshold, k_x (k - G) / E
        for j in range(m):
            c = c0 + j
            sc = scale[c]
            sum_gx = sum_gu[j] / sc
            mul = w[c] / sc
            k_g[j] = mul
            if p_code == P_L2:
                k_0[j] = -mul * sum_g[j] / n
                k_x[j] = -mul * sum_gx / (n * sc)
            else:
                coef_s = const * sum_gx / (n if p_code == P_L1 else k)
                signed = sum_sign[j]
                if p_code == P_TOPK:
                    if hot[c, 0] <= room:  # the listed hot chunks hold every deviation that reaches t
                        reach[j] = _reaching(x, c, _cast(x, mean[c]), _cast(x, thr[c]), hot[c], counts[j], where[j])
                    weq, signed = _tie_weight(counts[j], k)
                    # ties at t = 0 have sign 0: their term vanishes (as _tie_term needs)
                    k_at[j] = 0.0 if thr[c] == 0 else -mul * coef_s * weq
                k_0[j] = mul * (coef_s * signed / n - sum_g[j] / n)
                k_x[j] = -mul * coef_s
            sum_g_out[c] = sum_g[j]
            sum_gx_out[c] = sum_gx
        for a in range(n_a):
            for j in range(m):
                c = c0 + j
                mu_c = _cast(x, mean[c])
                kg, k0, kx = _cast(x, k_g[j]), _cast(x, k_0[j]), _cast(x, k_x[j])
                if p_code == P_L2:
                    for b in range(n_b):
                        _store(dx, a, c, b, _load(g, a, c, b) * kg + k0 + (_load(x, a, c, b) - mu_c) * kx)
                elif p_code == P_L1:
                    row_s = signs[j, a * n_b:(a + 1) * n_b]
                    for b in range(n_b):
                        _store(dx, a, c, b, _load(g, a, c, b) * kg + k0 + _cast(x, row_s[b]) * kx)
                elif hot[c, 0] > room:  # too many hot chunks: the tie term everywhere
                    t_c, kx_at = _cast(x, thr[c]), _cast(x, k_at[j])
                    for b in range(n_b):
                        term = _tie_term(_load(x, a, c, b) - mu_c, t_c, kx, kx_at)
                        _store(dx, a, c, b, _load(g, a, c, b) * kg + k0 + term)
                else:  # w = 0 outside the hot chunks, which are redone below
                    for b in range(n_b):
                        _store(dx, a, c, b, _load(g, a, c, b) * kg + k0)
        if p_code == P_TOPK:  # the deviations that reach t, with their tie term (in cache with the group)
            for j in range(m):
                c = c0 + j
                mu_c, t_c = _cast(x, mean[c]), _cast(x, thr[c])
                kg, k0, kx, kx_at = _cast(x, k_g[j]), _cast(x, k_0[j]), _cast(x, k_x[j]), _cast(x, k_at[j])
                for i in range(reach[j]):
                    a, b = where[j, i] // n_b, where[j, i] % n_b
                    term = _tie_term(_load(x, a, c, b) - mu_c, t_c, kx, kx_at)
                    _store(dx, a, c, b, _load(g, a, c, b) * kg + k0 + term)


# ----------------------------------------------------------------------------- columns (B = 1)
_COL_BLOCK = 64  # top-k, columns layout: the rows of a block whose max and min bound its deviations


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _col_sums(x, bounds, sums, hi, lo):
    """Per slice t of rows [bounds[t], bounds[t+1]): the sum of every channel. With ``hi`` and
    ``lo`` of shape (blocks, C) (else empty), also the max and min of every block of
    ``_COL_BLOCK`` rows of each channel; the slice bounds are then multiples of ``_COL_BLOCK``."""
    n_c = x.shape[1]
    extrema = hi.shape[0] > 0
    for t in prange(bounds.shape[0] - 1):
        for c in range(n_c):
            sums[t, c] = 0.0
        for a in range(bounds[t], bounds[t + 1]):
            if extrema:
                j = a // _COL_BLOCK
                if a % _COL_BLOCK == 0:
                    for c in range(n_c):
                        hi[j, c] = -np.inf
                        lo[j, c] = np.inf
                for c in range(n_c):
                    v = _load(x, a, c, 0)
                    sums[t, c] += v
                    hi[j, c] = _maxnum(hi[j, c], v)
                    lo[j, c] = _minnum(lo[j, c], v)
            else:
                for c in range(n_c):
                    sums[t, c] += _load(x, a, c, 0)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _col_deviation(x, bounds, mean, p_code, out):
    """Per slice: sum of (x - mu)^2 (L2) or |x - mu| (L1) of every channel."""
    n_c = x.shape[1]
    for t in prange(bounds.shape[0] - 1):
        for c in range(n_c):
            out[t, c] = 0.0
        for a in range(bounds[t], bounds[t + 1]):
            for c in range(n_c):
                u = _load(x, a, c, 0) - mean[c]
                out[t, c] += u * u if p_code == P_L2 else abs(u)


@njit(parallel=True, cache=True)
def _col_topk(x, mean, hi, lo, vals, thr, hot):
    """Per channel, the k largest |x - mu| into vals (C, k) (filled with -1 by the caller), the
    k-th largest last and in ``thr``, and the blocks that reach it into ``hot``
    (:func:`_list_hot`), as the rows kernels search: the k-th largest bound of the channel's
    row blocks (from ``hi``/``lo`` of :func:`_col_sums`) is a floor, and the values of the blocks
    that reach it are the candidates."""
    n_a, n_c = x.shape[0], x.shape[1]
    k = vals.shape[1]
    for c in prange(n_c):
        mu_c = _cast(x, mean[c])
        bound = _block_bounds(x, mu_c, hi[:, c], lo[:, c])
        low = _floor(bound, k)
        if k == 1:  # the maximum: the largest bound
            vals[c, 0] = low
        else:
            cand = _candidate_space(bound, low, _COL_BLOCK, k)
            m = 0
            for j in range(bound.shape[0]):
                if not bound[j] >= low:
                    continue
                for a in range(j * _COL_BLOCK, min((j + 1) * _COL_BLOCK, n_a)):
                    d = abs(_load(x, a, c, 0) - mu_c)
                    if d >= low:
                        m = _meet(d, vals[c], cand, m)
            _take_largest(cand[:m], vals[c])
        thr[c] = vals[c, k - 1]
        _list_hot(np.arange(bound.shape[0]), bound, vals[c, k - 1], hot[c])


@njit(parallel=True, cache=True)
def _col_ties(x, mean, thr, hot, k, weq, signed):
    """Per channel, the tie counts against the threshold (in its hot blocks of ``_COL_BLOCK`` rows,
    or in every row where forward listed too many) and from them :func:`_tie_weight`'s weight
    ``weq`` and signed sum ``signed``."""
    n_a, n_c = x.shape[0], x.shape[1]
    room = hot.shape[1] - 1
    for c in prange(n_c):
        mu_c, t_c = _cast(x, mean[c]), _cast(x, thr[c])
        counts = np.zeros(4, np.int64)
        if hot[c, 0] > room:
            _count_ties(x, 0, n_a, c, 0, 1, mu_c, t_c, counts)
        else:
            for i in range(hot[c, 0]):
                j = hot[c, 1 + i]
                _count_ties(x, j * _COL_BLOCK, min((j + 1) * _COL_BLOCK, n_a), c, 0, 1, mu_c, t_c, counts)
        weq[c], signed[c] = _tie_weight(counts, k)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _col_apply(x, y, bounds, mean, mul, add):
    n_c = x.shape[1]
    for t in prange(bounds.shape[0] - 1):
        for a in range(bounds[t], bounds[t + 1]):
            for c in range(n_c):
                _store(y, a, c, 0, (_load(x, a, c, 0) - mean[c]) * mul[c] + add[c])


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _col_backward_sums(x, g, bounds, mean, p_code, out):
    """Per slice: sum(g), sum(g * u) and (L1) sum(sign(u)) of every channel, as out[t, 0..2, c]."""
    n_c = x.shape[1]
    for t in prange(bounds.shape[0] - 1):
        for c in range(n_c):
            out[t, 0, c] = 0.0
            out[t, 1, c] = 0.0
            out[t, 2, c] = 0.0
        for a in range(bounds[t], bounds[t + 1]):
            for c in range(n_c):
                gv = _load(g, a, c, 0)
                u = _load(x, a, c, 0) - mean[c]
                out[t, 0, c] += gv
                out[t, 1, c] += gv * u
                if p_code == P_L1:
                    out[t, 2, c] += _sgn(x, u)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _col_backward_apply(x, g, dx, bounds, mean, k_g, k_0, k_u, k_s, thr, k_at, p_code):
    """dx = g k_g + k_0 + u k_u + sign(u) k_s per channel; for top-k the tie term of
    :func:`_tie_term` instead (k_s beyond the threshold ``thr``, ``k_at`` on it)."""
    n_c = x.shape[1]
    for t in prange(bounds.shape[0] - 1):
        for a in range(bounds[t], bounds[t + 1]):
            if p_code == P_TOPK:
                for c in range(n_c):
                    term = _tie_term(_load(x, a, c, 0) - mean[c], thr[c], k_s[c], k_at[c])
                    _store(dx, a, c, 0, _load(g, a, c, 0) * k_g[c] + k_0[c] + term)
            else:
                for c in range(n_c):
                    u = _load(x, a, c, 0) - mean[c]
                    _store(dx, a, c, 0, _load(g, a, c, 0) * k_g[c] + k_0[c] + u * k_u[c] + _sgn(x, u) * k_s[c])


# ----------------------------------------------------------------------------- torch entry points
def supports(x: torch.Tensor) -> bool:
    """Whether these kernels take this tensor (CPU, float32/float64/bfloat16)."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED


def _acc(x3: torch.Tensor) -> torch.dtype:
    return torch.float64 if x3.dtype == torch.float64 else torch.float32


def _per_channel(x3: torch.Tensor, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """float64 per-channel results as tensors of the compute dtype (a numpy cast costs less than
    torch's on a few hundred values, and this runs on every call)."""
    acc = np.float64 if x3.dtype == torch.float64 else np.float32
    return tuple(torch.from_numpy(a) for a in _narrow(acc, *arrays))


def _narrow(acc: type, *arrays: np.ndarray) -> list[np.ndarray]:
    """float64 arrays cast to the arithmetic type ``acc``; beyond float32 is inf, silently, as
    torch's casts make it (a diverging run would otherwise print numpy overflow warnings)."""
    with np.errstate(over="ignore"):
        return [a.astype(acc, copy=False) for a in arrays]


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64, copy=False)


def _p_code(p: float, k: int | None) -> int:
    return P_TOPK if (k is not None or p == math.inf) else (P_L2 if p == 2 else P_L1)


def _params(weight: torch.Tensor | None, bias: torch.Tensor | None, c: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.ones(c) if weight is None else weight.detach().double().numpy()
    b = np.zeros(c) if bias is None else bias.detach().double().numpy()
    return w, b


def _slices(a_len: int, align: int = 1) -> np.ndarray:
    """Row bounds of the slices the columns kernels share among threads (a few per thread), at
    multiples of ``align`` (but the last)."""
    units = -(-a_len // align)
    count = max(1, min(units, 4 * _threads()))
    return np.minimum(np.linspace(0, units, count + 1).astype(np.int64) * align, a_len)


def _last_level_cache() -> int:
    """Bytes of the last-level (L3) cache: the package's one reader, :mod:`normbench.kernels.machine`
    (cached there; 32 MiB where the system does not say)."""
    from normbench.kernels.machine import last_level_cache

    return last_level_cache()


def _group(x3: torch.Tensor) -> int:
    """Adjacent channels per unit of work of the rows kernels. A thread reads a group's rows of one
    batch index as one stream (a channel alone is N short rows, measured up to 2x slower to read
    than memory order), and the groups in flight, one per thread, take a quarter of the L3 so the
    later passes over them read cache. The size is rounded so that the threads get the same number
    of groups where the channel count allows."""
    a_len, c, b_len = x3.shape
    threads = _threads()
    budget = _last_level_cache() // (4 * threads)
    size = max(1, min(budget // (a_len * b_len * x3.element_size()), -(-c // threads)))
    per_thread = -(-c // (threads * size))
    return -(-c // (threads * per_thread))


def _tie_outputs(x3, p_code, k, stat_t, thr, hot):
    """``(threshold, hot)`` as forward returns them: for top-k and the maximum the k-th largest
    deviation per channel (the statistic itself for the maximum) and where the deviations that
    reach it are (:func:`_list_hot`: their number, then the start of each; rows layout: chunks
    of ``_CHUNK`` values, starting at ``a * B + b``; columns layout: blocks of ``_COL_BLOCK``
    rows), int32 (int64 from 2^31 values a channel), only as wide as the most any channel listed;
    (None, None) otherwise."""
    if p_code != P_TOPK:
        return None, None
    threshold = stat_t if k == 1 else _per_channel(x3, thr)[0]
    most = int(hot[:, 0].max(initial=0))
    kept = hot[:, : 1 + min(hot.shape[1] - 1, most)]
    return threshold, torch.from_numpy(np.ascontiguousarray(kept, np.int32 if most < 2**31 else np.int64))


def forward(x3: torch.Tensor, weight, bias, p: float, k: int | None, const: float, eps: float):
    """``(y3, mean, stat, scale, threshold, hot)``: output in x's dtype; per-channel mean and raw
    statistic (in the compute dtype: float64 for float64 input, else float32) and dispersion D
    (float64); for top-k and the maximum the threshold t (the k-th largest |x - mu|, in the
    compute dtype, computed as backward recomputes |x - mu|) and the blocks that reach it
    (:func:`_tie_outputs`), else None and None."""
    _sync_threads()
    a_len, c, b_len = x3.shape
    p_code = _p_code(p, k)
    kk = 1 if k is None else k
    y3 = torch.empty_like(x3)
    w, b = _params(weight, bias, c)
    thr = np.full(c, -1.0)
    hot = np.zeros((c, kk + _HOT_SPARE + 1 if p_code == P_TOPK else 1), np.int64)
    if b_len > 1:
        mean, stat, scale = np.empty(c), np.empty(c), np.empty(c)
        launch(_forward_rows, _np(x3), _np(y3), w, b, p_code, kk, const, eps, _group(x3), mean, stat, scale, thr, hot)
        mean_t, stat_t = _per_channel(x3, mean, stat)
        return y3, mean_t, stat_t, torch.from_numpy(scale), *_tie_outputs(x3, p_code, kk, stat_t, thr, hot)
    xn = _np(x3)
    acc = np.float64 if x3.dtype == torch.float64 else np.float32
    topk = p_code == P_TOPK
    bounds = _slices(a_len, _COL_BLOCK if topk else 1)
    blocks = -(-a_len // _COL_BLOCK) if topk else 0
    hi, lo = np.empty((blocks, c), acc), np.empty((blocks, c), acc)
    sums = np.empty((len(bounds) - 1, c), acc)
    launch(_col_sums, xn, bounds, sums, hi, lo)
    mean = sums.astype(np.float64).sum(0) / a_len
    if topk:
        vals = np.full((c, kk), -1.0)
        launch(_col_topk, xn, mean.astype(acc), hi, lo, vals, thr, hot)
        stat = vals.mean(1)
    else:
        dev = np.empty_like(sums)
        launch(_col_deviation, xn, bounds, mean.astype(acc), p_code, dev)
        stat = dev.astype(np.float64).sum(0) / a_len
    scale = np.sqrt(stat + eps) if p_code == P_L2 else stat * const + eps
    mul = w / scale
    launch(_col_apply, xn, _np(y3), bounds, mean.astype(acc), mul.astype(acc), b.astype(acc))
    mean_t, stat_t = _per_channel(x3, mean, stat)
    return y3, mean_t, stat_t, torch.from_numpy(scale), *_tie_outputs(x3, p_code, kk, stat_t, thr, hot)


def backward(x3, gy3, weight, mean, scale, p: float, k: int | None, const: float, threshold, hot):
    """``(grad_x3, sum_g, sum_gx)``: the input gradient and per-channel ``sum(dy)`` and
    ``sum(dy * xhat)`` (float64), the weight's and bias's gradients. ``threshold`` and ``hot`` are
    forward's (top-k and the maximum; without ``hot``, as when forward ran on the torch stages,
    every value is looked at)."""
    _sync_threads()
    a_len, c, b_len = x3.shape
    n = a_len * b_len
    p_code = _p_code(p, k)
    kk = 1 if k is None else k
    dx3 = torch.empty_like(x3)
    w, _ = _params(weight, None, c)
    mean_n, scale_n = _f64(mean), _f64(scale)
    thr = np.full(c, -1.0) if threshold is None else _f64(threshold)
    if hot is None:  # one column, a count beyond it: every value of every channel (int32: no new compile)
        hot_n = np.full((c, 1), np.iinfo(np.int32).max if p_code == P_TOPK else 0, np.int32)
    else:
        hot_n = hot.numpy()
    if b_len > 1:
        sum_g, sum_gx = np.empty(c), np.empty(c)
        launch(_backward_rows, _np(x3), _np(gy3), _np(dx3), w, mean_n, scale_n, p_code, kk, const, _group(x3), thr, hot_n,
                       sum_g, sum_gx)
        return dx3, torch.from_numpy(sum_g), torch.from_numpy(sum_gx)
    xn, gn, bounds = _np(x3), _np(gy3), _slices(a_len)
    acc = np.float64 if x3.dtype == torch.float64 else np.float32
    sums = np.empty((len(bounds) - 1, 3, c), acc)
    launch(_col_backward_sums, xn, gn, bounds, mean_n.astype(acc), p_code, sums)
    sum_g, sum_gu, sum_sign = sums.astype(np.float64).sum(0)
    sum_gx = sum_gu / scale_n
    mul = w / scale_n
    coef_u = sum_gx / (n * scale_n) if p_code == P_L2 else np.zeros(c)
    coef_s = np.zeros(c) if p_code == P_L2 else const * sum_gx / (n if p_code == P_L1 else kk)
    weq = np.zeros(c)
    if p_code == P_TOPK:
        launch(_col_ties, xn, mean_n.astype(acc), thr, hot_n, kk, weq, sum_sign)
    k_0 = mul * (coef_s * sum_sign / n - sum_g / n)
    k_s = -mul * coef_s
    k_at = np.where(thr == 0, 0.0, k_s * weq)  # ties at t = 0 have sign 0 (as _tie_term needs)
    launch(_col_backward_apply, xn, gn, _np(dx3), bounds, *_narrow(acc, mean_n, mul, k_0, -mul * coef_u, k_s, thr, k_at),
           p_code)
    return dx3, torch.from_numpy(sum_g), torch.from_numpy(sum_gx)


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) every kernel the entry points launch for
    ``dtype``, both layouts, without running them: the job of
    :func:`normbench.kernels.fused.kernels_ready`, run in a background thread."""
    with compile_only():
        for shape in ((2, 2, 3), (4, 2, 1)):  # rows layout (B > 1), columns layout (B = 1)
            x3 = torch.zeros(shape, dtype=dtype)
            for p, k in ((1.0, None), (math.inf, 2)):  # p is a runtime code: these two cover every kernel
                _, mean, _, scale, threshold, hot = forward(x3, None, None, p, k, 1.0, 1e-5)
                backward(x3, x3, None, mean, scale, p, k, 1.0, threshold, hot)
                backward(x3, x3, None, mean, scale, p, k, 1.0, threshold, None)
