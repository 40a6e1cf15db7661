"""The constants in front of each dispersion statistic: what makes ``C * statistic`` estimate, for
Gaussian input, what L2 normalization divides by at the same n, so that swapping p keeps the scale
of a layer's output (docs/norms.md says why this target rather than sigma).

For ``x ~ N(mu, sigma^2)`` with n values per statistic and ``u = x - mean(x)`` (or ``u = x``
without centering, as RMS-norm), L2 divides by ``sqrt(mean(u^2))``, whose expectation is
``sigma * rms_mean(n)`` (a chi with n-1 degrees of freedom centered, n uncentered, over sqrt(n);
:func:`rms_mean`). Each constant is ``C = rms_mean(n) / E[statistic]``:

- p=1: ``E[mean|u|] = sigma sqrt(2/pi) sqrt((n-1)/n)`` centered (each ``u_j`` is Gaussian with
  variance ``sigma^2 (n-1)/n``), ``sigma sqrt(2/pi)`` uncentered: closed forms. ``C1 = sqrt(pi/2)`` is
  the large-n limit.
- p=inf, top-k: without centering ``|u| / sigma`` is half-normal and the mean of its k largest has
  an expectation ``m(n, k)`` computed by quadrature of the order-statistic density, once per
  (n, k), and cached (:func:`expected_topk_mean`):

      E[sum of the k largest] = n * integral_0^inf x f(x) P(Binomial(n-1, q(x)) <= k-1) dx,

  with ``f`` the half-normal density and ``q`` its survival function. Centering correlates the
  deviations: for n > ``_EXACT_BELOW`` the mean is ``sqrt((n-1)/n) m(n, k)`` (the scale of each
  ``u_j``; within 0.1% of Monte Carlo there), below it a Monte Carlo estimate with a control
  variate (:func:`centered_topk_mean`, standard error below 0.1%).

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


def rms_mean(n: int, center: bool = True) -> float:
    """E[sqrt(mean(u^2))] for n standard normal values, ``u`` centered at their mean (or not):
    what L2 normalization divides by, on average, for unit Gaussian input (below 1 at small n)."""
    dof = n - 1 if center else n
    if dof < 1:
        return 0.0
    return math.sqrt(2 / n) * math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2))


# Below this n the centered top-k mean comes from Monte Carlo (the scaled half-normal is off by
# 0.1% at n = 32 and 6% at n = 4 for the maximum); the samples are fixed, so constants are too.
_EXACT_BELOW = 33
_MC_SAMPLES = 1 << 17


@functools.lru_cache(maxsize=64)
def _centered_correction(n: int) -> tuple[float, ...]:
    """For k = 1..n: E[sum of the k largest |x - mean(x)|] - sqrt((n-1)/n) E[sum of the k largest
    |x|], over n standard normal values, by Monte Carlo on ``_MC_SAMPLES`` fixed samples. The
    difference varies far less than either sum, so it is the part left to sampling (a control
    variate): its standard error is below 0.1% of the mean for every n >= 2 and k."""
    g = torch.Generator().manual_seed(20180301 + n)
    x = torch.randn(_MC_SAMPLES, n, generator=g, dtype=torch.float64)
    centered = (x - x.mean(1, keepdim=True)).abs().sort(1, descending=True).values.cumsum(1)
    plain = x.abs().sort(1, descending=True).values.cumsum(1)
    return tuple((centered - math.sqrt((n - 1) / n) * plain).mean(0).tolist())


def centered_topk_mean(n: int, k: int = 1) -> float:
    """E[mean of the k largest |x_j - mean(x)|] over n independent standard normal values."""
    n, k = int(n), int(k)
    if not 1 <= k <= n:
        raise ValueError(f"top-k needs 1 <= k <= n, got k={k}, n={n}")
    if n == 1:
        return 0.0
    scaled = math.sqrt((n - 1) / n) * expected_topk_mean(n, k)
    if k == n or n >= _EXACT_BELOW:
        return scaled  # k = n: the mean of every |u_j|, exactly sqrt(2/pi) sqrt((n-1)/n)
    return scaled + _centered_correction(n)[k - 1] / k


def expected_statistic(p: float, n: int, k: int | None = None, center: bool = True) -> float:
    """E[statistic] for n standard normal values: mean |u| (p=1) or the mean of the k largest |u|
    (p=inf; k=None is the maximum), ``u`` centered at the sample mean or not."""
    if p == 1:
        return math.sqrt(2 / math.pi) * (math.sqrt((n - 1) / n) if center else 1.0)
    kk = 1 if k is None else k
    return centered_topk_mean(n, kk) if center else expected_topk_mean(n, kk)


@functools.lru_cache(maxsize=4096)
def _constant(p: float, n: int, k: int | None, center: bool) -> float:
    expected = expected_statistic(p, n, k, center)
    return rms_mean(n, center) / expected if expected > 0 else 1.0


def topk_constant(n: int, k: int = 1, center: bool = True) -> float:
    """``Ck(n)``: the factor that makes ``Ck(n) * mean(topk(|u|, k))`` average what L2 divides by."""
    return _constant(math.inf, int(n), None if k == 1 else int(k), bool(center))


def dispersion_constant(p: float, n: int, k: int | None = None, center: bool = True) -> float:
    """The factor in front of each dispersion statistic: 1 for p=2, ``C1(n)`` for p=1, ``Ck(n)``
    for p=inf (k=None is the maximum), for a statistic centered at the mean of its n values (batch,
    layer and group norm) or not (RMS-norm). A constant for torch.compile: it is computed in
    Python (and cached), never traced."""
    if p == 2:
        return 1.0
    return _constant(float(p), int(n), None if k in (None, 1) else int(k), bool(center))


# A constant for torch.compile: what ``torch.compiler.assume_constant_result`` does (it sets this
# marker), without its import of torch._dynamo, which costs seconds at ``import normbench.nn``
# (tests/kernels/test_constants.py checks that the decorator still sets this very marker).
dispersion_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def paper_linf_constant(n: int) -> float:
    """The constant of the paper's code for max and top-k alike: ``0.5 (1 + sqrt(pi ln 4)) /
    sqrt(2 ln n)``. It under-scales: Gaussian input comes out with a standard deviation of about
    0.69 (k=1) to 0.76 (k=10) at n = 65,536, not 1."""
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))
