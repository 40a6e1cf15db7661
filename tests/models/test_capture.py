"""The capture pass (normbench.models.capture): for every normalization layer, the input and the
gradient at its output, checked against hook-free forwards and autograd; the layout each family is
analysed in, checked against torch's own functional layers in float64; subsampling, skipped layers
and a model left as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.axes import NormSpec
from normbench.errors import UserError
from normbench.models import builtins, capture, layer_cases
from normbench.models.capture import classify, layer_case
from normbench.nn import LpBatchNorm1d, LpGroupNorm, LpLayerNorm, LpRMSNorm, SyncLpBatchNorm
from normbench.numerics.layers import reference, to_rows


def _labels(out: torch.Tensor) -> torch.Tensor:
    # the documented loss of a 2-D output: cross-entropy against labels from a seed-0 generator
    return torch.randint(0, out.shape[1], (out.shape[0],), generator=torch.Generator().manual_seed(0))


def _check(cap, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    names = [layer.name for layer in cap.layers]
    assert names == list(inputs), names  # every norm layer, in forward order
    for layer in cap.layers:
        assert layer.skipped is None
        # fp32 on the CPU: convolution may sum in another order from one call to the next
        x, g = inputs[layer.name].detach(), outputs[layer.name].grad
        torch.testing.assert_close(layer.input, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
        torch.testing.assert_close(layer.grad_output, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
        assert layer.input.device.type == "cpu"


def test_cnn_capture_matches_a_hook_free_forward_and_autograd():
    model = builtins.build("cnn").train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cap = capture(model, x)
    inputs, outputs, h = {}, {}, x
    for name, m in model.named_children():
        if classify(m):
            inputs[name] = h
            h = m(h)
            h.retain_grad()
            outputs[name] = h
        else:
            h = m(h)
    F.cross_entropy(h, _labels(h)).backward()
    _check(cap, inputs, outputs)
    assert {layer.kind for layer in cap.layers} == {"LpBatchNorm2d"}
    assert cap.layers[0].reduction_dims == (0, 2, 3)


def test_resnet_capture_matches_a_hook_free_forward_and_autograd():
    model = builtins.build("resnet").train()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    cap = capture(model, x)
    inputs, outputs = {}, {}

    def norm(name, bn, t):
        inputs[name] = t
        y = bn(t)
        y.retain_grad()
        outputs[name] = y
        return y

    h = torch.relu(norm("bn1", model.bn1, model.conv1(x)))  # out of place: an independent graph
    for lname, layer in (("layer1", model.layer1), ("layer2", model.layer2)):
        for i, block in enumerate(layer):
            p = f"{lname}.{i}"
            ident = h if block.downsample is None else norm(f"{p}.downsample.1", block.downsample[1],
                                                            block.downsample[0](h))
            out = torch.relu(norm(f"{p}.bn1", block.bn1, block.conv1(h)))
            h = torch.relu(norm(f"{p}.bn2", block.bn2, block.conv2(out)) + ident)
    logits = model.fc(torch.flatten(model.pool(h), 1))
    F.cross_entropy(logits, _labels(logits)).backward()
    _check(cap, inputs, outputs)


def test_transformer_capture_matches_a_hook_free_forward_and_autograd():
    model = builtins.build("transformer").train()
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    cap = capture(model, x)
    inputs, outputs = {}, {}

    def norm(name, m, t):
        inputs[name] = t
        y = m(t)
        y.retain_grad()
        outputs[name] = y
        return y

    h = norm("ln1", model.ln1, x)
    x1 = x + model.attn(h, h, h, need_weights=False)[0]
    x2 = x1 + model.mlp(norm("rms", model.rms, x1))
    out = norm("ln_f", model.ln_f, x2)
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * readout).mean().backward()
    _check(cap, inputs, outputs)
    kinds = {layer.name: (layer.kind, layer.family, layer.reduction_dims, layer.eps) for layer in cap.layers}
    assert kinds["rms"] == ("RMSNorm", "rmsnorm", (2,), 1e-6)
    assert kinds["ln1"][:3] == ("LayerNorm", "layernorm", (2,))


def test_capture_leaves_the_model_as_it_was():
    model = builtins.build("resnet").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cap = capture(model, torch.randn(2, 3, 8, 8), train=True)
    assert cap.mode == "train" and all(layer.statistics == "batch" for layer in cap.layers)
    assert not model.training and not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    cap = capture(model, torch.randn(2, 3, 8, 8), train=False)
    assert all(layer.statistics == "running" for layer in cap.layers)


class Mixed(nn.Module):
    """GroupNorm, InstanceNorm, a two-dimensional LayerNorm and normbench's Lp layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.ln = nn.LayerNorm((4, 4))
        self.lp_gn = LpGroupNorm(2, 6, p=1)
        self.lp_ln = LpLayerNorm(96, p=float("inf"))
        self.lp_rms = LpRMSNorm(96, p=1)
        self.head = nn.Linear(96, 5)
        with torch.no_grad():
            for m in (self.gn, self.inorm, self.ln, self.lp_gn, self.lp_ln, self.lp_rms):
                m.weight.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lp_gn(self.ln(self.inorm(self.gn(self.conv(x)))))
        return self.head(self.lp_rms(self.lp_ln(h.flatten(1))))


def _torch_l2(layer, x, w):
    if layer.kind == "GroupNorm":
        return F.group_norm(x, layer.groups, w, None, layer.eps)
    if layer.kind == "InstanceNorm2d":
        return F.instance_norm(x, weight=w, eps=layer.eps)
    return F.layer_norm(x, layer.normalized_shape, w, None, layer.eps)


def test_each_family_is_analysed_with_its_own_axes():
    """The fp64 reference on a layer's case (its analysis layout, gradient dy * weight) equals
    torch's own functional layer in fp64 on the captured tensors: the same statistics, the same
    input gradient through the affine step."""
    torch.manual_seed(0)
    cap = capture(Mixed(), torch.randn(4, 3, 4, 4))
    by_name = {layer.name: layer for layer in cap.layers}
    assert [layer.name for layer in cap.layers] == ["gn", "inorm", "ln", "lp_gn", "lp_ln", "lp_rms"]
    assert by_name["lp_gn"].p == 1.0 and by_name["lp_ln"].p == math.inf
    assert by_name["gn"].reduction_dims == (1, 2, 3) and by_name["ln"].reduction_dims == (2, 3)
    cases = {c.params[0][1]: c for c in layer_cases(cap)}
    for name in ("gn", "inorm", "ln"):
        layer, case = by_name[name], cases[name]
        norm = NormSpec(case.family, 2.0)
        y_ref, dx_ref = reference(case.tensor, case.grad, norm, case.eps)
        x = layer.input.double().requires_grad_(True)
        w = layer.weight.double()
        y = _torch_l2(layer, x, None)
        _torch_l2(layer, x, w).backward(layer.grad_output.double())
        scale = dict(case.fields)["grad_scale"]
        torch.testing.assert_close(y_ref, to_rows(y.detach().reshape(case.shape), norm), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dx_ref, to_rows(x.grad.reshape(case.shape) * scale, norm), rtol=1e-9, atol=1e-9)
    assert 1.0 <= float(cases["ln"].grad.abs().max()) < 2.0  # scaled as a loss scaler would


def test_subsampling_keeps_whole_channels_and_says_so():
    model = builtins.build("resnet")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    full = {layer.name: layer for layer in capture(model, x).layers}
    part = {layer.name: layer for layer in capture(model, x, max_elements=4 * 2 * 8 * 8).layers}
    f, p = full["bn1"], part["bn1"]
    assert p.kept == {"unit": "channels", "kept": 4, "of": 16, "elements": 512, "of_elements": 2048,
                      "how": "half the largest, half the smallest spread"}
    spread = (f.input - f.input.mean((0, 2, 3), keepdim=True)).abs().amax((0, 2, 3))
    chosen = sorted(spread.argsort(descending=True)[:2].tolist() + spread.argsort()[:2].tolist())
    torch.testing.assert_close(p.input, f.input[:, chosen], rtol=0, atol=0)
    torch.testing.assert_close(p.grad_output, f.grad_output[:, chosen], rtol=0, atol=0)
    torch.testing.assert_close(p.weight, f.weight[chosen], rtol=0, atol=0)
    assert full["bn1"].kept["kept"] == 16


def test_skipped_layers_are_listed_with_a_reason():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.BatchNorm1d(4, affine=False)  # on the raw input: no gradient reaches it
            self.lin = nn.Linear(4, 3)
            self.ln = nn.LayerNorm(3)
            self.unused = nn.LayerNorm(3)

        def forward(self, x):
            return self.ln(self.lin(self.first(x)))

    cap = capture(Model(), torch.randn(5, 4))
    reasons = {layer.name: layer.skipped for layer in cap.layers}
    assert reasons["ln"] is None
    assert "no gradient" in reasons["first"] and reasons["unused"] == "not called in the forward pass"
    assert [layer.name for layer in cap.analysed] == ["ln"]
    with pytest.raises(ValueError):
        layer_case(cap.skipped[0], 0)


def test_a_layer_called_twice_is_captured_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            a = self.ln(self.lin(x))
            return self.ln(self.lin(a) * 3)

    model = Shared()
    x = torch.randn(3, 4)
    cap = capture(model, x)
    assert [layer.name for layer in cap.layers] == ["ln", "ln#2"]
    second_input = model.lin(model.ln(model.lin(x))) * 3
    torch.testing.assert_close(cap.layers[1].input, second_input.detach())


def test_a_model_without_norm_layers_is_a_user_error():
    with pytest.raises(UserError, match="no normalization layer"):
        capture(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3))


@pytest.mark.parametrize("module, family", [
    (nn.BatchNorm3d(2), "batchnorm"), (nn.SyncBatchNorm(2), "batchnorm"), (LpBatchNorm1d(2, p=1), "batchnorm"),
    (SyncLpBatchNorm(2, p=1), "batchnorm"), (nn.InstanceNorm1d(2), "instancenorm"), (nn.GroupNorm(1, 2), "groupnorm"),
    (nn.LayerNorm(2), "layernorm"), (nn.RMSNorm(2), "rmsnorm"), (nn.Linear(2, 2), None), (nn.LocalResponseNorm(2), None),
])
def test_classify(module, family):
    assert classify(module) == family


def test_digits_shaped_input_is_real_images():
    from normbench.experiments.data import load_dataset
    from normbench.models.prepare import dataset_images, prepare_model

    images = dataset_images((16, 1, 8, 8))
    assert torch.equal(images, load_dataset("digits").x_train[:16])
    assert dataset_images((16, 3, 8, 8)) is None and dataset_images((5000, 1, 8, 8)) is None
    prepared = prepare_model("builtin:cnn", input_shape=(16, 1, 8, 8))
    assert prepared.input_from == "16 images of the built-in digits dataset"
