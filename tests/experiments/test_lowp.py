"""The low-precision batch-norm layer that ``plot halfprec`` trains: against the stability
command's native path (same bits), against a float64 computation of the formula, and where the
squares overflow."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normbench.axes import parse_norm
from normbench.experiments.lowp import LowPrecisionBatchNorm2d, LowpSpec, Monitor, attach
from normbench.experiments.models import build_model
from normbench.nn import LpBatchNorm2d
from normbench.nn.functional import lp_batch_norm
from normbench.numerics import layers
from normbench.numerics.emulator import Emulator
from normbench.numerics.formats import FORMATS

NORMS = {"l2": (2.0, None), "l1": (1.0, None), "linf": (math.inf, None), "top3": (math.inf, 3)}


def _layer(norm: str, compute: str = "native", dtype: str = "fp16", reduction: str = "pairwise", scale: float = 1.0,
           channels: int = 4, affine_init: bool = False) -> tuple[LowPrecisionBatchNorm2d, Monitor]:
    p, k = NORMS[norm]
    source = LpBatchNorm2d(channels, p=p, k=k)
    if affine_init:
        with torch.no_grad():
            source.weight.copy_(torch.linspace(0.5, 2.0, channels))
            source.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    monitor = Monitor()
    return LowPrecisionBatchNorm2d(source, LowpSpec(p, k, compute, dtype, reduction, scale), "bn", monitor), monitor


def _fp16_input(shape, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).half().float()


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("reduction", ["pairwise", "sum"])
def test_native_layer_is_the_stability_native_path_bit_for_bit(norm, reduction):
    x = _fp16_input((8, 4, 5, 5))
    dy = _fp16_input((8, 4, 5, 5), seed=1)
    layer, _ = _layer(norm, reduction=reduction)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(dy)
    emu = Emulator("fp16", reduction)
    spec = parse_norm(norm)
    ref = layers.native(x, dy, spec, layer.eps, emu, FORMATS["fp16"])
    assert torch.equal(layers.to_rows(y.detach().double(), spec), ref.y)
    assert torch.equal(layers.to_rows(xr.grad.double(), spec), ref.dx)


def _fp64_reference(x, dy, norm, weight, bias, eps=1e-5):
    p, k = NORMS[norm]
    xr = x.double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True)
    y = lp_batch_norm(xr, None, None, w, b, True, 0.1, eps, p, k, impl="eager")
    y.backward(dy.double())
    return y.detach(), xr.grad, w.grad, b.grad


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("tied", [False, True])
def test_native_layer_forward_and_backward_against_fp64(norm, tied):
    x = _fp16_input((8, 4, 5, 5))
    if tied:  # integer values: many equal deviations, so the maximum and the k-th largest are tied
        x = torch.round(x * 2)
    dy = _fp16_input((8, 4, 5, 5), seed=1)
    layer, _ = _layer(norm, affine_init=True)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(dy)
    ref = _fp64_reference(x, dy, norm, layer.weight, layer.bias)
    eps16 = FORMATS["fp16"].eps
    for got, want in zip((y, xr.grad, layer.weight.grad, layer.bias.grad), ref):
        assert _rel(got.detach(), want) < 8 * eps16


@pytest.mark.parametrize("norm", ["l2", "l1", "linf"])
def test_framework_and_fp32_layers_against_fp64(norm):
    x = _fp16_input((8, 4, 5, 5))
    dy = _fp16_input((8, 4, 5, 5), seed=1)
    for compute, tol in (("framework", 8 * FORMATS["fp16"].eps), ("fp32", 1e-5)):
        layer, _ = _layer(norm, compute=compute, affine_init=True)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(dy)
        ref = _fp64_reference(x, dy, norm, layer.weight, layer.bias)
        for got, want in zip((y, xr.grad, layer.weight.grad, layer.bias.grad), ref):
            assert _rel(got.detach(), want) < tol, compute


def test_the_scale_is_invisible_to_the_native_layer_where_nothing_overflows():
    """A power of two scales fp16 values exactly, so output and input gradient (which the chain
    rule multiplies back by the scale) move only by eps's share and rounding."""
    x = _fp16_input((8, 4, 5, 5))
    dy = _fp16_input((8, 4, 5, 5), seed=1)
    outs = []
    for scale in (1.0, 64.0):
        layer, monitor = _layer("l1", scale=scale)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(dy)
        outs.append((y.detach(), xr.grad))
        assert monitor.first_nonfinite is None
    for a, b in zip(outs[1], outs[0]):
        assert _rel(a, b.double()) < 4 * FORMATS["fp16"].eps


def test_l2_overflows_where_l1_does_not():
    """Deviations near 1000: their fp16 squares (1e6) overflow, their absolute values do not."""
    x = _fp16_input((8, 4, 5, 5))
    dy = _fp16_input((8, 4, 5, 5), seed=1)
    results = {}
    for norm in ("l2", "l1"):
        layer, monitor = _layer(norm, scale=1000.0)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(dy)
        results[norm] = (y.detach(), xr.grad, monitor.first_nonfinite)
    _, _, event = results["l2"]
    assert event == {"step": 0, "layer": "bn", "quantity": "statistic"}
    y1, dx1, event1 = results["l1"]
    assert event1 is None and bool(torch.isfinite(y1).all()) and bool(torch.isfinite(dx1).all())
    ref = _fp64_reference(x * 1000.0, dy, "l1", torch.ones(4), torch.zeros(4))
    assert _rel(y1, ref[0]) < 8 * FORMATS["fp16"].eps


def test_sum_order_overflows_in_the_mean():
    """Sum-then-divide: 200 values near 500 sum past fp16's 65504 although their mean fits."""
    x = torch.full((8, 1, 5, 5), 1.0) + _fp16_input((8, 1, 5, 5)) * 0.01
    layer, monitor = _layer("l1", reduction="sum", scale=500.0, channels=1)
    layer(x)
    assert monitor.first_nonfinite["quantity"] == "mean"
    layer, monitor = _layer("l1", reduction="pairwise", scale=500.0, channels=1)
    assert bool(torch.isfinite(layer(x)).all()) and monitor.first_nonfinite is None


def test_fp8_storage_values_and_gradient():
    x = _fp16_input((8, 4, 5, 5))
    layer, _ = _layer("l1", dtype="fp8_e5m2")
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    y.backward(torch.ones_like(y))
    fmt = FORMATS["fp8_e5m2"]
    for t in (y.detach(), xr.grad):
        assert torch.equal(fmt.round(t.double()), t.double())
    assert layer.spec.compute_dtype == "fp16"


def test_running_statistics_follow_the_batch_and_eval_uses_them():
    x = _fp16_input((16, 4, 5, 5)) * 3 + 2
    layer, _ = _layer("l1")
    layer.momentum = 1.0
    layer(x)
    assert torch.allclose(layer.running_mean, x.mean((0, 2, 3)), rtol=2e-3, atol=2e-3)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    # eval reproduces train up to the Bessel factor sqrt(n / (n - 1)) of the running variance
    n = 16 * 25
    assert _rel(y_eval * math.sqrt(n / (n - 1)), y_train.double()) < 4e-3


def test_monitor_keeps_the_first_event_and_its_step():
    m = Monitor()
    m.step = 3
    m.check("a", "output", torch.ones(2))
    m.check("a", "output", torch.tensor([1.0, math.inf]))
    m.step = 4
    m.check("b", "gradient", torch.tensor([math.nan]))
    assert m.first_nonfinite == {"step": 3, "layer": "a", "quantity": "output"}
    m.deviation("a", 2.0)
    m.deviation("a", 5.0)
    assert m.epoch_fields() == {"norm_layers": {"a": {"max_deviation": 5.0}}}
    assert m.epoch_fields() == {"norm_layers": {}}


def test_attach_replaces_every_batch_norm_and_keeps_the_parameters():
    model = build_model("small", "bn", 2.0, (1, 8, 8), 10, 4)
    before = {n: p for n, p in model.named_parameters()}
    attach(model, LowpSpec(1.0, None, "native"), Monitor(), storage="fp16")
    bns = [m for m in model.modules() if isinstance(m, LowPrecisionBatchNorm2d)]
    assert len(bns) == 4 and not any(isinstance(m, LpBatchNorm2d) for m in model.modules())
    assert {n: p for n, p in model.named_parameters()} == before
    out = model(torch.randn(8, 1, 8, 8))  # storage fp16: the classifier's output is an fp16 value
    assert torch.equal(out.half().float(), out)


def test_fp32_network_does_not_see_the_scale():
    """The control: in fp32 a network's loss and gradients do not depend on the scale entering
    its batch-norms (up to eps's share, about eps / D = 1e-4 here)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    results = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(1)
        model = build_model("small", "bn", 2.0, (1, 8, 8), 10, 4)
        attach(model, LowpSpec(1.0, None, "fp32", scale=scale), Monitor())
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert abs(l1 - l2) / l1 < 1e-4
    for a, b in zip(g1, g2):
        assert float((a - b).norm() / b.norm()) < 1e-3


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="compute"):
        LowpSpec(2.0, None, "fp64")
    with pytest.raises(ValueError, match="dtype"):
        LowpSpec(2.0, None, "native", dtype="fp32")
    with pytest.raises(ValueError, match="scale"):
        LowpSpec(2.0, None, "native", scale=0.0)
    with pytest.raises(ValueError, match="reduction"):
        LowpSpec(2.0, None, "native", reduction="tree")
