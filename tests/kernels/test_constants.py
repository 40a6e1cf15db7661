import math

import pytest
import torch

from normbench.kernels.constants import (
    C1,
    dispersion_constant,
    expected_topk_mean,
    paper_linf_constant,
    topk_constant,
)


@pytest.mark.parametrize("n,k", [(8, 1), (100, 1), (100, 10), (4096, 1), (4096, 10), (65536, 1), (65536, 10)])
def test_expected_topk_mean_matches_monte_carlo_to_1_percent(n, k):
    g = torch.Generator().manual_seed(n + k)
    trials = max(200, 2_000_000 // n)
    a = torch.randn(trials, n, generator=g, dtype=torch.float64).abs()
    mc = a.topk(k, dim=1).values.mean().item()
    assert expected_topk_mean(n, k) == pytest.approx(mc, rel=0.01)


def test_closed_forms():
    # mean of a half-normal, and the max of two: E = 2 / sqrt(pi)
    assert expected_topk_mean(1, 1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-9)
    assert expected_topk_mean(2, 1) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)
    # k = n averages every value: the half-normal mean again
    assert expected_topk_mean(50, 50) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-9)
    assert expected_topk_mean(50, 49) > expected_topk_mean(50, 50)
    assert C1 == pytest.approx(math.sqrt(math.pi / 2))


def test_constants_are_unbiased_for_gaussian_scale():
    g = torch.Generator().manual_seed(1)
    sigma, n, k = 3.0, 1024, 8
    x = sigma * torch.randn(2000, n, generator=g, dtype=torch.float64)
    d1 = C1 * x.abs().mean(1)
    dk = topk_constant(n, k) * x.abs().topk(k, dim=1).values.mean(1)
    assert d1.mean().item() == pytest.approx(sigma, rel=0.01)
    assert dk.mean().item() == pytest.approx(sigma, rel=0.01)


def test_dispersion_constant_per_p():
    assert dispersion_constant(2, 100) == 1.0
    assert dispersion_constant(1, 100) == C1
    assert dispersion_constant(math.inf, 100) == topk_constant(100, 1)
    assert dispersion_constant(math.inf, 100, 5) == topk_constant(100, 5)


def test_paper_constant_under_scales_as_documented():
    n = 65536
    # the paper's constant normalizes Gaussian input to a std of about 0.69 (max) and 0.76 (top-10)
    assert paper_linf_constant(n) / topk_constant(n, 1) == pytest.approx(1 / 0.687, rel=0.01)
    assert paper_linf_constant(n) / topk_constant(n, 10) == pytest.approx(1 / 0.761, rel=0.01)


def test_bad_k():
    with pytest.raises(ValueError, match="k <= n"):
        expected_topk_mean(5, 6)
