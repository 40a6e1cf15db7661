"""Judging one matched pair of ``normbench profile`` records: did the cell get faster or slower?

The ratio of medians NEW/BASE is the number shown; the verdict comes from the interval
:func:`~normbench.compare.stats.ratio_interval` puts around the ratio from both records' raw
per-repeat times (``times_s``), against ``threshold`` (a fraction, 0.05 for 5 %):

- ``slower``: the whole interval lies above ``1 + threshold``;
- ``faster``: the whole interval lies below ``1 / (1 + threshold)`` (the same factor the other way);
- ``same``: the whole interval lies within those two bounds;
- ``unsure``: the interval straddles a bound: the noise of these samples cannot tell.

A record without raw times (files written before ``times_s`` existed) is compared by its median
alone: the ratio is shown, the verdict is ``unsure`` and the row carries a note.

``vs_torch``: judge each cell's time *relative to torch's layer timed in the same rounds*
(``times_s[i] / torch_times_s[i]``, round by round) instead of its plain time. Profile times a
candidate and torch's layer alternately, one sample of each per round, so a slow phase of a shared
machine, a frequency change or a neighbour's load hits both terms of a round's ratio and cancels;
between two runs of unchanged code on a busy CPU the plain times drift by far more than any useful
threshold (docs/compare.md), the per-round ratios hardly. The price: a change that makes torch's
own layer slower as well (a torch upgrade, a slower machine) is invisible, and torch's own cells
are the reference, not judged.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from normbench.compare.stats import CONFIDENCE, ratio_interval, ratio_of_medians

VERDICTS = ("slower", "faster", "same", "unsure")
NO_TIMES_NOTE = "no raw times (times_s) in a file: compared by medians, noise not judged"
NO_TORCH_NOTE = "no torch times of the same rounds (torch_times_s) in a file: not judged against torch"


def verdict(low: float, high: float, threshold: float) -> str:
    """The verdict of an interval ``[low, high]`` of the ratio NEW/BASE against ``threshold``."""
    up, down = 1 + threshold, 1 / (1 + threshold)
    if low > up:
        return "slower"
    if high < down:
        return "faster"
    if low >= down and high <= up:
        return "same"
    return "unsure"


def _times(record: dict[str, Any]) -> list[float] | None:
    """The record's raw per-repeat times, positive and finite, or None when it has none."""
    times = record.get("times_s")
    if not isinstance(times, list):
        return None
    clean = [float(t) for t in times if isinstance(t, (int, float)) and not isinstance(t, bool)
             and math.isfinite(t) and t > 0]
    return clean or None


def _vs_torch(record: dict[str, Any]) -> list[float] | None:
    """The record's per-round ratios to torch's layer timed in the same rounds
    (``times_s[i] / torch_times_s[i]``), over the rounds where both are positive and finite; None
    when the record has no torch times of the same rounds."""
    times, ref = record.get("times_s"), record.get("torch_times_s")
    if not isinstance(times, list) or not isinstance(ref, list) or len(times) != len(ref):
        return None
    out = []
    for t, r in zip(times, ref):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (t, r)):
            out.append(float(t) / float(r))
    return out or None


def judge(base: dict[str, Any], new: dict[str, Any], threshold: float,
          confidence: float = CONFIDENCE, vs_torch: bool = False) -> dict[str, Any]:
    """The comparison fields of two ``ok`` profile records of one cell: medians, the ratio, its
    interval, the verdict, how much it moved (``moved``: |log ratio|, for sorting) and a note.
    With ``vs_torch`` the samples are the per-round ratios to torch's layer (see the module)."""
    b_med, n_med = base.get("time_median_s"), new.get("time_median_s")
    if vs_torch:
        bt, nt = _vs_torch(base), _vs_torch(new)
    else:
        bt, nt = _times(base), _times(new)
    row: dict[str, Any] = {
        "base_median_s": b_med, "new_median_s": n_med,
        "base_repeats": len(bt) if bt else base.get("repeats"), "new_repeats": len(nt) if nt else new.get("repeats"),
        "ratio": None, "ci_low": None, "ci_high": None, "verdict": "unsure", "moved": 0.0, "note": None,
    }
    if vs_torch:
        row["base_vs_torch"] = statistics.median(bt) if bt else None
        row["new_vs_torch"] = statistics.median(nt) if nt else None
        if base.get("impl") == "torch":
            row.update(verdict="skipped", moved=-1.0, note="torch's own layer: the reference of --vs-torch")
            return row
        if not (bt and nt):
            row["note"] = NO_TORCH_NOTE
            return row
    if bt and nt:
        row["ratio"] = ratio_of_medians(bt, nt)
        low, high = ratio_interval(bt, nt, confidence)
        row["verdict"] = verdict(low, high, threshold)
        if math.isinf(high):  # unbounded: no interval to record
            row["note"] = f"too few repeats ({len(bt)} and {len(nt)}) for a {confidence:.0%} interval"
        else:
            row["ci_low"], row["ci_high"] = low, high
    else:
        if isinstance(b_med, (int, float)) and isinstance(n_med, (int, float)) and b_med > 0:
            row["ratio"] = n_med / b_med
        row["note"] = NO_TIMES_NOTE
    if row["ratio"] is not None and row["ratio"] > 0:
        row["moved"] = abs(math.log(row["ratio"]))
    return row
