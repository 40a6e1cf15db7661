"""The statistics behind ``normbench compare``: an interval for the ratio of two timing samples,
and mean / std over seeds.

Timing: the ratio NEW/BASE of two samples of per-repeat times gets a distribution-free interval
from ranks, the Hodges-Lehmann estimator's interval (Bauer 1972; what R's ``wilcox.test(...,
conf.int=TRUE)`` gives), computed on log times: if NEW's times are BASE's times scaled by a factor
``c`` (in distribution), every pairwise difference ``log(new_j) - log(base_i)`` is a draw around
``log c`` and the Mann-Whitney distribution says which order statistics of those ``n*m``
differences bracket ``log c`` with the asked confidence. Why ranks and not a bootstrap:

- it needs no random numbers (the same files give the same interval on every machine);
- its coverage holds exactly at the small sample sizes a quick profile gives (7 to 10 repeats),
  where a percentile bootstrap of the median is known to be too narrow (its resampled medians take
  only a handful of distinct values), i.e. to call noise a change too often;
- a few slow outliers (a neighbour's burst on a shared CPU) move ranks by at most their count, not
  the estimate by their size;
- with too few repeats to reach the confidence at all (3 and 3 at 95 %) it says so (an unbounded
  interval) instead of returning a narrow one.

The Mann-Whitney quantile is exact (the counts of the U statistic, from the Gaussian binomial
coefficient) when ``n*m <= EXACT_LIMIT`` and the normal approximation with continuity correction
above that, where the two agree to within one order statistic. Ties are not corrected for (times
are floats; only a file compared with itself has them, and there every difference is zero anyway).
"""

from __future__ import annotations

import math
import statistics
from functools import lru_cache
from typing import Sequence

CONFIDENCE = 0.95
EXACT_LIMIT = 2500  # n*m up to which the Mann-Whitney quantile is computed exactly


@lru_cache(maxsize=256)
def _u_counts(n: int, m: int) -> tuple[int, ...]:
    """How many of the C(n+m, n) rankings give each value 0..n*m of the Mann-Whitney U statistic:
    the coefficients of the Gaussian binomial [n+m choose n], built as prod_i (1-q^(m+i))/(1-q^i)."""
    if n > m:
        n, m = m, n
    size = n * m + 1
    poly = [0] * size
    poly[0] = 1
    for i in range(1, n + 1):
        a = m + i
        for j in range(size - 1, a - 1, -1):  # times (1 - q^a)
            poly[j] -= poly[j - a]
        for j in range(i, size):  # over (1 - q^i): a running sum with stride i
            poly[j] += poly[j - i]
    return tuple(poly)


def u_lower_quantile(n: int, m: int, p: float) -> int:
    """The smallest ``u`` with P(U <= u) >= ``p`` for the Mann-Whitney U of samples of sizes ``n``
    and ``m`` (no ties): exact up to :data:`EXACT_LIMIT`, the normal approximation above."""
    if n * m <= EXACT_LIMIT:
        counts = _u_counts(n, m)
        total = math.comb(n + m, n)
        running = 0
        for u, c in enumerate(counts):
            running += c
            if running >= p * total:
                return u
        return n * m
    mean = n * m / 2
    sd = math.sqrt(n * m * (n + m + 1) / 12)
    z = statistics.NormalDist().inv_cdf(p)
    return max(0, math.ceil(mean + z * sd - 0.5))


def ratio_interval(base: Sequence[float], new: Sequence[float],
                   confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A ``confidence`` interval for the factor by which NEW's times scale BASE's (a ratio NEW/BASE:
    above 1 slower), from the Hodges-Lehmann interval of the shift of the log times.

    ``(0, inf)`` when the samples are too small to reach the confidence at all (every ranking of
    3 and 3 values has probability 1/20 > 2.5 %). Both samples must be positive, finite times.
    """
    if not base or not new:
        return 0.0, math.inf
    lb = [math.log(t) for t in base]
    ln = [math.log(t) for t in new]
    n, m = len(lb), len(ln)
    alpha = 1 - confidence
    # k: the smallest u with P(U <= u) >= alpha/2, so P(U <= k-1) < alpha/2 and the k-th smallest
    # and k-th largest of the sorted differences bracket the shift with at least the confidence
    k = u_lower_quantile(n, m, alpha / 2)
    if k < 1:
        return 0.0, math.inf
    diffs = sorted(y - x for x in lb for y in ln)
    if k > len(diffs) - k + 1:
        return 0.0, math.inf
    return math.exp(diffs[k - 1]), math.exp(diffs[len(diffs) - k])


def ratio_of_medians(base: Sequence[float], new: Sequence[float]) -> float | None:
    """median(NEW) / median(BASE); None when either is empty or BASE's median is not positive."""
    if not base or not new:
        return None
    b = statistics.median(base)
    return statistics.median(new) / b if b > 0 else None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of ``values``; the std is None below two values and the
    mean None for none."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)
