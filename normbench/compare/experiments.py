"""Judging the training experiments (``plot equivalence``'s ``equivalence.json``, ``plot
halfprec``'s ``halfprec.json``): final metrics side by side with their seed noise.

Runs are grouped by their key fields without ``seed`` (one group: one regime, or one norm, dtype,
compute model and scale of a half-precision run). In each file a group's final metric is
summarized over its seeds as mean ± sample std, over the runs that finished (``status`` ok, not
diverged, a finite value). A metric *moved* when the difference of the means exceeds
``noise_factor`` (default 2) times the seed noise, the pooled std of one run
``sqrt((std_base^2 + std_new^2) / 2)``: the difference is larger than what changing the seed
alone does. This is a rule of thumb, not a test: with the 2 or 3 seeds experiments run, a t-test
has almost no power (its 95 % critical value is 12.7 at one degree of freedom), while "beyond
twice the seed-to-seed spread" is what a reader of the two tables would call a change (the same
"twice the seed noise" that :mod:`normbench.experiments.summary` judges its regimes by).

Verdicts per (group, metric): ``worse`` or ``better`` (moved, in the metric's bad or good
direction: accuracy up is better, loss down is better), ``same`` (within the noise, or identical),
``unsure`` (a side has fewer than two finite seeds: no noise to judge by). Per group a
``diverged`` row counts diverged runs: more in NEW is ``unstable``, fewer ``stabler``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from normbench.compare.stats import mean_std

VERDICTS = ("worse", "better", "same", "unsure", "unstable", "stabler")
NOISE_FACTOR = 2.0
# +1: higher is better; -1: lower is better
DIRECTIONS = {"test_acc": 1, "train_acc": 1, "train_loss": -1, "test_loss": -1}


def final_values(runs: Sequence[dict[str, Any]], metric: str) -> list[float]:
    """The finite final values of ``metric`` of the runs that finished (ok and not diverged)."""
    out = []
    for r in runs:
        if r.get("status", "ok") != "ok" or r.get("diverged"):
            continue
        final = r.get("final") if isinstance(r.get("final"), dict) else {}
        v = final.get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def judge_metric(base_runs: Sequence[dict[str, Any]], new_runs: Sequence[dict[str, Any]], metric: str,
                 noise_factor: float = NOISE_FACTOR) -> dict[str, Any]:
    """The comparison row of one metric of one group: mean, std and seed count per side, the
    difference of the means, its noise band (``delta_low``..``delta_high``: the difference ±
    ``noise_factor`` x the pooled seed std), the verdict and how much it moved (|diff| / noise)."""
    bv, nv = final_values(base_runs, metric), final_values(new_runs, metric)
    b_mean, b_std = mean_std(bv)
    n_mean, n_std = mean_std(nv)
    row: dict[str, Any] = {
        "metric": metric, "base_mean": b_mean, "base_std": b_std, "base_seeds": len(bv),
        "new_mean": n_mean, "new_std": n_std, "new_seeds": len(nv),
        "delta": None, "delta_low": None, "delta_high": None, "verdict": "unsure", "moved": 0.0, "note": None,
    }
    if b_mean is None or n_mean is None:
        row["note"] = f"no finished run in {'BASE' if b_mean is None else 'NEW'}"
        return row
    delta = n_mean - b_mean
    row["delta"] = delta
    if b_std is None or n_std is None:
        if delta == 0:
            row["verdict"] = "same"
        else:
            row["note"] = "fewer than 2 seeds: no seed noise to judge by"
            row["moved"] = 0.0
        return row
    noise = math.sqrt((b_std ** 2 + n_std ** 2) / 2)
    band = noise_factor * noise
    row["delta_low"], row["delta_high"] = delta - band, delta + band
    row["moved"] = abs(delta) / noise if noise > 0 else (999.0 if delta else 0.0)  # finite: rows are JSON
    if abs(delta) <= band:
        row["verdict"] = "same"
    else:
        row["verdict"] = "better" if delta * DIRECTIONS.get(metric, 1) > 0 else "worse"
    return row


def judge_diverged(base_runs: Sequence[dict[str, Any]], new_runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``diverged`` row of a group: how many of its runs diverged in each file."""
    b = sum(1 for r in base_runs if r.get("diverged"))
    n = sum(1 for r in new_runs if r.get("diverged"))
    verdict = "unstable" if n > b else "stabler" if n < b else "same"
    return {
        "metric": "diverged", "base_mean": b, "base_std": None, "base_seeds": len(base_runs),
        "new_mean": n, "new_std": None, "new_seeds": len(new_runs),
        "delta": n - b, "delta_low": None, "delta_high": None, "verdict": verdict,
        "moved": 1000.0 + abs(n - b) if n != b else 0.0, "note": None,
    }
