"""Figures of a ``normbench profile`` results file.

One figure per shape group (``group`` field of the records): a grid of panels, one row per pass
and mode, one column per dtype; in each panel a line per norm and implementation across the
group's shapes (ordered by size), or, when the group has a single shape, a bar per norm and
implementation (best on top; torch's layer in grey). ``metric="gbps"`` plots achieved GB/s against the copy bandwidth
measured in the same run (a dashed horizontal line); ``metric="time"`` plots the median time (log
scale, IQR as error bars) against the speed of light of each shape (its fewest bytes over the copy
bandwidth, dashed). matplotlib is imported here only, with the Agg backend: no display needed.
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from normbench.plots.common import save_figure

FORMATS = ("png", "svg")
IMPL_COLORS = {"torch": "0.55", "eager": "C0", "analytic": "C1", "paper": "C2", "fused": "C3"}
METRICS = ("gbps", "time")


def _numel(shape: str) -> int:
    n = 1
    for s in str(shape).split("x"):
        n *= int(s)
    return n


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "profile"


def plot_profile(
    records: Iterable[dict[str, Any]],
    output_dir: str | os.PathLike,
    formats: Sequence[str] = ("png",),
    metric: str = "gbps",
) -> list[Path]:
    """Draw the ``ok`` records, one figure per shape group, into ``output_dir``; returns the
    files written (``profile-<group>.<format>``)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {f!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, small
        return _draw(plt, records, Path(output_dir), formats, metric)


def _draw(plt: Any, records: Iterable[dict[str, Any]], out: Path, formats: Sequence[str], metric: str) -> list[Path]:
    ok = [r for r in records if r.get("status") == "ok" and r.get("time_median_s")]
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(str(r.get("group") or "results"), []).append(r)
    written: list[Path] = []
    for name, rows in groups.items():
        dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
        passes = list(dict.fromkeys((r["pass"], r.get("mode", "train"), r.get("memory_format", "contiguous"))
                                    for r in rows))
        shapes = sorted({r["shape"] for r in rows}, key=_numel)
        single = len(shapes) == 1  # one shape: bars per norm and impl; several: lines across shapes
        fig, axes = plt.subplots(len(passes), len(dtypes), squeeze=False, layout="constrained",
                                 figsize=(max(5.0, 4.2 * len(dtypes)) + (0 if single else 2.2),
                                          3.4 * len(passes) + 0.6))
        peaks = [r["peak_gbps"] for r in rows if r.get("peak_gbps")]
        peak = statistics.median(peaks) if peaks else None
        for i, (ps, md, fmt) in enumerate(passes):
            for j, dt in enumerate(dtypes):
                ax = axes[i][j]
                cell = [r for r in rows if r["dtype"] == dt and r["pass"] == ps
                        and r.get("mode", "train") == md and r.get("memory_format", "contiguous") == fmt]
                if single:
                    _bars(ax, cell, metric, peak)
                else:
                    _lines(ax, cell, shapes, metric, peak)
                extra = "" if md == "train" else f", {md}"
                extra += "" if fmt == "contiguous" else f", {fmt}"
                ax.set_title(f"{shapes[0] + ', ' if single else ''}{dt}, {ps}{extra}", fontsize=10)
                ax.grid(True, alpha=0.3)
        devices = sorted({str(r.get("device")) for r in rows})
        fig.suptitle(f"normbench profile: {name} ({', '.join(devices)})")
        if not single:
            handles: dict[str, Any] = {}
            for ax in fig.axes:  # one legend for the figure: every series of every panel, once
                for h, label in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(label, h)
            fig.legend(list(handles.values()), list(handles), fontsize=7, loc="outside right center")
        written += save_figure(fig, out, f"profile-{_slug(name)}", formats)
    return written


def _value(r: dict[str, Any], metric: str) -> float:
    return r["gbps"] if metric == "gbps" else r["time_median_s"] * 1e3


def _bars(ax: Any, cell: list[dict[str, Any]], metric: str, peak: float | None) -> None:
    """One shape: a horizontal bar per norm and implementation, best on top, and the limit line."""
    cell = sorted(cell, key=lambda r: _value(r, metric), reverse=metric == "gbps")
    ys = list(range(len(cell)))
    colors = [IMPL_COLORS.get(r["impl"], "C9") for r in cell]
    xerr = None if metric == "gbps" else [(r.get("time_iqr_s") or 0) * 1e3 / 2 for r in cell]
    ax.barh(ys, [_value(r, metric) for r in cell], xerr=xerr, color=colors, capsize=2)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['norm']} {r['impl']}" for r in cell], fontsize=7)
    ax.invert_yaxis()
    if metric == "gbps":
        if peak:
            ax.axvline(peak, color="black", ls=":", lw=1.2)
            ax.text(peak, len(cell) - 0.5, f" copy bandwidth {peak:.1f} GB/s", fontsize=7, va="bottom", ha="right")
        ax.set_xlabel("GB/s (fewest bytes / median time)")
    else:
        if peak and cell:
            sol = cell[0]["bytes"] / (peak * 1e9) * 1e3
            ax.axvline(sol, color="black", ls=":", lw=1.2)
            ax.text(sol, len(cell) - 0.5, " speed of light", fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("median time (ms), IQR as error bar")


def _lines(ax: Any, cell: list[dict[str, Any]], shapes: list[str], metric: str, peak: float | None) -> None:
    """Several shapes: a line per norm and implementation across the shapes, and the limit line."""
    xpos = {s: i for i, s in enumerate(shapes)}
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in cell:
        series.setdefault((r["norm"], r["impl"]), []).append(r)
    for (norm, impl), pts in series.items():
        pts.sort(key=lambda r: xpos[r["shape"]])
        xs = [xpos[r["shape"]] for r in pts]
        style = "--" if impl == "torch" else "-"
        if metric == "gbps":
            ax.plot(xs, [r["gbps"] for r in pts], style, marker="o", ms=4, label=f"{norm} {impl}")
        else:
            ax.errorbar(xs, [r["time_median_s"] * 1e3 for r in pts],
                        yerr=[(r.get("time_iqr_s") or 0) * 1e3 / 2 for r in pts],
                        fmt=style, marker="o", ms=4, capsize=2, label=f"{norm} {impl}")
    if metric == "gbps":
        if peak:
            ax.axhline(peak, color="black", ls=":", lw=1.2, label=f"copy bandwidth {peak:.1f} GB/s")
        ax.set_ylabel("GB/s (fewest bytes / median time)")
        ax.set_ylim(bottom=0)
    else:
        if peak and cell:
            sol = {xpos[r["shape"]]: r["bytes"] / (peak * 1e9) * 1e3 for r in cell if r.get("bytes")}
            xs = sorted(sol)
            ax.plot(xs, [sol[x] for x in xs], color="black", ls=":", lw=1.2,
                    label="speed of light (bytes / copy bandwidth)")
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)


def plot_profile_file(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    formats: Sequence[str] = ("png",),
    metric: str = "gbps",
) -> list[Path]:
    """Read a profile results file (any format) and draw it; a UserError if it holds no
    measured cells or another command's results."""
    return plot_profile(read_profile_records(path), output_dir, formats, metric)


def read_profile_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a profile results file (any format), checked to be drawable: a UserError if
    it holds no measured cells or another command's results. (The CLI keeps them, to exit 1 when
    one is an error.)"""
    from normbench.errors import UserError
    from normbench.results import read_results, schema_name

    res = read_results(path, schema=schema_name("profile"))
    needed = ("group", "norm", "impl", "dtype", "shape", "pass", "status")
    ok = [r for r in res.records if r.get("status") == "ok"]
    if not ok:
        raise UserError(f"{path}: no measured (status ok) profile records to draw")
    missing = [f for f in needed if f not in ok[0]]
    if missing:
        raise UserError(f"{path}: records lack {', '.join(missing)}: not a normbench profile file")
    return res.records
