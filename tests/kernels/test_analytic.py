"""The analytic backward against gradcheck (fp64) and against autograd through the plain formula."""

import pytest
import torch

from normbench.kernels.analytic import LpNormFunction
from normbench.kernels.reference import affine, lp_normalize
from oracle import PK, PK_IDS

# (input shape, reduced dims, parameter shape broadcastable to the input): batch-norm,
# layer-norm over two trailing dims, and group-norm's grouped layout.
LAYOUTS = {
    "batch": ((5, 3, 4, 2), (0, 2, 3), (1, 3, 1, 1)),
    "layer": ((3, 4, 6), (1, 2), (1, 4, 6)),
    "group": ((2, 2, 3, 5), (2, 3), (1, 2, 3, 1)),
}


def _inputs(shape, pshape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = (torch.rand(pshape, generator=g, dtype=torch.float64) + 0.5)
    b = torch.randn(pshape, generator=g, dtype=torch.float64)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
@pytest.mark.parametrize("center", [True, False])
def test_gradcheck(layout, p, k, center):
    shape, dims, pshape = LAYOUTS[layout]
    x, w, b = _inputs(shape, pshape, seed=3)

    def f(x, w, b):
        return LpNormFunction.apply(x, w, b, dims, p, k, 1e-5, center)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p,k", PK, ids=PK_IDS)
def test_matches_autograd_through_formula(layout, p, k):
    shape, dims, pshape = LAYOUTS[layout]
    x, w, b = _inputs(shape, pshape, seed=4)
    gy = torch.randn(shape, dtype=torch.float64)
    y, mean, stat = LpNormFunction.apply(x, w, b, dims, p, k, 1e-5, True)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    ref_y, ref_mean, ref_stat = lp_normalize(x, dims, p, k, 1e-5, True)
    ref_y = affine(ref_y, w, b)
    ref_grads = torch.autograd.grad(ref_y, (x, w, b), gy)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(stat, ref_stat)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_max_ties_share_the_gradient_like_autograd():
    # two equal largest deviations in a row: autograd's amax splits the gradient between them
    x = torch.tensor([[3.0, -3.0, 1.0, 0.5, -1.5]], dtype=torch.float64).repeat(2, 1).requires_grad_()
    gy = torch.randn(2, 5, dtype=torch.float64)
    y = LpNormFunction.apply(x, None, None, (1,), float("inf"), None, 1e-5, False)[0]
    ref = lp_normalize(x, (1,), float("inf"), None, 1e-5, False)[0]
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])


def test_backward_keeps_input_and_row_statistics_only():
    x = torch.randn(16, 8, 6, 6, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LpNormFunction.apply(x, None, None, (0, 2, 3), 1.0, None, 1e-5, True)[0].sum().backward()
    # x itself plus per-channel mean, scale and statistic: nothing else of the input's size
    assert sorted(sizes) == [8, 8, 8, x.numel()]
