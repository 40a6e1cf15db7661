"""The figure of a ``normbench stability`` results file: the paper's claim in one picture.

A column of panels per dtype; the top row the output's error, the bottom row the input
gradient's, both ``max_rel_err`` against the Gaussian input scale sigma (log-log), one line per
norm (colour), native compute solid, framework dashed (torch's own layer dotted). A cell whose values overflowed or came
out non-finite has no error: it is drawn as a cross at the top of the panel. Vertical lines mark
the analytic bounds for the sweep's shape (:func:`normbench.numerics.summary.analytic_bounds`):
the dtype's largest value, where fp16/compute-dtype squares overflow (L2, native), and where a
tenth of the input becomes subnormal; the horizontal line is one unit of the dtype's epsilon.
matplotlib is imported here only, with the Agg backend: no display needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from normbench.errors import UserError
from normbench.plots.common import save_figure

IMAGE_FORMATS = ("png", "svg", "pdf")
COMPUTE_STYLES = {"native": "-", "framework": "--", "torch": ":"}


def _sweep(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r for r in records
        if r.get("status") == "ok" and isinstance(r.get("case"), dict) and r["case"].get("name") == "gauss"
        and "scale" in r["case"]
    ]


def _check_drawable(sweep: list[dict[str, Any]], formats: dict[str, Any]) -> None:
    """A UserError unless every sweep record holds what the figure reads (a results file written
    by hand or by another tool may not): its norm, dtype and compute model, a dtype (and compute
    dtype) stability measures, the case's scale (a number) and shape (a list of sizes)."""
    for r in sweep:
        missing = [f for f in ("norm", "dtype", "compute") if r.get(f) is None]
        case = r["case"]
        if not isinstance(case["scale"], (int, float)) or isinstance(case["scale"], bool):
            missing.append("case scale")
        shape = case.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
            missing.append("case shape")
        if missing:
            raise UserError(f"stability records lack {', '.join(missing)}: not a normbench stability results file")
        for field in ("dtype", "compute_dtype"):
            if r.get(field) is not None and r[field] not in formats:
                raise UserError(f"a stability record's {field} is {r[field]!r}: use {', '.join(formats)}")


def plot_stability(
    records: Iterable[dict[str, Any]],
    output_dir: str | os.PathLike,
    fmt: str = "png",
    compute: str = "both",
    name: str = "stability",
) -> Path:
    """Draw the Gaussian-sweep records into ``output_dir/<name>.<fmt>``; returns the path.
    ``compute``: ``native``, ``framework`` or ``both`` (which lines to draw)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    from normbench.numerics.formats import FORMATS
    from normbench.numerics.summary import analytic_bounds

    sweep = _sweep(records)
    if compute != "both":
        sweep = [r for r in sweep if r.get("compute") == compute]
    if not sweep:
        raise UserError("no Gaussian scale sweep to draw: run `normbench stability` with the gauss case (the default)")
    _check_drawable(sweep, FORMATS)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in sweep))
    norms = list(dict.fromkeys(r["norm"] for r in sweep))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(norms)}
    fig, axes = plt.subplots(2, len(dtypes), figsize=(4.2 * len(dtypes), 7.0), squeeze=False)
    for col, dtype in enumerate(dtypes):
        fmt_d = FORMATS[dtype]
        rows = [r for r in sweep if r["dtype"] == dtype]
        floor = fmt_d.eps / 64
        top = 4.0
        for row, prefix in enumerate(("", "grad_")):
            ax = axes[row][col]
            series: dict[tuple, list[dict[str, Any]]] = {}
            for r in rows:
                comp = "torch" if r.get("impl") == "torch" else r["compute"]
                key = (r["norm"], comp, r.get("reduction"), r.get("compute_dtype"))
                series.setdefault(key, []).append(r)
            for (norm, comp, reduction, _), pts in series.items():
                pts.sort(key=lambda r: r["case"]["scale"])
                xs = [p["case"]["scale"] for p in pts]
                ys, bad_x, lost_x = [], [], []
                for p in pts:
                    err = p.get(f"{prefix}max_rel_err")
                    overflowed = p.get("overflow") if prefix == "" else p.get("grad_overflow")
                    if overflowed or p.get(f"{prefix}nonfinite_fraction", 0) > 0 or err is None:
                        bad_x.append(p["case"]["scale"])
                        ys.append(math.nan)
                    elif p.get("input_underflow_fraction", 0) > 0.1:
                        lost_x.append(p["case"]["scale"])
                        ys.append(math.nan)
                    else:
                        ys.append(max(err, floor))
                label = f"{norm} {'framework (torch)' if comp == 'torch' else comp}" + (
                    f" ({reduction})" if comp == "native" and len({k[2] for k in series}) > 1 else "")
                ax.plot(xs, ys, COMPUTE_STYLES.get(comp, "-"), color=colors[norm], marker="o", markersize=2.5,
                        linewidth=1.3, label=label)
                lane = 1.7 ** norms.index(norm)  # one row of markers per norm, so none hides another
                ax.plot(bad_x, [top / lane] * len(bad_x), "x", color=colors[norm], markersize=6, alpha=0.8)
                ax.plot(lost_x, [floor * lane] * len(lost_x), "v", color=colors[norm], markersize=4, alpha=0.6,
                        fillstyle="none")
            first = rows[0]
            numel = math.prod(first["case"]["shape"])
            n = first.get("n") or 1
            marks = {}
            for r in {(r["norm"], r["compute"], r.get("reduction")): r for r in rows}.values():
                a = analytic_bounds(r["norm"], dtype, r["compute"], r.get("reduction"), n, numel, r.get("eps", 1e-5),
                                    r.get("compute_dtype") or dtype)
                marks.setdefault(a["hi_short"], a["hi"])
            marks.setdefault("input subnormal", fmt_d.smallest_normal / 0.1257)
            lo_x, hi_x = min(r["case"]["scale"] for r in rows), max(r["case"]["scale"] for r in rows)
            for why, x in sorted(marks.items(), key=lambda kv: kv[1]):
                if lo_x / 3 < x < hi_x * 3:
                    ax.axvline(x, color="0.35", linestyle=":", linewidth=1)
                    ax.annotate(why, (x, floor * 4), rotation=90, fontsize=6, color="0.3", va="bottom", ha="right")
            ax.set_xlim(lo_x / 3, hi_x * 3)
            ax.axhline(fmt_d.eps, color="0.6", linewidth=0.8)
            ax.annotate(f"1 ulp ({dtype})", (rows[0]["case"]["scale"], fmt_d.eps), fontsize=6, color="0.4",
                        va="bottom")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(floor / 2, top * 2)
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(f"{dtype}" + (f" (arithmetic in {first.get('compute_dtype')})"
                                           if first.get("compute_dtype") not in (None, dtype) else ""))
            if row == 1:
                ax.set_xlabel("input scale sigma (N(0, sigma^2))")
            if col == 0:
                ax.set_ylabel(("output" if row == 0 else "input gradient") + " max rel. error")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("normbench stability: error against input scale (x at top: overflow or non-finite; "
                 "v at bottom: input underflowed); dotted: analytic bounds", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return save_figure(fig, output_dir, name, [fmt], dpi=130)[0]


def plot_headroom(
    records: Iterable[dict[str, Any]],
    output_dir: str | os.PathLike,
    fmt: str = "png",
    compute: str = "both",
    name: str = "stability_headroom",
) -> Path:
    """Draw the headroom of a model's layers (``stability --model`` records) into
    ``output_dir/<name>.<fmt>``: a panel per dtype and compute model, the layers in network order
    along x, the headroom (log2) up, one line per dispersion. A layer that fails at its captured
    scale is drawn as a cross at its (below 1) headroom, or at the bottom when no scale was safe;
    a headroom open at the end of the search as a triangle."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    from normbench.numerics.summary import compute_label, dispersion, layer_records

    recs = [r for r in layer_records(records) if r.get("status") == "ok" and r.get("headroom") is not None]
    if compute != "both":
        recs = [r for r in recs if r.get("compute") == compute]
    if not recs:
        raise UserError("no layer headroom to draw: run `normbench stability --model ...`")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in recs))
    panels = list(dict.fromkeys((r["dtype"], compute_label(r)) for r in recs))
    disps = list(dict.fromkeys(dispersion(r) for r in recs))
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(disps)}
    exps = [r["headroom_exp"] for r in recs if r.get("headroom_exp") is not None]
    bottom = min(exps + [0]) - 2
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(6.0, 0.45 * len(layers)) * cols, 3.4 * nrows), squeeze=False)
    for i, (dtype, comp) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for d in disps:
            pts = [r for r in recs if r["dtype"] == dtype and compute_label(r) == comp and dispersion(r) == d]
            xs = [layers.index(r["layer"]) for r in pts]
            ys = [bottom if r.get("headroom_exp") is None else r["headroom_exp"] for r in pts]
            ax.plot(xs, ys, "-", color=colors[d], linewidth=1.2, marker="o", markersize=3, label=d)
            bad = [(x, y) for x, y, r in zip(xs, ys, pts) if not r.get("safe")]
            ax.plot([x for x, _ in bad], [y for _, y in bad], "x", color=colors[d], markersize=8)
            opened = [(x, y) for x, y, r in zip(xs, ys, pts) if r.get("headroom_open")]
            ax.plot([x for x, _ in opened], [y for _, y in opened], "^", color=colors[d], markersize=6)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("headroom, log2 (factor)")
        ax.set_title(f"{dtype}, {comp}", fontsize=9)
        ax.grid(True, alpha=0.3)
    for j in range(len(panels), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False)
    fig.suptitle("normbench stability --model: how far each layer's input may grow before the first failure "
                 "(x: fails at the captured scale; ^: safe to the end of the search)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, output_dir, name, [fmt], dpi=130)[0]


def plot_stability_records(records: list[dict[str, Any]], output_dir: str | os.PathLike, fmt: str = "png",
                           compute: str = "both") -> list[Path]:
    """Every figure a stability file holds: the Gaussian sweep's (when it has one, or when it has
    nothing else, to say so) and the layers' headroom (when it has ``--model`` records)."""
    has_layers = any(r.get("layer") is not None for r in records)
    paths = []
    if _sweep(records) or not has_layers:
        paths.append(plot_stability(records, output_dir, fmt=fmt, compute=compute))
    if has_layers:
        paths.append(plot_headroom(records, output_dir, fmt=fmt, compute=compute))
    return paths


def read_stability_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a stability results file (json, jsonl or csv); a UserError for a missing
    file or another command's results. (The CLI keeps them, to exit 1 when one is an error.)"""
    from normbench.results import read_results, schema_name

    if not Path(path).is_file():
        raise UserError(f"{path}: no such results file")
    return read_results(path, schema=schema_name("stability")).records


def plot_stability_file(path: str | os.PathLike, output_dir: str | os.PathLike, fmt: str = "png",
                        compute: str = "both") -> Path:
    """Read a stability results file (json, jsonl or csv) and draw it; returns the figure's path."""
    return plot_stability(read_stability_records(path), output_dir, fmt=fmt, compute=compute)
