"""The numba CPU kernels' own contracts: bfloat16 rounding, the top-k search, odd inputs, threads.
(Their results against the fp64 oracle, every p, k and layout, are in test_fused.py.)"""

import math
import subprocess
import sys

import pytest
import torch

from normbench.kernels import fused

numba_bn = pytest.importorskip("normbench.kernels.numba_bn", reason="numba is not installed (pip install -e .)")


def test_bf16_store_rounds_as_torch_does():
    from numba import njit

    @njit
    def to_bits(values, out):
        for i in range(values.shape[0]):
            out[i] = numba_bn._f32_to_bf16(values[i])

    g = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-30, 30, (10_000,), generator=g),
        # exact halfway cases both ways, the largest finite values, infinities and NaN
        torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895e38, -3.3895e38]),
        torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0]),
    ]).float()
    out = torch.empty(len(values), dtype=torch.int16)
    to_bits(values.numpy(), out.numpy())
    got, want = out.view(torch.bfloat16), values.to(torch.bfloat16)
    same = (got == want) | (got.isnan() & want.isnan())
    assert bool(same.all()), values[~same][:5]
    assert torch.equal(got.view(torch.int16)[-1:] , want.view(torch.int16)[-1:]), "-0.0 keeps its sign"


def _stretch_of_each_value(x3):
    """Which listed stretch each value of a canonical view lies in, numbered as forward lists them:
    rows layout (B > 1) the start a * B + b of its chunk of _CHUNK values, columns layout its block
    a // _COL_BLOCK of rows."""
    a_len, _, b_len = x3.shape
    a = torch.arange(a_len)[:, None, None]
    b = torch.arange(b_len)[None, None, :]
    if b_len > 1:
        return (a * b_len + b // numba_bn._CHUNK * numba_bn._CHUNK).expand(x3.shape)
    return (a // numba_bn._COL_BLOCK).expand(x3.shape)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k", [None, 3, 20, 40])  # 20: fewer blocks than k (no floor), by insertion; 40: by partition
def test_topk_search_finds_the_threshold_and_where_it_is_reached(fmt, k):
    # bf16's coarse grid and integers make many deviations equal: the statistic must still be the
    # mean of the k largest, the threshold the k-th largest exactly (as backward recomputes |x - mu|),
    # and the hot stretches every chunk (block of rows) holding a deviation that reaches it (positions no longer matter:
    # the tie rule shares the gradient among equal deviations)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 3, 20, 13, generator=g) * 3).to(torch.bfloat16).contiguous(memory_format=fmt)
    x[:4] = torch.randint(-4, 5, (4, 3, 20, 13), generator=g).to(x.dtype)  # ties by the hundred
    x[4:, 2] = x[4:, 2] * 0.01  # channel 2: the integers alone reach the top
    x[:4, 2, :, :6] = 0.0
    x3 = fused.canonical(x)
    kk = 1 if k is None else k
    _, mean, stat, _, threshold, hot = numba_bn.forward(x3, None, None, math.inf, k, 1.0, 1e-5)
    u = x3.float() - mean.float()[None, :, None]
    dev = u.abs().transpose(0, 1).reshape(3, -1)
    want = dev.topk(kk, dim=1).values
    assert threshold.dtype == torch.float32 and torch.equal(threshold, want[:, -1])
    if k is None:
        assert threshold is stat, "the maximum's threshold is its statistic: nothing more is kept"
    torch.testing.assert_close(stat, want.mean(1), rtol=1e-6, atol=0)
    blocks = _stretch_of_each_value(x3)
    room = hot.shape[1] - 1
    assert hot.dtype == torch.int32 and room <= kk + numba_bn._HOT_SPARE
    for c in range(3):
        reach = set(blocks[:, c][u[:, c].abs() >= threshold[c]].tolist())
        assert int(hot[c, 0]) == len(reach)
        if len(reach) <= room:
            assert set(hot[c, 1 : 1 + len(reach)].tolist()) == reach
    if kk <= 3:
        assert int(hot[2, 0]) > kk, "ties spread the threshold over more stretches than k"


@pytest.mark.parametrize("k", [1, 3, numba_bn._INSERT_K, numba_bn._INSERT_K + 1, 150])
def test_floor_is_the_kth_largest_block_bound(k):
    # by insertion up to _INSERT_K, by a partition above it; ties and fewer blocks than k included
    g = torch.Generator().manual_seed(3)
    for bound in (torch.randn(200, generator=g), torch.randint(0, 5, (200,), generator=g).double(),
                  torch.arange(200.0), torch.randn(100, generator=g)):
        b = bound.double().numpy()
        want = -1.0 if len(b) < k else float(torch.from_numpy(b).sort(descending=True).values[k - 1])
        assert numba_bn._floor(b, k) == want


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("p,k", [(2.0, None), (1.0, None), (math.inf, None), (math.inf, 4)])
def test_constant_channel_gives_bias_and_finite_gradients(fmt, p, k):
    x = torch.randn(4, 2, 5, 5).contiguous(memory_format=fmt)
    x[:, 1] = 0.75
    x.requires_grad_()
    w, b = torch.tensor([1.5, 2.0], requires_grad=True), torch.tensor([0.1, -0.3], requires_grad=True)
    fused.set_backend("numba")
    try:
        y = fused.FusedLpBatchNorm.apply(x, w, b, p, k, 1e-5)[0]
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    finally:
        fused.set_backend("auto")
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], -0.3))
    assert bool(torch.isfinite(gx).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k", [None, 3])
def test_nan_input_gives_nan_output(fmt, k):
    # nothing compares with NaN: no block reaches the threshold, and the channel's output
    # and gradient are NaN; the other channel is untouched
    x = torch.randn(4, 2, 6, 6).contiguous(memory_format=fmt)
    x[1, 0, 2, 3] = math.nan
    x3 = fused.canonical(x)
    y3, mean, stat, scale, threshold, hot = numba_bn.forward(x3, None, None, math.inf, k, 1.0, 1e-5)
    assert bool(y3[:, 0].isnan().all()) and bool(torch.isfinite(y3[:, 1]).all())
    assert int(hot[0, 0]) == 0 and int(hot[1, 0]) >= 1
    gx3, *_ = numba_bn.backward(x3, torch.randn_like(x3), None, mean, scale, math.inf, k, 1.0, threshold, hot)
    assert bool(gx3[:, 0].isnan().all()) and bool(torch.isfinite(gx3[:, 1]).all())


@pytest.mark.parametrize("shape", [(10, 4, 700), (3000, 4, 1)])  # rows (3 blocks a row), columns
@pytest.mark.parametrize("k", [None, 5])
def test_backward_without_the_hot_list_takes_every_value(shape, k):
    # forward's list of where the threshold is reached only spares backward work: without it
    # (forward on the torch stages), or with a channel of too many to list, backward gives the
    # same gradient
    g = torch.Generator().manual_seed(4)
    x3 = torch.randn(shape, generator=g)
    x3[:, 1] = torch.randint(-2, 3, x3[:, 1].shape, generator=g).float()  # too many to list
    gy3 = torch.randn(shape, generator=g)
    _, mean, _, scale, threshold, hot = numba_bn.forward(x3, None, None, math.inf, k, 1.0, 1e-5)
    assert int(hot[1, 0]) > hot.shape[1] - 1 and int(hot[0, 0]) <= hot.shape[1] - 1
    listed = numba_bn.backward(x3, gy3, None, mean, scale, math.inf, k, 1.0, threshold, hot)
    every = numba_bn.backward(x3, gy3, None, mean, scale, math.inf, k, 1.0, threshold, None)
    for got, want in zip(every, listed):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,k", [(2.0, None), (1.0, None), (math.inf, None), (math.inf, 4)])
def test_channel_groups_do_not_change_results(monkeypatch, dtype, p, k):
    # a group is only the unit of work: every size, a last group cut short included, gives the same bits
    g = torch.Generator().manual_seed(2)
    x3 = torch.randn(5, 7, 300, generator=g).to(dtype)
    gy3 = torch.randn(5, 7, 300, generator=g).to(dtype)
    w, b = torch.rand(7, generator=g) + 0.5, torch.randn(7, generator=g)
    results = []
    for size in (1, 3, 7):
        monkeypatch.setattr(numba_bn, "_group", lambda x3, size=size: size)
        y3, mean, stat, scale, threshold, hot = numba_bn.forward(x3, w, b, p, k, 1.0, 1e-5)
        grads = numba_bn.backward(x3, gy3, w, mean, scale, p, k, 1.0, threshold, hot)
        results.append([y3, mean, stat, scale, *([] if hot is None else [threshold, hot]), *grads])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("threads,shape,dtype,size", [
    (2, (32, 64, 3136), torch.bfloat16, 16),  # 200 KB a channel: 4 MB (a quarter of 32 MB over 2 threads) is 20
    (2, (32, 64, 3136), torch.float32, 8),  # rounded down so that each thread gets 4 groups
    (2, (64, 256, 196), torch.bfloat16, 128),  # small channels: one group per thread
    (2, (2, 67, 5), torch.float32, 34),
    (2, (256, 64, 3136), torch.float32, 1),  # a channel larger than the share: one at a time
    (3, (32, 64, 3136), torch.bfloat16, 11),  # 13 fit; 6 groups of 11 give each of 3 threads two
])
def test_group_size_fits_the_cache_and_shares_channels_evenly(monkeypatch, threads, shape, dtype, size):
    monkeypatch.setattr(numba_bn, "_last_level_cache", lambda: 32 << 20)
    monkeypatch.setattr(numba_bn.numba, "get_num_threads", lambda: threads)
    assert numba_bn._group(torch.empty(shape, dtype=dtype)) == size


def test_threads_follow_torch():
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        numba_bn.forward(torch.randn(4, 2, 9), None, None, 2.0, None, 1.0, 1e-5)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_first_call_leaves_torch_threads_as_they_were():
    # numba's thread pool starts on the first kernel call; in a fresh process, as a profile run
    # with --threads 1 would meet it
    code = (
        "import torch, numba\n"
        "torch.set_num_threads(1)\n"
        "from normbench.kernels import numba_bn\n"
        "numba_bn.forward(torch.randn(4, 2, 9), None, None, 2.0, None, 1.0, 1e-5)\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


def test_auto_takes_the_kernels_for_spatial_cpu_input():
    assert fused.preferred(torch.randn(2, 3, 4, 4))
    assert fused.preferred(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))
    assert not fused.preferred(torch.randn(8, 3)), "(N, C) input stays on analytic"
    assert not fused.preferred(torch.randn(2, 3, 4, 4, dtype=torch.float16)), "numba has no float16"
    fused.set_backend("torch")
    try:
        assert not fused.preferred(torch.randn(2, 3, 4, 4))
    finally:
        fused.set_backend("auto")


def test_per_channel_results_beyond_float32_become_inf_without_a_warning():
    # a diverging training run (plot equivalence's paper-form correction) reaches per-channel
    # statistics beyond float32 in the float64 arithmetic; the cast makes them inf, as torch's
    # casts do, without a numpy RuntimeWarning in the user's terminal
    import warnings

    import numpy as np
    import torch

    from normbench.kernels import numba_bn

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (out,) = numba_bn._per_channel(torch.zeros(2, 3, 4), np.array([1e39, -1e39, 1.5]))
    assert out.dtype == torch.float32 and out.tolist() == [float("inf"), float("-inf"), 1.5]
