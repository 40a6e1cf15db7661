"""Final numbers per regime and the verdict on the paper's claim, computed from run records.

The verdict compares, per protocol and metric, the final-epoch value of ``wd_off`` and of the
corrected regimes (``wd_off_corrected``, ``wd_off_corrected_grad``) with ``wd_on`` seed by seed
(same seed: same initialization and batch order); differences are plain (not log) differences.

- *seed noise* is the seed-to-seed standard deviation of ``wd_on`` (sample std, needs 2 seeds);
- a regime that diverged on any seed is *unstable* (``"unstable: diverged on 1 of 3 seeds"``,
  counted over its trained runs), whatever its other seeds do: it never departs, closes or
  overshoots;
- WD off *departs* from WD on when every seed's difference has the same sign and the mean
  difference exceeds twice the seed noise (``"departs"``, ``"does not depart"``);
- the correction *closes* the gap when its mean difference from WD on is within twice the seed
  noise; it *overshoots* when every seed ends past WD on, on the side opposite to WD off, and the
  mean difference exceeds twice the noise; it *narrows* the gap when its mean difference is smaller
  than WD off's, and otherwise *does not close* it. ``"n/a"`` when there is nothing to judge
  (one seed of ``wd_on``, no finite run, or WD off unstable).
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


def unstable(diverged: int, runs: int) -> str:
    """The verdict of a regime that diverged on ``diverged`` of its ``runs`` trained seeds."""
    return f"unstable: diverged on {diverged} of {runs} seed{'s' if runs != 1 else ''}"


def _diffs(runs: dict[int, dict[str, Any]], on_vals: dict[int, float | None], metric: str) -> list[float]:
    """Per seed, the final value minus WD on's, over the seeds where both are finite."""
    out = []
    for s, r in runs.items():
        v = _final(r, metric)
        if v is not None and on_vals.get(s) is not None:
            out.append(v - on_vals[s])
    return out


def _counts(runs: dict[int, dict[str, Any]]) -> tuple[int, int]:
    """(diverged, trained): skipped runs (no WD-on norms to follow) were never trained."""
    trained = [r for r in runs.values() if r.get("status") != "skipped"]
    return sum(bool(r.get("diverged")) for r in trained), len(trained)


def verdict(records: Sequence[dict[str, Any]], metric: str = "train_loss") -> list[dict[str, Any]]:
    """Per protocol with ``wd_on`` and ``wd_off`` runs: the gap, the noise and the verdict in words.

    Each entry has ``departs`` (True, False, or None when it cannot be judged), ``wd_off`` and,
    per correction run, ``corrections[regime]``: ``{"gap", "verdict", "diverged", "seeds",
    "past_wd_on"}`` with ``verdict`` one of ``"closes"``, ``"overshoots"``, ``"narrows"``,
    ``"does not close"``, ``"n/a"`` or ``"unstable: diverged on D of N seeds"``; ``short`` (one
    line per protocol, for figures) and ``text`` (the sentence the CLI prints).
    """
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
        d_off = _diffs(off, on_vals, metric)
        gap_off = statistics.fmean(d_off) if d_off else None
        on_diverged, on_runs = _counts(on)
        off_diverged, off_runs = _counts(off)
        entry: dict[str, Any] = {
            "protocol": protocol,
            "metric": metric,
            "seeds": len(on_ok),
            "wd_on_mean": statistics.fmean(on_ok) if on_ok else None,
            "wd_on_diverged": on_diverged,
            "seed_noise": noise,
            "gap_wd_off": gap_off,
            "wd_off_same_sign": bool(d_off) and (all(d > 0 for d in d_off) or all(d < 0 for d in d_off)),
        }
        gap_text = "" if gap_off is None else f"mean gap {gap_off:+.3g}" + ("" if noise is None else f", seed noise {noise:.2g}")
        if off_diverged:
            entry["departs"] = None
            off_verdict = unstable(off_diverged, off_runs)
            text = f"{METRICS[metric]}: WD off is {off_verdict}" + (f" (on the others: {gap_text})" if gap_text else "")
        elif noise is None or gap_off is None:
            entry["departs"] = None
            off_verdict = "n/a"
            text = f"{METRICS[metric]}: needs at least 2 seeds to compare with seed noise"
        else:
            entry["departs"] = entry["wd_off_same_sign"] and abs(gap_off) > 2 * noise
            off_verdict = "departs" if entry["departs"] else "does not depart"
            text = f"{METRICS[metric]}: WD off {off_verdict} from WD on ({gap_text})"
        entry["wd_off"] = {"gap": gap_off, "verdict": off_verdict, "diverged": off_diverged, "seeds": off_runs}
        if on_diverged:
            text += f"; WD on itself diverged on {on_diverged} of {on_runs} seeds (compared on the others)"
        short = [f"WD off {off_verdict}"]
        for regime, name in CORRECTIONS.items():
            corr = _by_seed(records, protocol, regime)
            if not corr:
                continue
            diverged, runs = _counts(corr)
            d_corr = _diffs(corr, on_vals, metric)
            gap_corr = statistics.fmean(d_corr) if d_corr else None
            # every seed ends on the far side of WD on from WD off
            past = bool(d_corr) and gap_off is not None and gap_off != 0 and all(d * gap_off < 0 for d in d_corr)
            if diverged:
                closes = unstable(diverged, runs)
            elif gap_corr is None or noise is None or gap_off is None or off_diverged:
                closes = "n/a"
            elif abs(gap_corr) <= 2 * noise:
                closes = "closes"
            elif entry["departs"] and past:
                closes = "overshoots"
            elif abs(gap_corr) < abs(gap_off):
                closes = "narrows"
            else:
                closes = "does not close"
            entry.setdefault("corrections", {})[regime] = {
                "gap": gap_corr, "verdict": closes, "diverged": diverged, "seeds": runs, "past_wd_on": past,
            }
            if regime == "wd_off_corrected":
                entry["gap_corrected"], entry["correction"], entry["corrected_diverged"] = gap_corr, closes, diverged
            gap = "" if gap_corr is None else f"gap {gap_corr:+.3g}"
            if diverged:
                text += f"; {name} is {closes}" + (f" ({gap} on the others)" if gap else "")
            elif closes == "n/a":
                if gap and off_diverged:
                    text += f"; {name}: not judged against an unstable WD off ({gap})"
                continue
            elif entry["departs"]:
                note = ": past WD on, opposite to WD off, in every seed" if closes == "overshoots" else (
                    "; past WD on in every seed, within noise" if closes == "closes" and past else "")
                text += f"; {name} {closes} it ({gap}{note})"
            else:
                text += f"; {name}: no gap to close ({gap})"
            short.append(f"{name}: {closes}" if entry["departs"] or diverged else f"{name}: no gap to close")
        entry["short"] = f"[{protocol}] {METRICS[metric]}: " + "; ".join(short)
        entry["text"] = f"[{protocol}] {text}"
        out.append(entry)
    return out


def running_mean(values: Sequence[float], points: int) -> list[float]:
    """The trailing mean of ``values`` over ``points`` values (fewer at the start): how a per-step
    angular update is smoothed before it is compared with the equilibrium (and drawn)."""
    return [statistics.fmean(values[max(0, j - points + 1) : j + 1]) for j in range(len(values))]


def equilibrium_fraction(record: dict[str, Any], tolerance: float = 0.2, window: int = 20) -> list[dict[str, Any]]:
    """How much of each learning-rate phase a run's conv weights spend at the rotational
    equilibrium ``sqrt(2 lr WD / (1 + momentum))`` (Wan et al. 2021; Kosson et al. 2023).

    Reads the record's per-step series (``steps``, see :class:`~normbench.experiments.recorder.Recorder`):
    per layer, the angular update smoothed by a trailing mean over about ``window`` steps within
    the phase, and the fraction of the phase's points within ``tolerance`` (relative) of the
    equilibrium of the phase's learning rate and the run's conv weight decay. Returns one entry
    per phase, in order: ``lr``, ``steps`` (in the phase), ``equilibrium``, ``fraction`` (mean over
    layers), ``layers`` (per layer), ``ratio`` (median over the phase of smoothed / equilibrium,
    mean over layers) and ``time_scale`` (:func:`~normbench.experiments.regimes.equilibrium_time_scale`,
    to set against ``steps``). Empty when the record has no per-step series or no conv weight decay.
    """
    series = record.get("steps")
    config = record.get("config") or {}
    wd = (config.get("spec") or {}).get("wd_conv", config.get("wd", 0.0))
    if not series or not series.get("step") or not wd:
        return []
    from normbench.experiments.regimes import equilibrium_angular_update, equilibrium_time_scale

    every = series.get("every", 1)
    points = max(1, round(window / every))
    lrs = series["lr"]
    phases: list[tuple[float, int, int]] = []  # (lr, first index, end index)
    start = 0
    for i in range(1, len(lrs) + 1):
        if i == len(lrs) or lrs[i] != lrs[start]:
            phases.append((lrs[start], start, i))
            start = i
    out = []
    for lr, lo, hi in phases:
        theory = equilibrium_angular_update(lr, wd, config["momentum"])
        per_layer, ratios = {}, []
        for name, layer in series["layers"].items():
            values = layer["angular_update"][lo:hi]
            smoothed = running_mean(values, points)
            per_layer[name] = sum(abs(v / theory - 1) <= tolerance for v in smoothed) / len(smoothed)
            ratios.append(statistics.median(v / theory for v in smoothed))
        first = series["step"][lo - 1] if lo else 0
        out.append({
            "lr": lr,
            "steps": series["step"][hi - 1] - first,
            "equilibrium": theory,
            "time_scale": equilibrium_time_scale(lr, wd, config["momentum"]),
            "fraction": statistics.fmean(per_layer.values()),
            "layers": per_layer,
            "ratio": statistics.fmean(ratios),
        })
    return out


def equilibrium_summary(records: Sequence[dict[str, Any]], tolerance: float = 0.2) -> list[dict[str, Any]]:
    """Per protocol, the ``wd_on`` runs' :func:`equilibrium_fraction` averaged over seeds, per lr
    phase: ``{"protocol", "seeds", "lr", "fraction", "ratio", "time_scale", "steps", "text"}`` (lists over
    the phases; ``steps`` and ``time_scale`` of the first seed's run, the same in every seed)."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in records):
        runs = [r for r in records if r["protocol"] == protocol and r["regime"] == "wd_on"
                and r.get("status") == "ok" and not r.get("diverged")]
        phases = [p for p in (equilibrium_fraction(r, tolerance) for r in runs) if p]
        if not phases:
            continue
        n = min(len(p) for p in phases)
        lrs = [phases[0][k]["lr"] for k in range(n)]
        fraction = [statistics.fmean(p[k]["fraction"] for p in phases) for k in range(n)]
        ratio = [statistics.fmean(p[k]["ratio"] for p in phases) for k in range(n)]
        scales = [phases[0][k]["time_scale"] for k in range(n)]
        steps = [phases[0][k]["steps"] for k in range(n)]
        text = (f"[{protocol}] equilibrium: WD on's angular update within {tolerance:.0%} of sqrt(2 lr WD / "
                f"(1 + momentum)) for " + ", ".join(f"{f:.0%}" for f in fraction) + " of the steps of the lr phases "
                + ", ".join(f"{lr:g}" for lr in lrs) + " (median ratio to it " + ", ".join(f"{q:.2f}" for q in ratio)
                + f"; mean over {len(phases)} seeds and the conv layers); weight decay moves the norms there in about "
                + ", ".join(f"{t:,.0f}" for t in scales) + " steps (~(1 - momentum) / (2 lr WD)), against "
                + ", ".join(f"{n:,}" for n in steps) + " steps per phase")
        out.append({"protocol": protocol, "seeds": len(phases), "lr": lrs, "fraction": fraction, "ratio": ratio,
                    "time_scale": scales, "steps": steps, "text": text})
    return out
