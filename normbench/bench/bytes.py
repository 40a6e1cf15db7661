"""The byte model: the fewest bytes a pass of a norm layer must move to and from memory.

It is the numerator of the speed of light (``bytes / copy bandwidth``), the same for every
implementation and every dispersion p (an L1 or top-k layer touches the same tensors as an L2 one),
so ``gbps`` compares implementations on equal terms. Every tensor that a pass must read is counted
once and every tensor it must produce is counted once; a real kernel that reads ``x`` twice (once
for the statistics, once to normalize) moves more than this, which is exactly what
``sol_fraction`` shows.

With ``E`` the bytes of the input (numel times the element size of the dtype), ``P`` the bytes of
the affine parameters (weight and bias, in the dtype: the layer is moved to the dtype as
``model.to(dtype)`` does), ``R`` the bytes of batch-norm's running mean and variance (0 for the
other families) and ``S`` the bytes of the per-row statistics kept for backward (mean and
dispersion, fp32, one pair per normalized row):

| pass, mode | reads | writes | bytes |
| --- | --- | --- | --- |
| fwd, train | x, params, running stats | y, running stats, saved statistics | 2E + P + 2R + S |
| fwd, eval  | x, params, running stats | y | 2E + P + R |
| bwd, train | x, dy, weight, saved statistics | dx, grad of weight and bias | 3E + P_w + P + S |
| bwd, eval  | x, dy, weight, running stats (batch-norm; other families: saved statistics) | dx, grad of weight and bias | 3E + P_w + P + R (others: + S) |
| fwd+bwd    | the two passes, each counted on its own | | fwd + bwd |

``P_w`` is the weight alone. Backward reads ``x`` (or a saved normalized copy of the same size:
either way E bytes) because the gradient of weight needs the normalized input. In ``fwd+bwd``
``x`` is counted twice: in a network other layers run between the two passes, so it cannot stay
in cache. RMS-norm has no bias, so its ``P`` is the weight only. Forward in eval mode runs under
``torch.no_grad()`` (inference), so it saves nothing. Layer-, RMS- and group-norm compute the same
in both modes (they keep no running statistics).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from normbench.axes import GROUPS, NormSpec

PASSES = ("fwd", "bwd", "fwd+bwd")
MODES = ("train", "eval")
STAT_BYTES = 4  # statistics are kept in fp32 for every dtype but fp64


def param_counts(norm: NormSpec, shape: Sequence[int]) -> tuple[int, int]:
    """(weight values, bias values) of the layer's affine transform for input of ``shape``."""
    if norm.family in ("batchnorm", "groupnorm"):
        return shape[1], shape[1]
    if norm.family == "layernorm":
        return shape[-1], shape[-1]
    return shape[-1], 0  # rmsnorm: weight only


def statistic_rows(norm: NormSpec, shape: Sequence[int]) -> int:
    """How many separate statistics (normalized rows) the layer computes for input of ``shape``."""
    if norm.family == "batchnorm":
        return shape[1]
    if norm.family == "groupnorm":
        return shape[0] * math.gcd(GROUPS, shape[1])
    return math.prod(shape[:-1])


def pass_bytes(norm: NormSpec, shape: Sequence[int], dtype: torch.dtype, pass_: str, mode: str) -> int:
    """The fewest bytes the pass ``pass_`` in ``mode`` must move (see the module doc's table)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {', '.join(PASSES)}, got {pass_!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if pass_ == "fwd+bwd":
        return pass_bytes(norm, shape, dtype, "fwd", mode) + pass_bytes(norm, shape, dtype, "bwd", mode)
    size = torch.empty((), dtype=dtype).element_size()
    e = math.prod(shape) * size
    n_weight, n_bias = param_counts(norm, shape)
    p_all, p_weight = (n_weight + n_bias) * size, n_weight * size
    r = 2 * shape[1] * size if norm.family == "batchnorm" else 0
    stat_size = 8 if dtype == torch.float64 else STAT_BYTES
    s = 2 * statistic_rows(norm, shape) * stat_size
    if pass_ == "fwd":
        return 2 * e + p_all + (2 * r + s if mode == "train" else r)
    uses_running = mode == "eval" and norm.family == "batchnorm"
    return 3 * e + p_weight + p_all + (r if uses_running else s)
