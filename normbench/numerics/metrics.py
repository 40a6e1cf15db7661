"""Error measures of a computed tensor against its float64 reference.

Both tensors are laid out as ``(rows, n)``, one row per statistic of the layer (a channel, a
normalized row, a group). The error of a row is normwise: ``||y - ref|| / ||ref||``; a row whose
reference is all zero (a constant channel normalizes to zeros) is measured against the norm a
unit-variance row would have, ``sqrt(n)``. Rows with a non-finite value in either tensor get no
error: they are counted in ``nonfinite_fraction`` and never averaged into an error.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from normbench.numerics.formats import Format


def row_errors(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Normwise relative error of each row whose values are all finite in both tensors."""
    finite = torch.isfinite(y).all(-1) & torch.isfinite(ref).all(-1)
    y, ref = y[finite], ref[finite]
    diff = (y - ref).norm(dim=-1)
    denom = ref.norm(dim=-1)
    denom = torch.where(denom > 0, denom, torch.full_like(denom, math.sqrt(y.shape[-1])))
    return diff / denom


def bits_of_agreement(rel_err: float | None, fmt: Format) -> float | None:
    """``-log2(rel_err)`` capped to ``[0, precision]``: how many leading bits of the result are
    right (an error of one rounding, ``eps / 2``, gives the format's full precision)."""
    if rel_err is None:
        return None
    if rel_err <= 0:
        return float(fmt.precision)
    return float(min(fmt.precision, max(0.0, -math.log2(rel_err))))


def compare(y: torch.Tensor, ref: torch.Tensor, fmt: Format, prefix: str = "") -> dict[str, Any]:
    """The record's error fields for ``y`` against ``ref`` (``prefix`` "grad_" for gradients):
    ``nonfinite_fraction``, ``underflow_fraction`` (elements whose reference is non-zero but that
    came out zero or subnormal in ``fmt``), ``max_rel_err``, ``median_rel_err`` (over rows, None
    when no row is finite), ``err_ulps`` (``max_rel_err / eps``) and ``bits_of_agreement``."""
    y = y.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    numel = max(1, y.numel())
    nonfinite = int((~torch.isfinite(y)).sum())
    underflow = int(((ref != 0) & torch.isfinite(ref) & (y.abs() < fmt.smallest_normal)).sum())
    errs = row_errors(y, ref)
    max_err = float(errs.max()) if errs.numel() else None
    median_err = float(errs.median()) if errs.numel() else None
    return {
        f"{prefix}nonfinite_fraction": nonfinite / numel,
        f"{prefix}underflow_fraction": underflow / numel,
        f"{prefix}max_rel_err": max_err,
        f"{prefix}median_rel_err": median_err,
        f"{prefix}err_ulps": None if max_err is None else max_err / fmt.eps,
        f"{prefix}bits_of_agreement": bits_of_agreement(max_err, fmt),
        f"{prefix}rows_measured": int(errs.numel()),
    }


def input_cast(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, dict[str, Any]]:
    """Round the case's exact values ``x`` (float64) to ``fmt``; returns the rounded tensor and
    ``input_overflow`` (a finite value became inf, or was clamped by a saturating format) and
    ``input_underflow_fraction`` (non-zero values that became zero or subnormal)."""
    x = x.to(torch.float64)
    r = fmt.round(x)
    finite = torch.isfinite(x)
    overflow = bool((finite & ((~torch.isfinite(r)) | (x.abs() >= fmt.overflow_threshold))).any())
    under = int(((x != 0) & (r.abs() < fmt.smallest_normal)).sum())
    return r, {"input_overflow": overflow, "input_underflow_fraction": under / max(1, x.numel())}
