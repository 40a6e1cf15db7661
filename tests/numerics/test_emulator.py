"""The emulator on its own: fp32 as the format reproduces fp32 arithmetic bit for bit; single
operations in fp16/bf16 match torch's own; reduction orders give the documented results on
hand-made sums; gradients are the rounded chain rule."""

import math

import pytest
import torch

from normbench.numerics.emulator import Emulator


def _fp32_values(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float32) * scale
    return x


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_fp32_format_reproduces_fp32_elementwise_arithmetic(op):
    emu = Emulator("fp32")
    a32, b32 = _fp32_values(4096, 1, 1e3), _fp32_values(4096, 2, 1e-2)
    expected = getattr(torch, op)(a32, b32)
    got = getattr(emu, op)(a32.double(), b32.double())
    assert torch.equal(got, expected.double())


def test_fp32_format_reproduces_ieee_fp32_sqrt_and_broadcasting():
    """IEEE sqrt is correctly rounded; numpy's float32 sqrt is. (torch 2.13's vectorized CPU
    float32 sqrt is not: it is 1 ulp off on about 15% of these values, so it is not the oracle.)"""
    np = pytest.importorskip("numpy")
    emu = Emulator("fp32")
    a32 = _fp32_values(4096, 3).abs()
    ieee = torch.from_numpy(np.sqrt(a32.numpy()))
    assert torch.equal(emu.sqrt(a32.double()), ieee.double())
    rows, col = _fp32_values(64, 4).reshape(8, 8), _fp32_values(8, 5).reshape(8, 1)
    assert torch.equal(emu.div(rows.double(), col.double()), (rows / col).double())


def test_fp32_format_reproduces_fp32_sequential_and_pairwise_sums():
    x32 = _fp32_values(1000, 6, 100.0).reshape(4, 250)
    seq = x32[:, 0].clone()
    for i in range(1, 250):
        seq = seq + x32[:, i]
    assert torch.equal(Emulator("fp32", "sequential").r_sum_last(x32.double()), seq.double())
    level = x32
    while level.shape[-1] > 1:
        if level.shape[-1] % 2:
            level = torch.cat([level, torch.zeros(4, 1)], -1)
        level = level[:, 0::2] + level[:, 1::2]
    assert torch.equal(Emulator("fp32", "pairwise").r_sum_last(x32.double()), level[:, 0].double())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_single_operations_match_torch_in_the_dtype(dtype):
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    emu = Emulator(dtype)
    a = (_fp32_values(4096, 7, 10.0)).to(tdt)
    b = (_fp32_values(4096, 8, 0.1)).to(tdt)
    for op in ("add", "sub", "mul", "div"):
        assert torch.equal(getattr(emu, op)(a.double(), b.double()), getattr(torch, op)(a, b).double()), op


def test_sequential_fp16_sum_of_ones_stops_at_2048_and_bf16_at_256():
    ones = torch.ones(1, 4096, dtype=torch.float64)
    assert Emulator("fp16", "sequential").r_sum_last(ones).item() == 2048.0
    assert Emulator("bf16", "sequential").r_sum_last(ones).item() == 256.0
    # a tree of exact partial sums, and a single rounding of the exact sum, both reach 4096
    assert Emulator("fp16", "pairwise").r_sum_last(ones).item() == 4096.0
    assert Emulator("fp16", "sum").r_sum_last(ones).item() == 4096.0


def test_fp16_sum_of_160000_ones_overflows_but_the_pairwise_mean_does_not():
    ones = torch.ones(1, 160_000, dtype=torch.float64)
    assert Emulator("fp16", "sum").r_sum_last(ones).item() == math.inf
    assert Emulator("fp16", "pairwise").r_sum_last(ones).item() == math.inf
    assert Emulator("fp16", "sum").r_mean_last(ones).item() == math.inf  # sum then divide
    assert Emulator("fp16", "pairwise").r_mean_last(ones).item() == 1.0  # mean of partial means
    # the sequential sum stalls at 2048, so its mean is 2048 / 160000 rounded to fp16
    seq = Emulator("fp16", "sequential").r_mean_last(ones[:, :5000]).item()
    assert seq == float(torch.tensor(2048 / 5000).half())


def test_pairwise_mean_of_a_non_power_of_two_row():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    # padded to 4: ((1/2 + 2/2)/2 + (3/2 + 0/2)/2) = 1.5, times 4/3 = 2
    assert Emulator("fp16", "pairwise").r_mean_last(x).item() == 2.0


def test_fp64_format_gradients_equal_autograd():
    emu = Emulator("fp64")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(5, 1, generator=g, dtype=torch.float64).add(0.5).requires_grad_(True)
    out = emu.div(emu.sub(a, emu.mean(a, (-1,), keepdim=True)), emu.sqrt(emu.mul(b, b)))
    out = emu.mul(out, emu.amax(emu.abs(a), (-1,), keepdim=True))
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ga, gb = torch.autograd.grad(out, (a, b), w)
    a2, b2 = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    ref = (a2 - a2.mean(-1, keepdim=True)) / (b2 * b2).sqrt() * a2.abs().amax(-1, keepdim=True)
    ra, rb = torch.autograd.grad(ref, (a2, b2), w)
    assert torch.allclose(ga, ra, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gb, rb, rtol=1e-12, atol=1e-12)


def test_gradients_are_rounded_to_the_format():
    emu = Emulator("fp16")
    x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(emu.mean(emu.input(x), (-1,)), x, torch.ones(1, dtype=torch.float64))
    # d mean / dx = 1/3, rounded to fp16
    assert torch.equal(g, torch.full((1, 3), float(torch.tensor(1 / 3).half()), dtype=torch.float64))
    # a broadcast gradient is reduced in the emulator's order: 4096 ones summed sequentially stop at 2048
    seq = Emulator("fp16", "sequential")
    b = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    a = torch.ones(1, 4096, dtype=torch.float64)
    (gb,) = torch.autograd.grad(seq.add(a, b), b, torch.ones(1, 4096, dtype=torch.float64))
    assert gb.item() == 2048.0


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        Emulator("fp16", "random")
