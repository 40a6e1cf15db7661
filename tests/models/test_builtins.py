"""The built-in models: each runs forward and backward on its default input, holds the
normalization layers it promises, and is the same on every build without touching the global RNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normbench.models import builtins
from normbench.nn import LpBatchNorm2d

KINDS = {"cnn": {LpBatchNorm2d}, "resnet": {nn.BatchNorm2d}, "transformer": {nn.LayerNorm, nn.RMSNorm}}


@pytest.mark.parametrize("name", list(builtins.BUILTINS))
def test_builtin_runs_and_has_its_norm_layers(name):
    model = builtins.build(name)
    x = torch.randn(builtins.input_shape(name))
    out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    kinds = {type(m) for m in model.modules()}
    assert KINDS[name] <= kinds
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(builtins.BUILTINS))
def test_builtin_is_deterministic_and_leaves_the_rng(name):
    state = torch.random.get_rng_state()
    a, b = builtins.build(name), builtins.build(name)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_resnet_has_a_strided_shortcut_with_batch_norm():
    model = builtins.build("resnet")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert "layer2.0.downsample.1" in names and len(names) == 8
