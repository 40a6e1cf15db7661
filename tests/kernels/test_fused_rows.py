"""The fused row norms (LpLayerNorm, LpRMSNorm, LpGroupNorm with impl="fused") against the fp64
oracle: every p and k, float32, bfloat16 and float64 storage, odd row lengths, ties, gradcheck
through the autograd Function, and what impl="auto" picks. numba kernels on the CPU; the Triton
kernels under TRITON_INTERPRET=1 (tests/conftest.py sets it).

Compile time counts in CI: each dtype compiles the two numba kernels once per process (and
numba's disk cache keeps them); shapes stay small."""

import importlib.util
import math

import pytest
import torch

import oracle
from normbench.kernels import fused, fused_rows
from normbench.nn import LpGroupNorm, LpLayerNorm, LpRMSNorm
from oracle import PK, PK_IDS

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_numba = pytest.mark.skipif(not fused.numba_available(), reason="numba is not installed (pip install -e .)")

# every p and k, and top-40: beyond the insertion (k <= 32), the partition of a row's deviations
PK_ALL = PK + [(math.inf, 40)]
PK_ALL_IDS = PK_IDS + ["top40"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture(params=["numba", "triton"])
def backend(request):
    """Each kernel backend in turn (Triton under the interpreter); skipped when not installed."""
    if request.param == "numba" and not fused.numba_available():
        pytest.skip("numba is not installed (pip install -e .)")
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed (pip install -e '.[test]' on Linux x86_64)")
    fused.set_backend(request.param)
    yield request.param
    fused.set_backend("auto")


def _rel(got, want):
    got, want = got.double(), want.double()
    scale = want.norm()
    return ((got - want).norm() / (scale if scale > 0 else 1)).item()


def _params(n_or_shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n_or_shape, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(n_or_shape, generator=g, dtype=torch.float64)
    return w, b


def _run(layer, x, gy, dtype):
    """(y, dx, dweight, dbias or None) of ``layer`` on ``x`` stored in ``dtype`` (parameters in float32
    for half storage, as a bf16 model's would be after autocast: here in the dtype's compute type)."""
    xg = x.to(dtype).requires_grad_()
    params = list(layer.parameters())
    y = layer(xg)
    assert y.dtype == dtype and y.shape == x.shape
    grads = torch.autograd.grad(y, [xg, *params], gy.to(dtype))
    return y, grads[0], grads[1:]


def _oracle(kind, x, w, b, p, k, eps, shape_arg):
    xr = x.double().requires_grad_()
    wr, br = w.clone().requires_grad_(), None if b is None else b.clone().requires_grad_()
    if kind == "layer":
        ref = oracle.layer_norm(xr, 1, wr, br, p, k, eps)
    elif kind == "rms":
        ref = oracle.layer_norm(xr, 1, wr, None, p, k, eps, center=False)
    else:
        ref = oracle.group_norm(xr, shape_arg, wr, br, p, k, eps)
    return ref, [xr, wr] + ([] if br is None else [br])


def _layer(kind, n_or_c, p, k, dtype, w, b, groups=None):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "layer":
        m = LpLayerNorm(n_or_c, p=p, k=k, impl="fused")
    elif kind == "rms":
        m = LpRMSNorm(n_or_c, p=p, k=k, eps=1e-6, impl="fused")
    else:
        m = LpGroupNorm(groups, n_or_c, p=p, k=k, impl="fused")
    m = m.to(param_dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(b)
    return m


def _check(kind, x, p, k, dtype, groups=None, tol=None, seed=1):
    n_or_c = x.shape[1] if kind == "group" else x.shape[-1]
    w, b = _params(n_or_c, seed)
    m = _layer(kind, n_or_c, p, k, dtype, w, b, groups)
    xd = x.to(dtype)  # the oracle sees the stored values
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    y, gx, gparams = _run(m, xd, gy, dtype)
    eps = 1e-6 if kind == "rms" else 1e-5
    ref, leaves = _oracle(kind, xd, w.to(m.weight.dtype).double(), None if kind == "rms" else b.to(m.weight.dtype).double(),
                          p, k, eps, groups)
    want = torch.autograd.grad(ref, leaves, gy.double())
    tol = tol or TOL[dtype]
    assert _rel(y, ref) < tol
    assert _rel(gx, want[0]) < tol
    for got, exp in zip(gparams, want[1:]):
        assert _rel(got, exp) < tol


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5


@pytest.mark.parametrize("n", [1, 3, 1000, 16385])
@pytest.mark.parametrize("p,k", PK_ALL, ids=PK_ALL_IDS)
def test_layer_norm_fp64_every_p_and_row_length(backend, p, k, n):
    if (k or 1) > n:
        pytest.skip("top-k needs k <= n")
    if backend == "triton" and n == 16385 and k is not None:
        pytest.skip("the interpreter's sort of a 16k row is slow; 1000 covers the kernel's top-k path")
    _check("layer", _x((2 if n > 1000 else 5, n)), p, k, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,k", PK_ALL, ids=PK_ALL_IDS)
def test_layer_and_rms_norm_in_storage_dtypes(backend, p, k, dtype):
    x = _x((6, 1000))
    _check("layer", x, p, k, dtype)
    _check("rms", x, p, k, dtype)


@needs_numba
@pytest.mark.parametrize("p,k", PK_ALL, ids=PK_ALL_IDS)
@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_numba_kernels_over_uneven_thread_stretches(monkeypatch, p, k, kind):
    """The CPU kernels pass each row's next row along within a thread's stretch (forward's sum,
    backward's reduction pass) and sum the parameter gradients over the stretches: stretches of 0,
    1, 2 and 4 rows, whatever this machine's thread count, against the oracle (group-norm: row r
    takes weight row r % G, so a row and the next one use different weight rows)."""
    from normbench.kernels import numba_rows

    monkeypatch.setattr(numba_rows, "_bounds", lambda rows, threads: torch.tensor([0, 1, 1, 3, rows]).numpy())
    fused.set_backend("numba")
    try:
        if kind == "group":
            _check("group", _x((7, 4, 25)), p, k, torch.float64, groups=2)
        else:
            _check(kind, _x((7, 50)), p, k, torch.float64)
    finally:
        fused.set_backend("auto")


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
@pytest.mark.parametrize("shape,fmt", [((3, 6, 4, 5), torch.contiguous_format), ((3, 6, 4, 5), torch.channels_last),
                                       ((2, 6, 7), torch.contiguous_format)])
def test_group_norm(backend, p, k, shape, fmt):
    x = _x(shape).contiguous(memory_format=fmt)
    _check("group", x, p, k, torch.float64, groups=3)
    m = LpGroupNorm(3, 6, p=p, k=k, impl="fused").double()
    assert m(x).is_contiguous(memory_format=fmt), "output keeps the input's memory format"


@pytest.mark.parametrize("case", ["integers", "constant rows", "constant blocks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,k", PK_ALL, ids=PK_ALL_IDS)
def test_ties_follow_the_tie_rule(backend, p, k, dtype, case):
    # rows of 64 integers: every mean is a dyadic rational (exact in every dtype), so the
    # deviations and their ties are the same in the kernel's arithmetic as in the oracle's
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (8, 64), generator=g).double()
    if case == "constant rows":
        x[::2] = 2.0
    elif case == "constant blocks":
        x[:, :32] = 1.0
        x[:, 32:48] = -1.0
    _check("layer", x, p, k, dtype, tol=TOL[torch.float32] if dtype != torch.bfloat16 else 2e-2)
    _check("rms", x, p, k, dtype, tol=TOL[torch.float32] if dtype != torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_gradcheck_through_the_function(backend, p, k):
    kernels = fused_rows._kernels(torch.zeros(1, dtype=torch.float64), wait=True)
    assert kernels is not None
    x = _x((4, 7)).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(7, 5))
    for center in (True, False):
        def f(x, w, b, center=center):
            return fused_rows.FusedLpRowNorm.apply(x, w[None], b[None], p, k, 1e-5, center, kernels)

        assert torch.autograd.gradcheck(f, (x, w, b))
    # group-norm's rows: a parameter row per group (row r takes row r % W)
    wg, bg = (torch.rand(2, 7, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(2, 7, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: fused_rows.FusedLpRowNorm.apply(x, w, b, p, k, 1e-5, True, kernels), (x, wg, bg))


@needs_numba
def test_auto_takes_the_row_kernels_where_they_apply(monkeypatch):
    calls = []
    real = fused_rows.FusedLpRowNorm.apply
    monkeypatch.setattr(fused_rows.FusedLpRowNorm, "apply", lambda *a: (calls.append(a[0].dtype), real(*a))[1])
    big = fused_rows.CPU_MIN_NUMEL // 64
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        LpLayerNorm(64, p=1).to(dtype)(torch.randn(big, 64, dtype=dtype))
        LpRMSNorm(64).to(dtype)(torch.randn(big, 64, dtype=dtype))
        LpLayerNorm(16, p=float("inf"), k=2).to(dtype)(torch.randn(4, 16, dtype=dtype))  # top-k: any size
    assert calls == [torch.float32] * 3 + [torch.bfloat16] * 3 + [torch.float64] * 3
    calls.clear()
    LpLayerNorm(16, p=1)(torch.randn(4, 16))  # L1 and L2 on small inputs: analytic measured faster
    LpLayerNorm(64).half()(torch.randn(big, 64).half())  # no float16 in the numba kernels: analytic
    fused.set_backend("torch")
    try:
        LpLayerNorm(64)(torch.randn(big, 64))
    finally:
        fused.set_backend("auto")
    assert calls == []
    assert fused_rows.preferred(torch.randn(big, 64), 64)
    assert fused_rows.preferred(torch.randn(4, 16), 16, float("inf"), None)
    assert not fused_rows.preferred(torch.randn(4, 16), 16)
    assert not fused_rows.preferred(torch.randn(big, 64).half(), 64)


@needs_numba
def test_fused_falls_back_to_analytic_where_no_kernel_takes_the_input():
    x = _x((4, 8)).half()
    y = LpLayerNorm(8, p=float("inf"), k=2, impl="fused").half()(x)
    ref = oracle.layer_norm(x.double(), 1, None, None, float("inf"), 2)
    assert y.dtype == torch.float16 and _rel(y, ref) < 2e-3


def test_compile_of_the_fused_layer_matches_eager():
    m = LpLayerNorm(8, p=1, impl="fused")
    x = _x((4, 8)).float()
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, LpLayerNorm(8, p=1, impl="eager")(x))
