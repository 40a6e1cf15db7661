"""Judging one matched pair of ``normbench stability`` records: did the cell become unsafe?

A stability cell is deterministic (seeded inputs, a fixed reference), so every change in it is
real, not noise; what matters is whether it changes the cell's standing:

- ``unstable``: the cell was safe and is not (``safe`` true -> false), or an overflow (output or
  input gradient) or non-finite values appeared;
- ``worse``: neither, but the error in ulps (output or input gradient) grew by more than
  ``error_factor`` (default 2: one bit of accuracy lost);
- ``stabler``: the cell was unsafe and is safe, or an overflow or non-finite values disappeared;
- ``better``: the error shrank by more than ``error_factor``;
- ``same``: none of these.

The first that applies is the verdict (a cell whose overflow disappeared but whose error grew
fourfold is ``worse``); ``changes`` lists every change found.
"""

from __future__ import annotations

import math
from typing import Any

VERDICTS = ("unstable", "worse", "stabler", "better", "same")
ERROR_FACTOR = 2.0
ERROR_FIELDS = (("err_ulps", "error"), ("grad_err_ulps", "grad error"))


def _flag(record: dict[str, Any], *fields: str) -> bool | None:
    """Whether any of ``fields`` is true (or a positive fraction); None when the record has none."""
    values = [record.get(f) for f in fields if record.get(f) is not None]
    if not values:
        return None
    return any(bool(v) if isinstance(v, bool) else v > 0 for v in values)


def error_ratio(base: float | None, new: float | None) -> float | None:
    """new / base of two errors in ulps: inf when only NEW's is positive, 1 when both are zero,
    None when either is missing or not finite (a non-finite output has no error)."""
    if not isinstance(base, (int, float)) or not isinstance(new, (int, float)):
        return None
    if not (math.isfinite(base) and math.isfinite(new)):
        return None
    if base == 0:
        return 1.0 if new == 0 else math.inf
    return new / base


def judge(base: dict[str, Any], new: dict[str, Any], error_factor: float = ERROR_FACTOR) -> dict[str, Any]:
    """The comparison fields of two ``ok`` stability records of one cell: safety and overflow on
    both sides, error ratios, the changes, the verdict and how much it moved (for sorting)."""
    row: dict[str, Any] = {
        "base_safe": base.get("safe"), "new_safe": new.get("safe"),
        "base_overflow": _flag(base, "overflow", "grad_overflow"),
        "new_overflow": _flag(new, "overflow", "grad_overflow"),
    }
    bad: list[str] = []
    good: list[str] = []
    if row["base_safe"] is True and row["new_safe"] is False:
        bad.append("safe -> unsafe")
    if row["base_safe"] is False and row["new_safe"] is True:
        good.append("unsafe -> safe")
    if row["base_overflow"] is False and row["new_overflow"] is True:
        bad.append("overflow appears")
    if row["base_overflow"] is True and row["new_overflow"] is False:
        good.append("overflow disappears")
    b_nf = _flag(base, "nonfinite_fraction", "grad_nonfinite_fraction")
    n_nf = _flag(new, "nonfinite_fraction", "grad_nonfinite_fraction")
    if b_nf is False and n_nf is True:
        bad.append("non-finite values appear")
    if b_nf is True and n_nf is False:
        good.append("non-finite values disappear")
    worse: list[str] = []
    better: list[str] = []
    moved = 0.0
    for field, label in ERROR_FIELDS:
        b, n = base.get(field), new.get(field)
        ratio = error_ratio(b, n)
        row[f"base_{field}"], row[f"new_{field}"] = b, n
        row[f"{field.replace('_ulps', '')}_ratio"] = None if ratio is None or math.isinf(ratio) else ratio
        if ratio is None:
            continue
        if ratio > error_factor:
            worse.append(f"{label} x{ratio:.3g}" if math.isfinite(ratio) else f"{label} 0 -> {n:.3g} ulps")
        elif ratio < 1 / error_factor:
            better.append(f"{label} x{ratio:.3g}")
        if ratio > 0:
            moved = max(moved, abs(math.log(ratio)) if math.isfinite(ratio) else 100.0)
    if bad:
        row["verdict"] = "unstable"
    elif worse:
        row["verdict"] = "worse"
    elif good:
        row["verdict"] = "stabler"
    elif better:
        row["verdict"] = "better"
    else:
        row["verdict"] = "same"
    row["changes"] = bad + worse + good + better
    row["moved"] = moved + (1000.0 if bad or good else 0.0)  # a flip outranks any error ratio
    row["note"] = None
    return row
