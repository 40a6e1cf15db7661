"""From records to verdicts: the measured safe range of each norm and dtype (from the Gaussian
scale sweep), the analytic thresholds printed beside it, and each cell's failures.

Analytic thresholds, for input ``N(mu, sigma^2)`` whose largest deviation over ``m`` values is
about ``z_m * sigma`` (``z_m`` the expected maximum of m half-normal values; 4.1 for m = 16,384):

upper (overflow)
    - the input cast: ``|x| < max`` of the stored dtype;
    - native L2: ``|x - mu| < sqrt(max)`` of the compute dtype (fp16: 256): squares overflow;
    - native with ``sequential`` or ``sum`` reduction: the running sum of n squares (L2) or
      absolute deviations (L1) must stay below ``max``: ``n sigma^2`` resp. ``n sigma sqrt(2/pi)``
      (``pairwise`` means are means of partial means: no such bound);
    - framework: float32 statistics, whose means are sums then divisions: the sum of n squares
      (L2) or absolute deviations (L1) must stay below 3.4e38, and each square below it too.
lower (underflow, lost bits)
    - the input cast: a tenth of N(0, sigma^2) lies below 0.1257 sigma, so below
      ``sigma = smallest normal / 0.1257`` more than 10% of the input is subnormal or zero;
    - native L2: squares of deviations below ``sqrt(smallest normal)`` (fp16: 7.8e-3) are subnormal;
    - native L1 / L-inf: deviations below the smallest normal (fp16: 6.1e-5) are subnormal;
    - the input gradient, about ``dy / D`` with ``|dy|`` up to ``z_m`` (L-inf: ``C sum(dy y) / D``
      at the largest deviation, ``sum(dy y) ~ sqrt(n)``): it overflows the stored dtype where ``D``
      is below that over ``max`` (``D = sqrt(sigma^2 + eps)`` for L2, ``C sigma + eps`` otherwise);
    - native backward (autograd through the rounded formula): ``dL/dD = -sum(dy y) / D`` and for
      L2 ``dL/dvar = sum(dy y) / (2 D^2)`` overflow the compute dtype first.
and ``eps`` itself: below half the smallest subnormal it rounds to 0 (fp16: 1e-8 and 1e-12 do),
so a constant channel divides 0 by 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

from normbench.axes import parse_norm
from normbench.kernels.constants import dispersion_constant
from normbench.numerics.cases import expected_max_deviation
from normbench.numerics.formats import FORMATS, FP8

GROUP_FIELDS = ("norm", "impl", "dtype", "compute", "compute_dtype", "reduction", "eps")


def analytic_bounds(
    norm: str, dtype: str, compute: str, reduction: str | None, n: int, numel: int, eps: float, compute_dtype: str
) -> dict[str, Any]:
    """The analytic safe range of input scales sigma for Gaussian input, with the reason for
    each end: ``{"lo": ..., "lo_reason": ..., "hi": ..., "hi_reason": ..., "eps_rounds_to_zero": ...}``.
    ``n`` is the number of values per statistic, ``numel`` the size of the whole input."""
    spec = parse_norm(norm)
    storage = FORMATS[dtype]
    comp = FORMATS[compute_dtype] if compute == "native" else FORMATS["fp32"]
    z = expected_max_deviation(numel)
    his: list[tuple[float, str, str]] = [
        (storage.overflow_threshold / z, f"|x| < {storage.max_value:.4g} ({dtype} max)", f"{dtype} max")
    ]
    if spec.p == 2:
        dev = math.sqrt(comp.overflow_threshold)
        his.append((dev / z, f"|x-mu| < {dev:.4g} (squares in {comp.name})", f"squares > {comp.name} max"))
    # framework statistics are float32 means, computed as sum then divide (torch's mean)
    if (compute == "framework" or reduction in ("sequential", "sum")) and spec.p in (1.0, 2.0):
        if spec.p == 2:
            his.append((math.sqrt(comp.max_value / n), f"n*sigma^2 < {comp.max_value:.4g} (sum of squares)", "sum overflows"))
        else:
            his.append((comp.max_value / (n * math.sqrt(2 / math.pi)), f"n*mean|x-mu| < {comp.max_value:.4g} (sum)",
                        "sum overflows"))
    hi, hi_reason, hi_short = min(his)

    los: list[tuple[float, str, str]] = [(0.0, "", "")]
    if compute == "native":
        if spec.p == 2:
            los.append((math.sqrt(comp.smallest_normal), f"squares subnormal below sqrt({comp.smallest_normal:.2g})",
                        "squares subnormal"))
        else:
            los.append((comp.smallest_normal, f"deviations subnormal below {comp.smallest_normal:.2g}",
                        "deviations subnormal"))
    # the input is flushed: 10% of N(0, sigma^2) lies below 0.1257 sigma
    los.append((storage.smallest_normal / 0.1257, f"10% of inputs subnormal in {dtype}", "input subnormal"))
    eps_c = eps if compute == "framework" else _round_scalar(eps, comp.name)
    c = dispersion_constant(spec.p, n, spec.k, center=spec.family != "rmsnorm")

    def sigma_for(d: float) -> float:
        """The scale at which the dispersion D equals d."""
        if spec.p == 2:
            return math.sqrt(d * d - eps_c) if d * d > eps_c else 0.0
        return max(0.0, (d - eps_c) / c)

    # the stored input gradient ~ dy / D (L-inf: C sum(dy y) / D at the largest deviation)
    grad = max(z, c * math.sqrt(n)) if spec.p == math.inf else z
    los.append((sigma_for(grad / storage.max_value), f"grad ~ dy/D > {dtype} max", "grad > max"))
    if compute == "native":
        # autograd through the formula: dL/dD = -sum(dy y) / D, and for L2 dL/dvar = that / (2 D)
        d = math.sqrt(math.sqrt(n) / (2 * comp.max_value)) if spec.p == 2 else math.sqrt(n) / comp.max_value
        los.append((sigma_for(d), f"backward: sum(dy*y)/D{'^2' if spec.p == 2 else ''} > {comp.name} max",
                    "backward overflows"))
    lo, lo_reason, lo_short = max(los)
    eps_zero = _round_scalar(eps, comp.name) == 0.0 and eps > 0
    return {"lo": lo, "lo_reason": lo_reason, "lo_short": lo_short, "hi": hi, "hi_reason": hi_reason,
            "hi_short": hi_short, "eps_rounds_to_zero": eps_zero}


def _round_scalar(value: float, fmt: str) -> float:
    import torch

    return float(FORMATS[fmt].round(torch.tensor([value], dtype=torch.float64))[0])


def short_failure(record: dict[str, Any]) -> str:
    """The first failure of a record in a few characters: ``ovf@statistic``, ``nan``, ``grad ovf``,
    ``24 ulps`` ..."""
    if record.get("overflow"):
        return f"ovf@{record.get('overflow_stage')}"
    if record.get("nonfinite_fraction", 0) > 0:
        return "non-finite"
    if record.get("grad_overflow_stage") == "backward" or record.get("grad_nonfinite_fraction", 0) > 0:
        return "grad ovf" if record.get("grad_overflow_stage") == "backward" else "grad non-finite"
    if record.get("input_underflow_fraction", 0) > 0.1:
        return "input underflow"
    worst = max((record.get(f"{p}err_ulps") or 0.0) for p in ("", "grad_"))
    return f"{worst:.3g} ulps"


def short_case(case: dict[str, Any]) -> str:
    """A case in a few characters: ``offset(1e+04)``, ``deviation(260)``, ``tiny``."""
    values = [v for k, v in case.items() if k not in ("name", "shape", "seed", "mean", "spread", "fraction")]
    if not values:
        return str(case["name"])
    return f"{case['name']}({', '.join(f'{v:g}' if isinstance(v, (int, float)) else str(v) for v in values)})"


def failures(record: dict[str, Any]) -> list[str]:
    """Short reasons a measured record is not safe (empty when it is, or it was not measured)."""
    if record.get("status") != "ok":
        return []
    out = []
    if record.get("overflow"):
        out.append(f"overflow@{record.get('overflow_stage')}")
    if record.get("nonfinite_fraction", 0) > 0:
        out.append(f"non-finite {record['nonfinite_fraction']:.0%}")
    if record.get("grad_overflow_stage") == "backward":
        out.append("grad overflow")
    if record.get("grad_nonfinite_fraction", 0) > 0:
        out.append(f"grad non-finite {record['grad_nonfinite_fraction']:.0%}")
    if record.get("input_underflow_fraction", 0) > 0.1:
        out.append(f"input underflow {record['input_underflow_fraction']:.0%}")
    if not out:
        tol = record.get("tolerance", math.inf)
        for prefix, label in (("", "err"), ("grad_", "grad err")):
            err = record.get(f"{prefix}max_rel_err")
            if err is not None and err > tol:
                out.append(f"{label} {record[prefix + 'err_ulps']:.3g} ulps")
    return out


def case_label(case: dict[str, Any]) -> str:
    """``gauss(scale=100)``, ``file(file=x.pt, key=act)``: a record's case, short."""
    params = []
    for k, v in case.items():
        if k in ("name", "shape", "seed"):
            continue
        params.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return f"{case['name']}({', '.join(params)})" if params else str(case["name"])


def _group_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(f) for f in GROUP_FIELDS)


def safe_range(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured safe range from a group's Gaussian sweep records: the longest run of
    consecutive safe scales (the one containing scale 1 when that is safe). ``lo_open`` /
    ``hi_open``: the run reaches the end of the sweep, so the true bound lies beyond it."""
    points = sorted((r["case"]["scale"], bool(r.get("safe"))) for r in sweep if r.get("status") == "ok")
    if not points:
        return {"lo": None, "hi": None, "lo_open": False, "hi_open": False, "scales": 0}
    runs: list[tuple[int, int]] = []
    start = None
    for i, (_, ok) in enumerate(points):
        if ok and start is None:
            start = i
        if not ok and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(points) - 1))
    if not runs:
        return {"lo": None, "hi": None, "lo_open": False, "hi_open": False, "scales": len(points)}
    with_one = [r for r in runs if points[r[0]][0] <= 1.0 <= points[r[1]][0]]
    a, b = with_one[0] if with_one else max(runs, key=lambda r: r[1] - r[0])
    return {
        "lo": points[a][0],
        "hi": points[b][0],
        "lo_open": a == 0,
        "hi_open": b == len(points) - 1,
        "scales": len(points),
    }


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (norm, impl, dtype, compute, compute dtype, reduction, eps): measured safe range,
    analytic range, the worst error over the named cases and the sweep's safe range (where it
    came from), the named cases that failed and why, and counts of cells by status."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_group_key(r)].append(r)
    rows = []
    for key, recs in groups.items():
        fields = dict(zip(GROUP_FIELDS, key))
        sweep = [r for r in recs if r["case"].get("name") == "gauss" and "scale" in r["case"]]
        others = [r for r in recs if r not in sweep]
        measured = safe_range(sweep)
        analytic = None
        # the bounds of a sweep that was measured: a sweep whose cells were all skipped (top-k
        # larger than the values per statistic) has no layer to bound, and no range to set beside
        measured_sweep = [r for r in sweep if r.get("status") == "ok"]
        if measured_sweep:
            first = measured_sweep[0]
            numel = math.prod(first["case"]["shape"])
            n = first.get("n") or parse_norm(fields["norm"]).reduced_numel(first["case"]["shape"])
            analytic = analytic_bounds(
                fields["norm"], fields["dtype"], fields["compute"], fields["reduction"], n, numel,
                fields["eps"], fields["compute_dtype"],
            )
        worst = None
        failed = []
        in_range = [
            r for r in sweep
            if measured["lo"] is not None and measured["lo"] <= r["case"]["scale"] <= measured["hi"]
        ]
        for r in others + in_range:
            if r.get("status") != "ok":
                continue
            for prefix in ("", "grad_"):
                u = r.get(f"{prefix}err_ulps")
                if u is not None and (worst is None or u > worst[0]):
                    worst = (u, short_case(r["case"]) + (" grad" if prefix else ""))
        for r in others:
            why = failures(r)
            if why:
                failed.append({"case": case_label(r["case"]), "short": f"{short_case(r['case'])} {short_failure(r)}",
                               "why": why})
        rows.append({
            **fields,
            "measured": measured,
            "analytic": analytic,
            "worst_err_ulps": None if worst is None else worst[0],
            "worst_case": None if worst is None else worst[1],
            "failed_cases": failed,
            "cells": len(recs),
            "ok": sum(r.get("status") == "ok" for r in recs),
            "skipped": sum(r.get("status") == "skipped" for r in recs),
            "errors": sum(r.get("status") == "error" for r in recs),
        })
    return rows


def fails_threshold(record: dict[str, Any], overflow: bool, max_ulps: float | None) -> bool:
    """Whether a record trips ``--fail-on``: ``overflow`` (any overflow or non-finite output or
    gradient) and/or an error above ``max_ulps`` (output or gradient). A non-finite value has no
    bounded error, so a cell with one (its ``err_ulps`` None when no row is finite) fails
    ``error:N`` too; a cell that ended in an error (``status: "error"``: nothing was measured)
    fails every ``--fail-on``; a skipped cell none."""
    status = record.get("status")
    if status == "error":
        return overflow or max_ulps is not None
    if status != "ok":
        return False
    nonfinite = (record.get("nonfinite_fraction") or 0) > 0 or (record.get("grad_nonfinite_fraction") or 0) > 0
    if overflow and (record.get("overflow") or record.get("grad_overflow") or nonfinite):
        return True
    if max_ulps is not None:
        if nonfinite:
            return True
        for prefix in ("", "grad_"):
            u = record.get(f"{prefix}err_ulps")
            if u is None or u > max_ulps:
                return True
    return False


def fp8_note(dtypes: Iterable[str], fp8_compute: str) -> str | None:
    """A sentence saying how fp8 is computed, when fp8 is among ``dtypes``."""
    if any(d in FP8 for d in dtypes):
        return f"fp8 is storage only: input, output and gradients are fp8, arithmetic runs in {fp8_compute}."
    return None


# ---- a model's layers (stability --model) ---------------------------------------------------

def layer_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of a model's layers, in network order (then as they came)."""
    recs = [r for r in records if r.get("layer") is not None]
    return sorted(recs, key=lambda r: r.get("layer_index", 0))


def dispersion(record: dict[str, Any]) -> str:
    """The dispersion of a record's norm (``l1`` for ``l1-layernorm``): a model's layers are
    compared across families by it."""
    return parse_norm(record["norm"]).dispersion


def compute_label(record: dict[str, Any]) -> str:
    """``native pairwise``, ``framework``, ``framework torch`` (a run has one fp8 compute dtype,
    which the table's footnote names)."""
    text = record["compute"] + (f" {record['reduction']}" if record.get("reduction") else "")
    if record.get("impl") == "torch":
        text += " torch"
    return text


def headroom_text(record: dict[str, Any]) -> str:
    """A record's headroom in a few characters: ``64x``, ``2^40x``, ``≥2^128x``, ``0.25x``, ``none``."""
    h, exp = record.get("headroom"), record.get("headroom_exp")
    if h is None:
        return "-"
    if record.get("headroom_open"):
        return f"≥2^{exp}x"
    if h == 0:
        return "none"
    return f"{h:g}x" if 2**-4 <= h < 2**17 else f"2^{exp}x"


def failure_phrase(record: dict[str, Any]) -> str:
    """What went wrong in a record, as a verb phrase: ``overflows (statistic)``, ``is 24 ulps off``."""
    if record.get("status") != "ok":
        return f"was {record.get('status')} ({record.get('reason')})"
    if record.get("overflow"):
        return f"overflows ({record.get('overflow_stage')})"
    if record.get("grad_overflow"):
        return "overflows in the backward pass"
    if (record.get("nonfinite_fraction") or 0) > 0 or (record.get("grad_nonfinite_fraction") or 0) > 0:
        return "gives non-finite values"
    if (record.get("input_underflow_fraction") or 0) > 0.1:
        return "loses its input to underflow"
    worst = max((record.get(f"{p}err_ulps") or 0.0) for p in ("", "grad_"))
    return f"is {worst:.3g} ulps off"


def layer_verdicts(records: Iterable[dict[str, Any]]) -> list[str]:
    """Per dtype and compute model, the first layer (network order) that fails at the captured
    scale for each norm, with the other norms' headroom at that layer: ``features.7: l2 overflows
    (statistic) in native pairwise fp16 at the current scale; l1 has 64x headroom``; where no layer
    fails, the least headroom of each norm and where."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in layer_records(records):
        if r.get("status") == "ok":
            groups[(r["dtype"], compute_label(r))].append(r)
    lines = []
    for (dtype, compute), recs in groups.items():
        disps = list(dict.fromkeys(dispersion(r) for r in recs))
        by_layer: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in recs:
            by_layer[r["layer"]][dispersion(r)] = r
        safe_everywhere = []
        for d in disps:
            first = next((r for r in recs if dispersion(r) == d and not r.get("safe")), None)
            if first is None:
                safe_everywhere.append(d)
                continue
            others = [f"{o} has {headroom_text(rec)} headroom" if rec.get("safe") else f"{o} fails too"
                      for o, rec in by_layer[first["layer"]].items() if o != d]
            lines.append(f"{first['layer']}: {d} {failure_phrase(first)} in {compute} {dtype} at the current scale"
                         + (f"; {', '.join(others)}" if others else ""))
        if safe_everywhere:
            least = []
            for d in safe_everywhere:
                worst = min((r for r in recs if dispersion(r) == d), key=lambda r: r.get("headroom") or 0.0)
                least.append(f"{d} {headroom_text(worst)} at {worst['layer']}")
            lines.append(f"{compute} {dtype}: every layer safe for {', '.join(safe_everywhere)}; least headroom "
                         + ", ".join(least))
    return lines
