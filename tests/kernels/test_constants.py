import math
import subprocess
import sys

import pytest
import torch

from normbench.kernels.constants import (
    C1,
    centered_topk_mean,
    dispersion_constant,
    expected_topk_mean,
    paper_linf_constant,
    rms_mean,
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


def _sample(n: int, seed: int, trials: int | None = None) -> torch.Tensor:
    """Gaussian rows with an arbitrary mean and scale (the constants must not depend on either)."""
    g = torch.Generator().manual_seed(1000 + seed)
    trials = trials or max(20_000, 4_000_000 // n)
    return 7.0 + 3.0 * torch.randn(trials, n, generator=g, dtype=torch.float64)


PK_N = [(p, k, n) for n in (4, 5, 8, 16, 31, 32, 33, 64, 500) for p, k in ((1, None), (math.inf, None),
        (math.inf, 2), (math.inf, 3), (math.inf, 10), (math.inf, n // 2), (math.inf, n)) if k is None or k <= n]


@pytest.mark.parametrize("p,k,n", PK_N)
def test_dispersion_matches_what_l2_divides_by_at_every_n(p, k, n):
    """For Gaussian input, C * statistic averages sqrt(mean(u^2)) (what L2 batch-norm divides by)
    over the same n values centered at their mean, to 1% for every n >= 4: Monte Carlo of the
    centered statistic, independent of the quadrature and sampling inside the constants."""
    x = _sample(n, n * 7 + (k or 1))
    u = x - x.mean(1, keepdim=True)
    a = u.abs()
    stat = a.mean(1) if p == 1 else a.topk(k or 1, dim=1).values.mean(1)
    l2 = u.pow(2).mean(1).sqrt()
    assert (dispersion_constant(p, n, k) * stat).mean().item() == pytest.approx(l2.mean().item(), rel=0.01)


@pytest.mark.parametrize("p,k,n", [(1, None, 4), (1, None, 8), (math.inf, None, 4), (math.inf, 3, 8), (math.inf, 10, 64)])
def test_uncentered_dispersion_matches_rms_norm(p, k, n):
    """Without centering (RMS-norm) the target is sqrt(mean(x^2)) of zero-mean Gaussian rows."""
    x = _sample(n, n + 3) - 7.0
    a = x.abs()
    stat = a.mean(1) if p == 1 else a.topk(k or 1, dim=1).values.mean(1)
    rms = x.pow(2).mean(1).sqrt()
    assert (dispersion_constant(p, n, k, center=False) * stat).mean().item() == pytest.approx(rms.mean().item(), rel=0.01)


@pytest.mark.parametrize("n,k", [(4, 1), (4, 2), (8, 1), (16, 1), (16, 5), (32, 1), (33, 1), (64, 3)])
def test_centered_topk_mean_matches_monte_carlo(n, k):
    x = _sample(n, 100 + n + k, trials=400_000) / 3.0
    mc = (x - x.mean(1, keepdim=True)).abs().topk(k, dim=1).values.mean().item()
    assert centered_topk_mean(n, k) == pytest.approx(mc, rel=0.004)


def test_rms_mean_closed_forms():
    # n = 2 centered: sqrt(mean(u^2)) = |x1 - x2| / 2 with x1 - x2 ~ N(0, 2): E = 1 / sqrt(pi)
    assert rms_mean(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-12)
    # n = 1 uncentered: E|x| = sqrt(2 / pi); large n: 1 - 3 / (4n) + O(1/n^2)
    assert rms_mean(1, center=False) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert rms_mean(10_000) == pytest.approx(1 - 3 / 40_000, rel=1e-7)


def test_dispersion_constant_per_p():
    assert dispersion_constant(2, 100) == 1.0
    # p=1 centered has a closed form: rms_mean(n) / (sqrt(2/pi) sqrt((n-1)/n)); n = 4 gives 2/sqrt(3)
    assert dispersion_constant(1, 4) == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    assert dispersion_constant(1, 10**7) == pytest.approx(C1, rel=1e-6)
    assert dispersion_constant(math.inf, 100) == topk_constant(100, 1)
    assert dispersion_constant(math.inf, 100, 5) == topk_constant(100, 5)
    assert dispersion_constant(math.inf, 100, 1) == dispersion_constant(math.inf, 100)
    # at large n centering and the target's bias vanish: 1 / E[max of n half-normal]
    assert dispersion_constant(math.inf, 65536) == pytest.approx(1 / expected_topk_mean(65536, 1), rel=1e-4)


def test_paper_constant_under_scales_as_documented():
    n = 65536
    # the paper's constant normalizes Gaussian input to a std of about 0.69 (max) and 0.76 (top-10)
    assert paper_linf_constant(n) / topk_constant(n, 1) == pytest.approx(1 / 0.687, rel=0.01)
    assert paper_linf_constant(n) / topk_constant(n, 10) == pytest.approx(1 / 0.761, rel=0.01)


def test_bad_k():
    with pytest.raises(ValueError, match="k <= n"):
        expected_topk_mean(5, 6)


def test_dispersion_constant_is_marked_constant_as_the_decorator_marks():
    # constants.py sets the marker of torch.compiler.assume_constant_result by hand (the decorator
    # imports torch._dynamo: seconds at import time); the decorator must still set that very marker
    def probe(n):
        return n

    torch.compiler.assume_constant_result(probe)
    marked = [name for name, value in vars(probe).items() if value is True]
    assert marked == ["_dynamo_marked_constant"]
    assert getattr(dispersion_constant, "_dynamo_marked_constant", False) is True


def test_import_nn_pulls_in_no_compiler_and_no_kernel_compiler():
    # what made `import normbench.nn` cost seconds beyond torch: dynamo, numba, triton
    code = ("import sys, normbench.nn; "
            "print(sorted(m for m in ('torch._dynamo', 'numba', 'triton', 'llvmlite') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
