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


def test_fused_is_batch_norm_only():
    from normbench.nn import LpLayerNorm

    with pytest.raises(ValueError, match="batch-norm only"):
        LpLayerNorm(4, impl="fused")(torch.randn(2, 4))


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused.set_backend("cuda")
