"""The fused batch-norm path (torch stages and Triton kernels) against fp64 oracles."""

import importlib.util
import math

import pytest
import torch

import oracle
from normbench.kernels import fused
from normbench.nn import LpBatchNorm2d
from oracle import PK, PK_IDS

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_numba = pytest.mark.skipif(not fused.numba_available(), reason="numba is not installed (pip install -e .)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[test]' on Linux x86_64)")

# (shape, memory format): NCHW, channels_last, 5-D both ways, 2-D and 3-D, channels not a
# multiple of any block (67), tiny batches, and shapes whose reductions split across programs.
LAYOUTS = [
    ((4, 3, 5, 6), torch.contiguous_format),
    ((4, 3, 5, 6), torch.channels_last),
    ((2, 3, 4, 3, 2), torch.contiguous_format),
    ((2, 3, 4, 3, 2), torch.channels_last_3d),
    ((6, 5), torch.contiguous_format),
    ((3, 4, 7), torch.contiguous_format),
    ((2, 67, 3, 3), torch.channels_last),
    ((2, 5), torch.contiguous_format),
    ((6, 2, 420), torch.contiguous_format),
    ((70, 5, 3, 3), torch.channels_last),
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}" for s, f in LAYOUTS]


@pytest.fixture
def eager_torch_stages():
    fused.set_compile(False)
    fused.set_backend("torch")
    yield
    fused.set_compile(True)
    fused.set_backend("auto")


@pytest.fixture
def triton_interpreted(monkeypatch):
    from normbench.kernels import triton_bn

    # two programs per channel: each loops over several tiles, and their partials are combined
    monkeypatch.setattr(triton_bn, "MAX_SPLITS", 2)
    fused.set_compile(False)
    fused.set_backend("triton")
    yield
    fused.set_compile(True)
    fused.set_backend("auto")


@pytest.fixture(params=["numba", "triton"])
def kernels(request):
    """Each kernel backend in turn (Triton under the interpreter); skipped when not installed."""
    if request.param == "numba" and not fused.numba_available():
        pytest.skip("numba is not installed (pip install -e .)")
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed (pip install -e '.[test]' on Linux x86_64)")
        request.getfixturevalue("triton_interpreted")
        yield
        return
    fused.set_backend("numba")
    yield
    fused.set_backend("auto")


def _data(shape, fmt, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, gy


def _valid(shape, k):
    return k is None or math.prod(shape) // shape[1] >= k


def _check_against_oracle(shape, fmt, p, k, dtype, tol):
    if not _valid(shape, k):
        pytest.skip("top-k needs k <= n")
    x, w, b, gy = _data(shape, fmt, dtype)
    xg = x.clone().requires_grad_()
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    wg, bg = w.to(param_dtype).requires_grad_(), b.to(param_dtype).requires_grad_()
    y, mean, stat = fused.FusedLpBatchNorm.apply(xg, wg, bg, p, k, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride(), "output keeps the input's memory format"
    gx, gw, gb = torch.autograd.grad(y, (xg, wg, bg), gy)
    xr = x.double().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = oracle.batch_norm(xr, wr, br, p, k)
    rgx, rgw, rgb = torch.autograd.grad(ref, (xr, wr, br), gy.double())

    def rel(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    assert rel(y, ref) < tol
    assert rel(gx, rgx) < tol
    assert rel(gw, rgw) < tol and rel(gb, rgb) < tol
    ref_mean, _ = oracle.batch_norm_statistics(x.double(), p, k)
    assert rel(mean, ref_mean) < tol


@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_torch_stages_fp64(eager_torch_stages, shape, fmt, p, k):
    _check_against_oracle(shape, fmt, p, k, torch.float64, 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_torch_stages_low_precision(eager_torch_stages, dtype, tol, p, k):
    for shape, fmt in (LAYOUTS[1], LAYOUTS[8]):
        _check_against_oracle(shape, fmt, p, k, dtype, tol)


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_gradcheck(eager_torch_stages, p, k):
    x, w, b, _ = _data((4, 3, 3, 2), torch.channels_last)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w, b: fused.FusedLpBatchNorm.apply(x, w, b, p, k, 1e-5)[0], args)


def test_topk_when_the_largest_and_smallest_overlap(eager_torch_stages):
    # n = 4 < 2k: a value is among both the 3 largest and the 3 smallest
    x, w, b, gy = _data((4, 3, 1, 1), torch.contiguous_format)
    y = fused.FusedLpBatchNorm.apply(x, None, None, math.inf, 3, 1e-5)[0]
    torch.testing.assert_close(y, oracle.batch_norm(x, p=math.inf, k=3))


def test_module_switch_and_running_statistics(eager_torch_stages):
    x, *_ = _data((4, 3, 5, 5), torch.contiguous_format)
    ours, ref = LpBatchNorm2d(3, p=1, impl="fused").double(), LpBatchNorm2d(3, p=1, impl="eager").double()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_kernels_fp64(kernels, shape, fmt, p, k):
    _check_against_oracle(shape, fmt, p, k, torch.float64, 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_kernels_low_precision(kernels, dtype, tol, p, k):
    # float16 is not one of numba's: there it takes the torch stages
    for shape, fmt in (LAYOUTS[6], LAYOUTS[8], LAYOUTS[9]):
        _check_against_oracle(shape, fmt, p, k, dtype, tol)


@needs_numba
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_numba_gradcheck(p, k):
    fused.set_backend("numba")
    try:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x, w, b, _ = _data((4, 3, 3, 2), fmt)
            args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
            assert torch.autograd.gradcheck(lambda x, w, b: fused.FusedLpBatchNorm.apply(x, w, b, p, k, 1e-5)[0], args)
    finally:
        fused.set_backend("auto")


@needs_triton
def test_triton_welford_with_a_large_mean(triton_interpreted):
    # one pass, yet no cancellation: mean 1e4 over a spread of 1 in fp32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 2, 500, generator=g, dtype=torch.float64) + 1e4).float()
    from normbench.kernels import triton_bn

    _, var, _ = triton_bn.statistics(fused.canonical(x), 2.0, None)
    want = x.double().var((0, 2), correction=0)
    torch.testing.assert_close(var.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("p,k,dtype,fmt", [(1.0, None, torch.float32, torch.contiguous_format),
                                           (math.inf, 4, torch.bfloat16, torch.channels_last)])
def test_compiled_matches_eager(p, k, dtype, fmt):
    fused.set_backend("torch")
    try:
        x, w, b, gy = _data((4, 3, 6, 6), fmt, dtype)
        w, b = w.float(), b.float()
        outs = []
        for compiled in (True, False):
            fused.set_compile(compiled)
            xg = x.clone().requires_grad_()
            y = fused.FusedLpBatchNorm.apply(xg, w, b, p, k, 1e-5)[0]
            outs.append((y, torch.autograd.grad(y, xg, gy)[0]))
    finally:
        fused.set_compile(True)
        fused.set_backend("auto")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    torch.testing.assert_close(outs[0][1], outs[1][1], **tol)


def test_fused_takes_the_row_norms_too():
    # it was batch-norm only; the row norms' fused path is tested in test_fused_rows.py
    from normbench.nn import LpLayerNorm

    y = LpLayerNorm(4, p=1, impl="fused")(torch.randn(2, 4))
    assert y.shape == (2, 4) and torch.isfinite(y).all()


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused.set_backend("cuda")


# ----------------------------------------------------------------------------- ties
# The tie rule of docs/norms.md (reference.tie_weights): deviations above the k-th largest t get
# weight 1, the E deviations equal to t share the k - G left, for the maximum (k=1) as well. Every
# backend must follow it on inputs whose deviations tie, in every layout and dtype.
TIE_CASES = ("integers", "bf16", "blocks")
# (8,4,5,5): rows of 25 (8 blocks a channel; channels_last: 4 blocks of 64 rows), so k=20 and 40
# leave fewer blocks than k; (2,3,20,30): rows of several blocks; (48,2,6,6) and (16,2,16,12)
# channels_last: at least 40 blocks a channel (k=40 searches above a floor); (64,4): (N, C) input.
TIE_LAYOUTS = [
    ((8, 4, 5, 5), torch.contiguous_format),
    ((8, 4, 5, 5), torch.channels_last),
    ((2, 3, 20, 30), torch.contiguous_format),
    ((48, 2, 6, 6), torch.contiguous_format),
    ((16, 2, 16, 12), torch.channels_last),
    ((64, 4), torch.contiguous_format),
]
TIE_PK = [(math.inf, None), (math.inf, 3), (math.inf, 20), (math.inf, 40)]
TIE_PK_IDS = ["linf", "top3", "top20", "top40"]
TIE_TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _tied_data(case, shape, fmt, dtype, seed=0):
    """Input whose deviations tie, with weight, bias and dy.

    - integers: ``randint(-3, 4)``, every deviation shared by a seventh of the channel;
    - bf16: Gaussian values (mean 100, sd 3) rounded to bfloat16, whose grid of 0.5 there ties
      the largest deviations;
    - blocks, by channel (mod 4): all values equal but two symmetric about the mean (tied maxima
      of opposite signs, and t = 0 below them); a block of 30 equal extreme values in a Gaussian
      channel; integers in [-2, 2] with two 6s and four 5s (top-3: G = 2 < 3 < G + E = 6, the
      -2s: another tie further down); a Gaussian channel.
    """
    g = torch.Generator().manual_seed(seed)
    if case == "integers":
        x = torch.randint(-3, 4, shape, generator=g).double()
    elif case == "bf16":
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 100).bfloat16().double()
    else:
        by_channel = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).transpose(0, 1).contiguous()
        for c in range(shape[1]):
            flat = by_channel[c].view(-1)
            if c % 4 == 0:
                flat.fill_(1.5)
                flat[3], flat[len(flat) // 2] = 4.0, -1.0
            elif c % 4 == 1:
                flat[len(flat) // 3 : len(flat) // 3 + 30] = float(flat.max().ceil()) + 3
            elif c % 4 == 2:
                flat.copy_(torch.randint(-2, 3, flat.shape, generator=g).double())
                at = torch.randperm(len(flat), generator=g)[:6]
                flat[at[:2]], flat[at[2:]] = 6.0, 5.0
        x = by_channel.transpose(0, 1)
    x = x.to(dtype).contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, gy


def _rel(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def _check_ties(p, k, dtype):
    """Every tied case and layout: forward and every gradient against the oracle, eager and
    analytic (all three follow the tie rule by construction: autograd, tie_weights)."""
    from normbench.nn.functional import lp_batch_norm

    tol = TIE_TOL[dtype]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    failures = []
    for case in TIE_CASES:
        for shape, fmt in TIE_LAYOUTS:
            x, w, b, gy = _tied_data(case, shape, fmt, dtype)
            xg = x.clone().requires_grad_()
            wg, bg = w.to(param_dtype).requires_grad_(), b.to(param_dtype).requires_grad_()
            y = fused.FusedLpBatchNorm.apply(xg, wg, bg, p, k, 1e-5)[0]
            got = (y, *torch.autograd.grad(y, (xg, wg, bg), gy))
            xr, wr, br = x.double().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            ref = oracle.batch_norm(xr, wr, br, p, k)
            wants = {"oracle": (ref, *torch.autograd.grad(ref, (xr, wr, br), gy.double()))}
            for impl in ("eager", "analytic"):
                xi = x.clone().requires_grad_()
                wi, bi = w.to(param_dtype).requires_grad_(), b.to(param_dtype).requires_grad_()
                yi = lp_batch_norm(xi, None, None, wi, bi, training=True, p=p, k=k, impl=impl)
                wants[impl] = (yi, *torch.autograd.grad(yi, (xi, wi, bi), gy))
            for against, want in wants.items():
                for name, g_, w_ in zip(("y", "dx", "dweight", "dbias"), got, want):
                    err = _rel(g_, w_)
                    if not err < tol:
                        failures.append(f"{case} {'x'.join(map(str, shape))} {str(fmt).split('.')[-1]} "
                                        f"{name} vs {against}: {err:.2e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("p,k", TIE_PK, ids=TIE_PK_IDS)
def test_kernels_follow_the_tie_rule(kernels, p, k, dtype):
    _check_ties(p, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16],
                         ids=["fp32", "bf16", "fp64", "fp16"])
@pytest.mark.parametrize("p,k", TIE_PK, ids=TIE_PK_IDS)
def test_torch_stages_follow_the_tie_rule(eager_torch_stages, p, k, dtype):
    _check_ties(p, k, dtype)


@pytest.mark.parametrize("k", [None, 3, 20, 40])
def test_tied_data_has_ties_inside_the_top_k(k):
    # what the tie tests exercise: for every case, a channel of some layout where the k-th largest
    # deviation is tied with values outside the k largest (G < k < G + E; for the maximum E > 1)
    kk = k or 1
    for case in TIE_CASES:
        hidden = False
        for shape, fmt in TIE_LAYOUTS:
            x, *_ = _tied_data(case, shape, fmt, torch.float64)
            dims = (0, *range(2, len(shape)))
            a = (x - x.mean(dims, keepdim=True)).abs().transpose(0, 1).reshape(shape[1], -1)
            t = a.sort(1, descending=True).values[:, kk - 1 : kk]
            above, at = (a > t).sum(1), (a == t).sum(1)
            hidden |= bool(((above < kk) & (kk < above + at)).any())
        assert hidden, case


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_auto_matches_eager_on_integer_input(fmt):
    # the trust issue: on integer-valued input the CPU's fused path (what impl="auto" picks) gave
    # the whole gradient of a tied maximum to its first position, 0.65 away from eager's
    from normbench.nn.functional import lp_batch_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (8, 4, 5, 5), generator=g).float().contiguous(memory_format=fmt)
    gy = torch.randn(x.shape, generator=g)
    grads = {}
    for impl in ("auto", "eager"):
        xi = x.clone().requires_grad_()
        grads[impl] = torch.autograd.grad(lp_batch_norm(xi, None, None, training=True, p=math.inf, impl=impl), xi, gy)[0]
    assert _rel(grads["auto"], grads["eager"]) < 1e-5


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_saved_per_channel_values_no_more_than_k_positions(backend):
    # backward keeps x, the weight and a few values per channel: mean, D, the threshold (the
    # statistic itself for the maximum), and on the numba kernels the stretches that reach it (a
    # count and one int32 per stretch: at most k of them without ties) where k int64 positions were
    # kept before, with the statistic (4 + 8 + 4 + 8k bytes a channel in fp32)
    fused.set_backend(backend)
    fused.set_compile(False)
    c = 16
    try:
        x = torch.randn(4, c, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        w = torch.ones(c, requires_grad=True)
        per_channel = {}
        for k in (None, 3, 40):
            storages = {}

            def pack(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fused.FusedLpBatchNorm.apply(x, w, None, math.inf, k, 1e-5)
            per_channel[k] = (sum(storages.values()) - x.numel() * 4 - w.numel() * 4) / c
    finally:
        fused.set_backend("auto")
        fused.set_compile(True)
    for k, size in per_channel.items():
        kk = k or 1
        if backend == "numba":  # mean (fp32), D (fp64), threshold, where it is reached
            assert size <= 4 + 8 + 4 + 4 * (1 + kk) <= 4 + 8 + 4 + 8 * kk, per_channel
        else:  # mean, D, threshold (fp32): nothing that grows with k
            assert size == 12, per_channel


@needs_numba
@pytest.mark.parametrize("forward_on,backward_on", [("numba", "torch"), ("torch", "numba")])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backward_on_another_backend_than_forward(forward_on, backward_on, fmt):
    # what forward keeps means the same on every backend: the threshold in the compute dtype (and
    # the numba kernels' list of where it is reached, which the others do without)
    fused.set_compile(False)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x, w, b, gy = _tied_data("integers", (16, 3, 16, 12), fmt, dtype)
            for k in (None, 3):
                fused.set_backend(forward_on)
                xg = x.clone().requires_grad_()
                y = fused.FusedLpBatchNorm.apply(xg, None, None, math.inf, k, 1e-5)[0]
                fused.set_backend(backward_on)
                gx = torch.autograd.grad(y, xg, gy)[0]
                xr = x.double().requires_grad_()
                want = torch.autograd.grad(oracle.batch_norm(xr, p=math.inf, k=k), xr, gy.double())[0]
                assert _rel(gx, want) < TIE_TOL[dtype], (dtype, k)
    finally:
        fused.set_backend("auto")
        fused.set_compile(True)
