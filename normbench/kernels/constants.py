"""The constants that make each dispersion an unbiased estimate of sigma for Gaussian input.

For ``x ~ N(mu, sigma^2)``, ``|x - mu| / sigma`` is half-normal. The mean absolute deviation has
expectation ``sigma * sqrt(2/pi)``, so ``C1 = sqrt(pi/2)``. The mean of the k largest of n
half-normal values has an expectation ``m(n, k)`` with no closed form; ``Ck(n) = 1 / m(n, k)``
(k = 1 is the maximum, ``Cinf(n)``). We compute ``m(n, k)`` by quadrature of the order-statistic
density, once per (n, k), and cache it:

    E[sum of the k largest] = n * integral_0^inf x f(x) P(Binomial(n-1, q(x)) <= k-1) dx,

with ``f`` the half-normal density and ``q`` its survival function: a value x counts in the top k
when at most k-1 of the other n-1 values exceed it.

The paper's code used ``0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 * ln n)`` for every k
(:func:`paper_linf_constant`); docs/norms.md compares the two.
"""

from __future__ import annotations

import functools
import math

import torch

C1 = math.sqrt(math.pi / 2)

# Quadrature grid for the half-normal: the integrand is negligible beyond x = 12 for any n that
# fits in memory (n * q(12) < 1e-20 for n < 1e12), and peaks with a width of about
# 1/sqrt(2 ln n) >= 0.1, which this step resolves to well below 1e-6 relative error.
_X_MAX = 12.0
_GRID = 48_001
_K_CHUNK = 64


def expected_topk_mean(n: int, k: int = 1) -> float:
    """E[mean of the k largest of n independent half-normal(0, 1) values] (k = 1: the maximum)."""
    n, k = int(n), int(k)
    if not 1 <= k <= n:
        raise ValueError(f"top-k needs 1 <= k <= n, got k={k}, n={n}")
    if k == n:
        return math.sqrt(2 / math.pi)
    x = torch.linspace(0.0, _X_MAX, _GRID, dtype=torch.float64)
    pdf = math.sqrt(2 / math.pi) * torch.exp(-0.5 * x * x)
    q = torch.special.erfc(x / math.sqrt(2)).clamp(min=1e-300)
    m = n - 1
    log_q, log_1mq = torch.log(q), torch.log1p(-q.clamp(max=1 - 1e-16))
    cdf = torch.zeros_like(x)
    for j0 in range(0, k, _K_CHUNK):
        j = torch.arange(j0, min(k, j0 + _K_CHUNK), dtype=torch.float64)[:, None]
        log_binom = math.lgamma(m + 1) - torch.lgamma(j + 1) - torch.lgamma(m - j + 1)
        cdf += torch.exp(log_binom + j * log_q + (m - j) * log_1mq).sum(0)
    integrand = x * pdf * cdf
    # Simpson's rule on the uniform grid (odd number of points).
    h = _X_MAX / (_GRID - 1)
    total = integrand[0] + integrand[-1] + 4 * integrand[1:-1:2].sum() + 2 * integrand[2:-1:2].sum()
    return float(n * total * h / 3) / k


@functools.lru_cache(maxsize=4096)
def topk_constant(n: int, k: int = 1) -> float:
    """``Ck(n)``: the factor that makes ``Ck(n) * mean(topk(|x - mu|, k))`` unbiased for sigma."""
    return 1.0 / expected_topk_mean(n, k)


@torch.compiler.assume_constant_result
def dispersion_constant(p: float, n: int, k: int | None = None) -> float:
    """The factor in front of each dispersion statistic: 1 for p=2, ``C1`` for p=1, ``Ck(n)``
    for p=inf (k=None is the maximum). A constant for torch.compile: it is computed in Python
    (and cached), never traced."""
    if p == 2:
        return 1.0
    if p == 1:
        return C1
    return topk_constant(n, 1 if k is None else k)


def paper_linf_constant(n: int) -> float:
    """The constant of the paper's code for max and top-k alike: ``0.5 (1 + sqrt(pi ln 4)) /
    sqrt(2 ln n)``. It under-scales: Gaussian input comes out with a standard deviation of about
    0.69 (k=1) to 0.76 (k=10) at n = 65,536, not 1."""
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))
