"""Bytes saved for backward and peak memory (measured, on tiny tensors), and the paper baseline."""

from __future__ import annotations

import math

import pytest
import torch

from normbench.bench.memory import peak_memory, saved_tensor_bytes
from normbench.bench.paper import PaperLpBatchNorm
from normbench.kernels.constants import C1, paper_linf_constant


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    # mul saves both operands: 2 x 4000 bytes; x * x saves x twice but it is one storage
    assert saved_tensor_bytes(lambda: x * w) == 8000
    assert saved_tensor_bytes(lambda: x * x) == 4000
    assert saved_tensor_bytes(lambda: x + w) == 0  # add saves nothing
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x * w) == 0


def test_saved_bytes_of_torch_batchnorm_is_its_input_and_statistics():
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    bn = torch.nn.BatchNorm2d(8)
    saved = saved_tensor_bytes(lambda: bn(x))
    assert x.numel() * 4 <= saved <= x.numel() * 4 + 8 * 4 * 8  # x, weight, per-channel stats


def test_cpu_peak_memory_sees_the_temporaries():
    def two_temporaries():
        a = torch.ones(250_000)  # 1 MB
        b = a * 2  # another MB while a is alive
        del a
        return b.sum()

    peak, why = peak_memory(two_temporaries, "cpu")
    if peak is None:
        pytest.skip(why)
    assert 2_000_000 <= peak < 2_100_000


def _bn_input():
    torch.manual_seed(0)
    return torch.randn(6, 3, 7, 7) * 3 + 1


def test_paper_l1_matches_its_formula():
    x = _bn_input()
    y = PaperLpBatchNorm(3, p=1).train()(x)
    mu = x.mean((0, 2, 3), keepdim=True)
    d = C1 * (x - mu).abs().mean((0, 2, 3), keepdim=True) + 1e-5
    torch.testing.assert_close(y, (x - mu) / d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [None, 5])
def test_paper_topk_uses_the_papers_constant(k):
    x = _bn_input()
    y = PaperLpBatchNorm(3, p=math.inf, k=k).train()(x)
    n = 6 * 7 * 7
    mu = x.mean((0, 2, 3), keepdim=True)
    a = (x - mu).abs().transpose(0, 1).reshape(3, -1)
    top = a.topk(k or 1, dim=1).values.mean(1).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x - mu) / (top * paper_linf_constant(n) + 1e-5), rtol=1e-5, atol=1e-5)


def test_paper_l2_is_batchnorm_and_eval_uses_running_scale():
    x = _bn_input()
    m = PaperLpBatchNorm(3, p=2).train()
    torch.testing.assert_close(m(x), torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-4, atol=1e-4)
    m.eval()
    m.running_mean.fill_(1.0)
    m.running_scale.fill_(0.5)
    torch.testing.assert_close(m(x), (x - 1.0) * 0.5)


def test_paper_backward_runs():
    x = _bn_input().requires_grad_()
    PaperLpBatchNorm(3, p=math.inf, k=3)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
