import math

import pytest
import torch
from torch.nn.utils import parametrize

from normbench.nn import bounded_weight_norm, channel_norm, remove_weight_norm, weight_norm

P = [1.0, 2.0, math.inf]


def _conv(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 4, 3).double()


def _norms(w, p):
    return torch.tensor([torch.linalg.vector_norm(w[i].flatten(), ord=p).item() for i in range(w.shape[0])],
                        dtype=torch.float64)


@pytest.mark.parametrize("p", P)
def test_weight_norm_keeps_weight_and_learns_g(p):
    conv = _conv()
    w0 = conv.weight.detach().clone()
    weight_norm(conv, p=p)
    torch.testing.assert_close(conv.weight, w0)
    g = conv.parametrizations.weight.original0
    torch.testing.assert_close(g.flatten(), _norms(w0, p))
    with torch.no_grad():
        g.mul_(2.0)
    torch.testing.assert_close(_norms(conv.weight, p), 2 * _norms(w0, p))
    conv(torch.randn(2, 3, 5, 5, dtype=torch.float64)).sum().backward()
    assert g.grad is not None and conv.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("p", P)
def test_bounded_weight_norm_keeps_initial_norm(p):
    conv = _conv()
    norms0 = _norms(conv.weight, p)
    bounded_weight_norm(conv, p=p)
    v = conv.parametrizations.weight.original
    with torch.no_grad():
        v.mul_(torch.rand(4, 1, 1, 1, dtype=torch.float64) * 5 + 0.1)
        v.add_(0.3 * torch.randn_like(v))
    torch.testing.assert_close(_norms(conv.weight, p), norms0)
    assert [n for n, _ in conv.named_parameters()] == ["bias", "parametrizations.weight.original"]


def test_bounded_weight_norm_rho_value_and_gradcheck():
    lin = torch.nn.Linear(5, 3).double()
    bounded_weight_norm(lin, p=1, rho=2.0)
    torch.testing.assert_close(_norms(lin.weight, 1), torch.full((3,), 2.0, dtype=torch.float64))
    v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    f = lin.parametrizations.weight[0]
    assert torch.autograd.gradcheck(f, (v,))


def test_state_dict_round_trip_and_remove():
    a = bounded_weight_norm(_conv(0), p=2, rho=1.5)
    b = bounded_weight_norm(_conv(1), p=2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.weight, a.weight)
    c = weight_norm(_conv(2), p=math.inf)
    d = weight_norm(_conv(3), p=math.inf)
    d.load_state_dict(c.state_dict())
    torch.testing.assert_close(d.weight, c.weight)
    w = d.weight.detach().clone()
    remove_weight_norm(d)
    assert not parametrize.is_parametrized(d)
    torch.testing.assert_close(d.weight, w)


def test_errors():
    with pytest.raises(ValueError, match="p must be 1, 2 or"):
        weight_norm(_conv(), p=3)
    with pytest.raises(ValueError, match="no tensor parameter 'kernel'"):
        weight_norm(_conv(), name="kernel")
    conv = weight_norm(_conv())
    with pytest.raises(ValueError, match="already parametrized"):
        bounded_weight_norm(conv)
    with pytest.raises(ValueError, match="no weight norm to remove"):
        remove_weight_norm(_conv())


def test_channel_norm_shape():
    w = torch.randn(4, 3, 2, 2)
    assert channel_norm(w).shape == (4, 1, 1, 1)
    torch.testing.assert_close(channel_norm(w, 2).flatten(), w.flatten(1).norm(dim=1))
