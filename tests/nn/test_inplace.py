"""A norm layer's output may be modified in place (``ReLU(inplace=True)`` follows batch-norm in
torchvision's ResNets): every implementation gives the gradient of the out-of-place computation."""

import math

import pytest
import torch

from normbench.nn import LpBatchNorm2d, LpGroupNorm, LpLayerNorm, LpRMSNorm

P = [2.0, 1.0, math.inf]


def _layers(p, impl):
    yield "batchnorm", LpBatchNorm2d(6, p=p, impl=impl), (4, 6, 5, 5)
    yield "batchnorm-nhwc", LpBatchNorm2d(6, p=p, impl=impl), (4, 6, 5, 5)
    yield "layernorm", LpLayerNorm(40, p=p, impl=impl), (8, 40)
    yield "rmsnorm", LpRMSNorm(40, p=p, impl=impl), (8, 40)
    yield "groupnorm", LpGroupNorm(2, 6, p=p, impl=impl), (4, 6, 5, 5)


@pytest.mark.parametrize("impl", ["analytic", "fused", "auto"])
@pytest.mark.parametrize("p", P)
def test_in_place_relu_after_the_layer(impl, p):
    for (name, layer, shape), (_, ref_layer, _) in zip(_layers(p, impl), _layers(p, "eager")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g)
        if name.endswith("nhwc"):
            x = x.to(memory_format=torch.channels_last)
        dy = torch.randn(*shape, generator=g)
        grads = []
        for module, inplace in ((layer, True), (layer, True), (ref_layer, False)):  # twice: after any compile
            xr = x.clone().requires_grad_(True)
            y = module(xr)
            y = torch.relu_(y) if inplace else torch.relu(y)
            y.backward(dy)
            grads.append(xr.grad)
        for got in grads[:2]:
            assert torch.allclose(got, grads[2], rtol=1e-4, atol=1e-5), name
