"""The byte model, per norm family, pass and mode, against counts written out by hand."""

from __future__ import annotations

import pytest
import torch

from normbench.axes import parse_norm
from normbench.bench.bytes import pass_bytes

SHAPE = (8, 16, 4, 4)  # 2048 values, 16 channels
E32 = 2048 * 4


def test_batchnorm_fp32_every_pass_and_mode():
    bn = parse_norm("l2")
    p = 2 * 16 * 4  # weight + bias
    r = 2 * 16 * 4  # running mean + var
    s = 2 * 16 * 4  # saved mean + dispersion per channel (fp32)
    assert pass_bytes(bn, SHAPE, torch.float32, "fwd", "train") == 2 * E32 + p + 2 * r + s
    assert pass_bytes(bn, SHAPE, torch.float32, "fwd", "eval") == 2 * E32 + p + r
    assert pass_bytes(bn, SHAPE, torch.float32, "bwd", "train") == 3 * E32 + 16 * 4 + p + s
    assert pass_bytes(bn, SHAPE, torch.float32, "bwd", "eval") == 3 * E32 + 16 * 4 + p + r
    for mode in ("train", "eval"):
        assert pass_bytes(bn, SHAPE, torch.float32, "fwd+bwd", mode) == (
            pass_bytes(bn, SHAPE, torch.float32, "fwd", mode) + pass_bytes(bn, SHAPE, torch.float32, "bwd", mode))


def test_every_dispersion_moves_the_same_bytes():
    counts = {pass_bytes(parse_norm(n), SHAPE, torch.bfloat16, "fwd+bwd", "train") for n in ("l2", "l1", "linf", "top4")}
    assert len(counts) == 1


def test_half_precision_halves_the_tensor_traffic_but_not_the_fp32_statistics():
    bn = parse_norm("l1")
    b32 = pass_bytes(bn, SHAPE, torch.float32, "fwd", "train")
    b16 = pass_bytes(bn, SHAPE, torch.float16, "fwd", "train")
    s = 2 * 16 * 4
    assert b32 - s == 2 * (b16 - s)


def test_layernorm_and_rmsnorm_parameters_and_rows():
    shape = (64, 32)  # 64 rows of 32
    e = 64 * 32 * 2  # bf16
    s = 2 * 64 * 4
    ln, rms = parse_norm("layernorm"), parse_norm("l1-rmsnorm")
    assert pass_bytes(ln, shape, torch.bfloat16, "fwd", "train") == 2 * e + 2 * 32 * 2 + s
    assert pass_bytes(rms, shape, torch.bfloat16, "fwd", "train") == 2 * e + 32 * 2 + s  # no bias
    assert pass_bytes(rms, shape, torch.bfloat16, "bwd", "train") == 3 * e + 32 * 2 + 32 * 2 + s
    # no running statistics: eval backward still reads the saved per-row statistics
    assert pass_bytes(ln, shape, torch.bfloat16, "bwd", "eval") == pass_bytes(ln, shape, torch.bfloat16, "bwd", "train")
    assert pass_bytes(ln, shape, torch.bfloat16, "fwd", "eval") == 2 * e + 2 * 32 * 2


def test_groupnorm_statistics_per_sample_and_group():
    gn = parse_norm("groupnorm")
    shape = (2, 64, 3, 3)  # 32 groups (gcd(32, 64)) per sample
    e = 2 * 64 * 9 * 8  # fp64
    s = 2 * (2 * 32) * 8  # fp64 statistics stay fp64
    assert pass_bytes(gn, shape, torch.float64, "fwd", "train") == 2 * e + 2 * 64 * 8 + s


def test_bad_pass_or_mode():
    with pytest.raises(ValueError):
        pass_bytes(parse_norm("l2"), SHAPE, torch.float32, "sideways", "train")
    with pytest.raises(ValueError):
        pass_bytes(parse_norm("l2"), SHAPE, torch.float32, "fwd", "test")
