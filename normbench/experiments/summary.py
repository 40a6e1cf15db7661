"""Final numbers per regime and the verdict on the paper's claim, computed from run records.

The verdict compares, per protocol and metric, the final-epoch value of ``wd_off`` and of the
corrected regimes (``wd_off_corrected``, ``wd_off_corrected_grad``) with ``wd_on`` seed by seed (same seed: same initialization and batch order).

- *seed noise* is the seed-to-seed standard deviation of ``wd_on`` (sample std, needs 2 seeds);
- WD off *departs* from WD on when every seed's difference has the same sign and the mean
  difference exceeds twice the seed noise;
- the correction *closes* the gap when its mean difference from WD on is within twice the seed
  noise, *narrows* it when it is smaller than WD off's but not within noise, and otherwise does
  not; a corrected run that diverged counts against it and is reported.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

CORRECTIONS = {
    "wd_off_corrected": "the paper's correction",
    "wd_off_corrected_grad": "the before-momentum variant",
}
METRICS = {
    "train_loss": "final training loss",
    "test_loss": "final test loss",
    "test_acc": "final test accuracy",
}


def _final(record: dict[str, Any], metric: str) -> float | None:
    if record.get("diverged") or not record.get("epochs"):
        return None
    value = record["epochs"][-1].get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def regime_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (protocol, regime): seeds, diverged runs, and mean / std / min / max over seeds
    of each metric's final value (diverged runs excluded from the statistics)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = (r["protocol"], r["regime"])
        row = rows.setdefault(key, {"protocol": key[0], "regime": key[1], "seeds": 0, "diverged": 0, "skipped": 0, "values": {}})
        row["seeds"] += 1
        row["skipped"] += r.get("status") == "skipped"
        row["diverged"] += bool(r.get("diverged"))
        for metric in METRICS:
            v = _final(r, metric)
            if v is not None:
                row["values"].setdefault(metric, []).append(v)
    out = []
    for row in rows.values():
        for metric in METRICS:
            vals = row["values"].get(metric, [])
            row[metric] = {
                "mean": statistics.fmean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else None,
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
            }
        del row["values"]
        out.append(row)
    return out


def _by_seed(records: Sequence[dict[str, Any]], protocol: str, regime: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in records if r["protocol"] == protocol and r["regime"] == regime}


def verdict(records: Sequence[dict[str, Any]], metric: str = "train_loss") -> list[dict[str, Any]]:
    """Per protocol with ``wd_on`` and ``wd_off`` runs: the gap, the noise and the verdict in words."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in records):
        on = _by_seed(records, protocol, "wd_on")
        off = _by_seed(records, protocol, "wd_off")
        if not on or not off:
            continue
        on_vals = {s: _final(r, metric) for s, r in on.items()}
        on_ok = [v for v in on_vals.values() if v is not None]
        noise = statistics.stdev(on_ok) if len(on_ok) > 1 else None
        d_off = [_final(off[s], metric) - on_vals[s] for s in off if s in on_vals and on_vals[s] is not None and _final(off[s], metric) is not None]
        gap_off = statistics.fmean(d_off) if d_off else None
        entry: dict[str, Any] = {
            "protocol": protocol,
            "metric": metric,
            "seeds": len(on_ok),
            "wd_on_mean": statistics.fmean(on_ok) if on_ok else None,
            "seed_noise": noise,
            "gap_wd_off": gap_off,
            "wd_off_same_sign": bool(d_off) and (all(d > 0 for d in d_off) or all(d < 0 for d in d_off)),
        }
        if noise is None or gap_off is None:
            entry["departs"] = None
            text = f"{METRICS[metric]}: needs at least 2 seeds to compare with seed noise"
        else:
            entry["departs"] = entry["wd_off_same_sign"] and abs(gap_off) > 2 * noise
            text = (
                f"{METRICS[metric]}: WD off {'departs from' if entry['departs'] else 'does not depart from'} "
                f"WD on (mean gap {gap_off:+.3g}, seed noise {noise:.2g})"
            )
        for regime, name in CORRECTIONS.items():
            corr = _by_seed(records, protocol, regime)
            if not corr:
                continue
            diverged = sum(bool(r.get("diverged")) for r in corr.values())
            d_corr = [_final(r, metric) - on_vals[s] for s, r in corr.items() if s in on_vals and on_vals[s] is not None and _final(r, metric) is not None]
            gap_corr = statistics.fmean(d_corr) if d_corr else None
            if gap_corr is None or noise is None or gap_off is None:
                closes = "n/a"
            elif abs(gap_corr) <= 2 * noise:
                closes = "closes"
            elif abs(gap_corr) < abs(gap_off):
                closes = "narrows"
            else:
                closes = "does not close"
            entry.setdefault("corrections", {})[regime] = {"gap": gap_corr, "verdict": closes, "diverged": diverged, "seeds": len(corr)}
            if regime == "wd_off_corrected":
                entry["gap_corrected"], entry["correction"], entry["corrected_diverged"] = gap_corr, closes, diverged
            if closes != "n/a" and entry["departs"]:
                text += f"; {name} {closes} it (gap {gap_corr:+.3g})"
            elif closes != "n/a":
                text += f"; {name}: no gap to close (gap {gap_corr:+.3g})"
            if diverged:
                text += f", diverged for {diverged} of {len(corr)} seeds"
        entry["text"] = f"[{protocol}] {text}"
        out.append(entry)
    return out
