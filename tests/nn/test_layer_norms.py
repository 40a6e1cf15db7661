"""LpLayerNorm, LpRMSNorm and LpGroupNorm against the fp64 oracle and torch's own layers."""

import pytest
import torch

import oracle
from normbench.nn import LpGroupNorm, LpLayerNorm, LpRMSNorm
from normbench.nn.functional import lp_group_norm, lp_layer_norm, lp_rms_norm
from oracle import PK, PK_IDS


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 - 0.7


def _randomize(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(torch.rand(prm.shape, generator=g, dtype=prm.dtype) + 0.5)
    return m


def _check_fwd_bwd(y, ref, x, xr):
    torch.testing.assert_close(y, ref)
    gy = _x(y.shape, 3)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, xr, gy)[0])


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
@pytest.mark.parametrize("impl", ["analytic", "eager"])
@pytest.mark.parametrize("normalized", [(6,), (3, 4)])
def test_layer_norm_against_oracle(p, k, impl, normalized):
    m = _randomize(LpLayerNorm(normalized, p=p, k=k, impl=impl).double())
    x = _x((2, 5, *normalized)).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = oracle.layer_norm(xr, len(normalized), m.weight.detach(), m.bias.detach(), p, k)
    _check_fwd_bwd(m(x), ref, x, xr)


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
@pytest.mark.parametrize("impl", ["analytic", "eager"])
def test_rms_norm_against_oracle(p, k, impl):
    m = _randomize(LpRMSNorm(8, p=p, k=k, eps=1e-6, impl=impl).double())
    x = _x((4, 3, 8)).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = oracle.layer_norm(xr, 1, m.weight.detach(), None, p, k, eps=1e-6, center=False)
    _check_fwd_bwd(m(x), ref, x, xr)


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
@pytest.mark.parametrize("impl", ["analytic", "eager"])
@pytest.mark.parametrize("shape", [(3, 6, 4, 2), (3, 6, 5), (2, 6, 2, 2, 2)])
def test_group_norm_against_oracle(p, k, impl, shape):
    m = _randomize(LpGroupNorm(3, 6, p=p, k=k, impl=impl).double())
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    x = _x(shape).contiguous(memory_format=fmt).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    _check_fwd_bwd(y, oracle.group_norm(xr, 3, m.weight.detach(), m.bias.detach(), p, k), x, xr)


@pytest.mark.parametrize(
    "ours,theirs,shape",
    [
        (LpLayerNorm(8), torch.nn.LayerNorm(8), (4, 3, 8)),
        (LpLayerNorm((2, 4), bias=False), torch.nn.LayerNorm((2, 4), bias=False), (5, 2, 4)),
        (LpRMSNorm(8), torch.nn.RMSNorm(8), (4, 3, 8)),
        (LpRMSNorm(8, eps=1e-3), torch.nn.RMSNorm(8, eps=1e-3), (4, 8)),
        (LpGroupNorm(2, 4), torch.nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    ],
)
def test_p2_equals_torch(ours, theirs, shape):
    ours, theirs = _randomize(ours.double()), theirs.double()
    theirs.load_state_dict(ours.state_dict())
    x = _x(shape).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    _check_fwd_bwd(ours(x), theirs(xr), x, xr)


@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_gradcheck_functionals(p, k):
    x = _x((3, 6, 2, 2)).requires_grad_()
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: lp_group_norm(x, 2, w, b, p=p, k=k), (x, w, b))
    h = _x((4, 6)).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w, b: lp_layer_norm(h, (6,), w, b, p=p, k=k), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: lp_rms_norm(h, (6,), w, 1e-6, p=p, k=k), (h, w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype(dtype):
    x = _x((4, 16)).to(dtype).requires_grad_()
    for m in (LpLayerNorm(16, p=1), LpRMSNorm(16, p=float("inf"), k=2)):
        y = m(x)
        assert y.dtype == dtype
        y.float().sum().backward()
        assert x.grad.dtype == dtype


def test_errors():
    with pytest.raises(ValueError, match="normalized_shape"):
        LpLayerNorm(5)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="cannot be split into 4 groups"):
        lp_group_norm(torch.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match="expected input with 6 channels"):
        LpGroupNorm(3, 6)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="k <= the 4 values"):
        LpLayerNorm(4, p=float("inf"), k=5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        LpLayerNorm(4, impl="fast")(torch.randn(2, 4))
