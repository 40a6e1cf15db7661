"""The figure of a comparison (``normbench compare --output``, or BASE and NEW results files
compared by ``normbench plot compare``): what moved, with how sure we are.

One panel per NEW file (and, for experiments, per metric), one row per cell, most moved on top:

- profile: the ratio NEW/BASE of the median times (log scale) with its 95 % interval as a bar,
  a line at 1 and dashed lines at the threshold's bounds ``1 + t`` and ``1 / (1 + t)``; a cell
  without an interval (no raw times, too few repeats) is a hollow marker;
- stability: the error ratios NEW/BASE of the output (circle) and input gradient (triangle), log
  scale, dashed lines at the ``worse``/``better`` factor; a cell that turned unsafe or safe is
  marked on the line at 1 when it has no finite ratio;
- experiments: the difference of the means NEW - BASE with its noise band (twice the pooled seed
  std), a line at 0.

Points are coloured by verdict (red: slower, unstable, worse; green: faster, stabler, better;
grey: same; orange: unsure). matplotlib is imported here only, with the Agg backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from normbench.plots.common import save_figure

FORMATS = ("png", "svg")
VERDICT_COLORS = {"slower": "C3", "unstable": "C3", "worse": "C3", "failed": "C3", "faster": "C2",
                  "stabler": "C2", "better": "C2", "same": "0.5", "unsure": "C1", "skipped": "0.8"}


def _panels(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str | None], list[dict[str, Any]]]:
    """The drawable rows per panel: (NEW file, metric or None), in the rows' order (most moved first)."""
    out: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("verdict") in ("added", "removed", "skipped", "failed") or r.get("metric") == "diverged":
            continue
        out.setdefault((str(r.get("new")), r.get("metric")), []).append(r)
    return out


def plot_compare(rows: Sequence[dict[str, Any]], output_dir: str | os.PathLike, formats: Sequence[str] = ("png",),
                 limit: int = 40) -> list[Path]:
    """Draw comparison rows (:meth:`normbench.compare.Comparison.records`, or rows read back from
    a ``normbench.compare/1`` file) into ``output_dir`` as ``compare-<kind>.<format>``; at most
    ``limit`` rows per panel (0: all). A UserError when no row can be drawn."""
    from normbench.errors import UserError

    for f in formats:
        if f not in FORMATS:
            raise UserError(f"format must be one of {', '.join(FORMATS)}, got {f!r}")
    panels = _panels(rows)
    if not panels:
        raise UserError("nothing to draw: no matched cell was measured in both files")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = str(rows[0].get("kind") or "profile")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        shown = {key: (cells if limit == 0 else cells[:limit]) for key, cells in panels.items()}
        height = max(len(cells) for cells in shown.values())
        fig, axes = plt.subplots(1, len(shown), squeeze=False, layout="constrained",
                                 figsize=(5.5 * len(shown), 1.4 + 0.22 * height))
        for ax, ((new, metric), cells) in zip(axes[0], shown.items()):
            if kind == "profile":
                _ratios(ax, cells)
            elif kind == "stability":
                _errors(ax, cells)
            else:
                _deltas(ax, cells, str(metric))
            ax.set_yticks(range(len(cells)))
            ax.set_yticklabels([str(r.get("cell")) for r in cells], fontsize=7)
            ax.set_ylim(len(cells) - 0.5, -0.5)  # most moved on top
            ax.grid(True, axis="x", alpha=0.3)
            more = len(panels[(new, metric)]) - len(cells)
            ax.set_title(f"{Path(new).name}" + (f": {metric}" if metric else "")
                         + (f" ({more} more not shown)" if more > 0 else ""), fontsize=9)
        base = Path(str(rows[0].get("base"))).name
        fig.suptitle(f"normbench compare ({kind}): NEW against {base}")
        present = list(dict.fromkeys(r.get("verdict") for cells in shown.values() for r in cells))
        handles = [plt.Line2D([], [], color=VERDICT_COLORS.get(v, "k"), marker="o", lw=2, label=v) for v in present]
        fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=max(1, len(handles)))
        return save_figure(fig, output_dir, f"compare-{kind}", formats)


def _ratios(ax: Any, cells: list[dict[str, Any]]) -> None:
    """Profile: ratio of medians with its interval, the threshold's bounds."""
    for y, r in enumerate(cells):
        ratio = r.get("ratio")
        if not isinstance(ratio, (int, float)) or ratio <= 0:
            continue
        color = VERDICT_COLORS.get(r.get("verdict"), "k")
        low, high = r.get("ci_low"), r.get("ci_high")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > 0:
            ax.plot([low, high], [y, y], color=color, lw=2, solid_capstyle="butt")
            ax.plot([ratio], [y], "o", color=color, ms=4)
        else:
            ax.plot([ratio], [y], "o", mfc="none", color=color, ms=5)
    threshold = next((r["threshold"] for r in cells if isinstance(r.get("threshold"), (int, float))), None)
    ax.axvline(1.0, color="black", lw=1)
    if threshold:
        for bound in (1 + threshold, 1 / (1 + threshold)):
            ax.axvline(bound, color="black", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("NEW / BASE median time, 95% interval")


def _errors(ax: Any, cells: list[dict[str, Any]]) -> None:
    """Stability: error ratios of output and gradient, flips marked at 1."""
    from normbench.compare.stability import ERROR_FACTOR

    for y, r in enumerate(cells):
        color = VERDICT_COLORS.get(r.get("verdict"), "k")
        drawn = False
        for field, marker in (("err_ratio", "o"), ("grad_err_ratio", "^")):
            v = r.get(field)
            if isinstance(v, (int, float)) and v > 0 and math.isfinite(v):
                ax.plot([v], [y], marker, color=color, ms=5)
                drawn = True
        if not drawn:
            ax.plot([1.0], [y], "x", color=color, ms=6)
    ax.axvline(1.0, color="black", lw=1)
    for bound in (ERROR_FACTOR, 1 / ERROR_FACTOR):
        ax.axvline(bound, color="black", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("NEW / BASE error in ulps (o output, ^ gradient, x none)")


def _deltas(ax: Any, cells: list[dict[str, Any]], metric: str) -> None:
    """Experiments: difference of the means with its seed-noise band."""
    for y, r in enumerate(cells):
        d = r.get("delta")
        if not isinstance(d, (int, float)):
            continue
        color = VERDICT_COLORS.get(r.get("verdict"), "k")
        low, high = r.get("delta_low"), r.get("delta_high")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            ax.plot([low, high], [y, y], color=color, lw=2, solid_capstyle="butt")
            ax.plot([d], [y], "o", color=color, ms=4)
        else:
            ax.plot([d], [y], "o", mfc="none", color=color, ms=5)
    ax.axvline(0.0, color="black", lw=1)
    ax.set_xlabel(f"NEW - BASE mean final {metric} (± 2 x seed std)")
