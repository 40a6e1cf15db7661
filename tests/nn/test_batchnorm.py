"""LpBatchNorm against the fp64 oracle, torch's BatchNorm, and its own contract."""

import math

import pytest
import torch

import oracle
from normbench.nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from normbench.nn.functional import lp_batch_norm
from oracle import PK, PK_IDS

SHAPES = {1: [(6, 3), (4, 3, 5)], 2: [(4, 3, 5, 3)], 3: [(2, 3, 4, 3, 2)]}
MODULES = {1: LpBatchNorm1d, 2: LpBatchNorm2d, 3: LpBatchNorm3d}
TORCH = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
CASES = [(r, s) for r, shapes in SHAPES.items() for s in shapes]


def _x(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)


def _layer(rank, p, k, impl="auto", **kw):
    m = MODULES[rank](3, p=p, k=k, impl=impl, **kw).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        m.bias.copy_(torch.tensor([0.1, -0.3, 2.0]))
    return m


def _memory_formats(shape):
    if len(shape) == 4:
        return [torch.contiguous_format, torch.channels_last]
    if len(shape) == 5:
        return [torch.contiguous_format, torch.channels_last_3d]
    return [torch.contiguous_format]


@pytest.mark.parametrize("rank,shape", CASES)
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
@pytest.mark.parametrize("impl", ["analytic", "eager"])
def test_train_forward_backward_against_fp64_oracle(rank, shape, p, k, impl):
    for fmt in _memory_formats(shape):
        m = _layer(rank, p, k, impl)
        x = _x(shape).contiguous(memory_format=fmt).requires_grad_()
        y = m(x)
        assert y.is_contiguous(memory_format=fmt)
        xr = x.detach().clone().requires_grad_()
        ref = oracle.batch_norm(xr, m.weight.detach(), m.bias.detach(), p, k)
        torch.testing.assert_close(y, ref)
        gy = _x(shape, seed=1)
        gx = torch.autograd.grad(y, x, gy)[0]
        torch.testing.assert_close(gx, torch.autograd.grad(ref, xr, gy)[0])
        # running statistics: mean and the bias-corrected squared dispersion, momentum 0.1
        mean, var = oracle.batch_norm_statistics(x.detach(), p, k)
        torch.testing.assert_close(m.running_mean, 0.1 * mean)
        torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var)
        assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_gradcheck_module_all_params(p, k):
    m = _layer(2, p, k)
    x = _x((4, 3, 3, 2)).requires_grad_()

    def f(x, w, b):
        return lp_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, p, k)

    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_eval_uses_running_statistics(p, k):
    m = _layer(2, p, k)
    for seed in range(3):
        m(_x((4, 3, 5, 3), seed))
    m.eval()
    x = _x((2, 3, 4, 4), seed=9)
    scale = torch.sqrt(m.running_var + m.eps)
    want = (x - m.running_mean.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1) * m.weight.view(1, 3, 1, 1) + m.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m.running_scale, scale)
    torch.testing.assert_close(lp_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, p=p, k=k, impl="eager"), want)


@pytest.mark.parametrize("rank,shape", CASES)
def test_p2_equals_torch_batchnorm_train_and_eval(rank, shape):
    for fmt in _memory_formats(shape):
        ours, theirs = MODULES[rank](3).double(), TORCH[rank](3).double()
        theirs.load_state_dict(ours.state_dict())
        for seed in range(3):
            x = _x(shape, seed).contiguous(memory_format=fmt).requires_grad_()
            x2 = x.detach().clone().requires_grad_()
            y, y2 = ours(x), theirs(x2)
            torch.testing.assert_close(y, y2)
            gy = _x(shape, seed + 10)
            torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y2, x2, gy)[0])
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value)
        ours.eval(), theirs.eval()
        x = _x(shape, 5)
        torch.testing.assert_close(ours(x), theirs(x))


def test_state_dict_loads_both_ways_and_keys_match():
    t = torch.nn.BatchNorm2d(4)
    t(torch.randn(8, 4, 3, 3))
    ours = LpBatchNorm2d(4, p=1)
    assert set(ours.state_dict()) == set(t.state_dict())
    ours.load_state_dict(t.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.running_var, t.running_var)


def test_momentum_none_is_cumulative_average():
    m = LpBatchNorm1d(3, p=1, momentum=None).double()
    xs = [_x((10, 3), s) for s in range(3)]
    for x in xs:
        m(x)
    means = torch.stack([oracle.batch_norm_statistics(x, 1.0)[0] for x in xs])
    torch.testing.assert_close(m.running_mean, means.mean(0))


def test_no_running_stats_and_no_affine():
    m = LpBatchNorm2d(3, p=math.inf, affine=False, track_running_stats=False).double().eval()
    assert m.weight is None and m.running_mean is None
    x = _x((4, 3, 3, 3))
    torch.testing.assert_close(m(x), oracle.batch_norm(x, p=math.inf))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_low_precision_accumulates_in_fp32(dtype, p, k):
    x = _x((8, 3, 6, 6), dtype=dtype)
    m = LpBatchNorm2d(3, p=p, k=k)
    y = m(x.requires_grad_())
    assert y.dtype == dtype
    ref = oracle.batch_norm(x.detach().double(), p=p, k=k)
    err = (y.double() - ref).norm() / ref.norm()
    assert err < 4 * torch.finfo(dtype).eps  # just the output's rounding: statistics are exact enough
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", ["analytic", "fused"])
def test_compile_matches_eager(impl):
    # top-k: its constant is computed in Python, not traced (fullgraph fails on a graph break)
    m = LpBatchNorm2d(3, p=math.inf, k=2, impl=impl)
    x = torch.randn(4, 3, 5, 5)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x.requires_grad_())
    y.sum().backward()
    ref = LpBatchNorm2d(3, p=math.inf, k=2, impl="eager")(x.detach())
    torch.testing.assert_close(y, ref)


def test_autocast_bf16():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), LpBatchNorm2d(4, p=math.inf, k=2))
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(model[0].weight.grad).all()


@pytest.mark.parametrize(
    "make,x,msg",
    [
        (lambda: LpBatchNorm2d(3), torch.randn(2, 4, 3, 3), "3 .*weight|4 channels"),
        (lambda: LpBatchNorm1d(3), torch.randn(1, 3), "more than 1 value per channel"),
        (lambda: LpBatchNorm2d(3, p=math.inf, k=20), torch.randn(2, 3, 3, 3), "k <= the 18 values"),
        (lambda: LpBatchNorm2d(3), torch.randn(2, 3, 3), "expected 4D input"),
    ],
)
def test_errors(make, x, msg):
    with pytest.raises(ValueError, match=msg):
        make()(x)


@pytest.mark.parametrize("p,k,msg", [(3, None, "p must be 1, 2 or"), (2, 4, "k .* only with p=float"), (math.inf, 0, "positive integer")])
def test_bad_p_k(p, k, msg):
    with pytest.raises(ValueError, match=msg):
        LpBatchNorm2d(3, p=p, k=k)
