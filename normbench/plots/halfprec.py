"""Figures of the half-precision experiment (``normbench.halfprec/1`` records).

Per low-precision dtype: final test accuracy against the scale of the activations entering
batch-norm (one panel per native reduction order, framework and fp32 references beside it, the
scale at which an fp16 square first overflows marked), the training curves at the scale where L2
first fails, and the step of the first non-finite value per norm and scale. With WD-off runs, the
natural case: the largest pre-normalization deviation per epoch, WD on vs WD off. Nothing here
trains; matplotlib is imported here only, with the Agg backend.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from normbench.axes import norm_label  # noqa: E402
from normbench.numerics.formats import FORMATS as NUMBER_FORMATS  # noqa: E402
from normbench.plots.common import save_figure  # noqa: E402

FORMATS = ("png", "svg", "pdf")
COLOR = {"l2": "tab:blue", "l1": "tab:red", "linf": "tab:green"}
CHANCE = 0.1  # a diverged run is drawn at chance level (10 classes)


def _square_limit(records: Sequence[dict], dtype: str) -> float:
    """sqrt of the largest finite value of the arithmetic the ``dtype`` runs compute in (fp8 is
    storage; its squares are taken in its ``compute_dtype``): where a square overflows."""
    compute = next((r.get("compute_dtype") for r in records if r.get("dtype") == dtype and r.get("compute_dtype")), dtype)
    return math.sqrt(NUMBER_FORMATS[compute].max_value)


def _color(norm: str) -> str:
    return COLOR.get(norm, "tab:purple")


def _select(records: Sequence[dict], **fields: Any) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in fields.items())]


def _by_scale(runs: Sequence[dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in runs:
        out.setdefault(r["scale"], []).append(r)
    return dict(sorted(out.items()))


def _accuracy_line(ax, runs: Sequence[dict], color: str, style: str, label: str, marker: str = "o",
                   shift: float = 1.0) -> None:
    """Mean final accuracy over seeds per scale (drawn at scale x ``shift``), min-max bars; scales
    where a seed diverged are drawn at chance with an x."""
    xs, ys, lo, hi, div_x = [], [], [], [], []
    for scale, rs in _by_scale(runs).items():
        accs = [CHANCE if r["diverged"] or r["final"]["test_acc"] is None else r["final"]["test_acc"] for r in rs]
        if any(r["diverged"] for r in rs):
            div_x.append(scale * shift)
        mean = statistics.fmean(accs)
        xs.append(scale * shift)
        ys.append(mean)
        lo.append(max(mean - min(accs), 0.0))  # a mean of equal values can round past them
        hi.append(max(max(accs) - mean, 0.0))
    if not xs:
        return
    ax.errorbar(xs, ys, yerr=[lo, hi], color=color, linestyle=style, marker=marker, markersize=4,
                capsize=2, linewidth=1.4, label=label)
    if div_x:
        ax.plot(div_x, [CHANCE] * len(div_x), "x", color=color, markersize=9, markeredgewidth=2)


def _square_overflow_scale(records: Sequence[dict], dtype: str) -> float | None:
    """The scale at which the largest deviation of the scale-1 fp32 runs (first epoch, any layer)
    reaches sqrt(max value of the arithmetic): where an L2 square first overflows."""
    devs = [max(layer["max_deviation"] for layer in r["epochs"][0]["norm_layers"].values())
            for r in _select(records, compute="fp32", regime="wd_on", scale=1.0)
            if r["epochs"] and r["epochs"][0].get("norm_layers")]
    if not devs:
        return None
    return _square_limit(records, dtype) / max(devs)


def fig_accuracy(records: Sequence[dict], dtype: str, verdicts: Sequence[dict] = ()) -> Figure:
    """Final test accuracy against scale, one panel per reduction order of the native runs (the
    norms' points spread a little along x so that equal curves stay visible), legend at the right,
    the verdicts under the panels."""
    reductions = list(dict.fromkeys(r["reduction"] for r in _select(records, compute="native", dtype=dtype,
                                                                   regime="wd_on"))) or [None]
    norms = list(dict.fromkeys(r["norm"] for r in records))
    width = 4.6 * len(reductions) + 2.4
    text = [v["text"] for v in verdicts if v["dtype"] == dtype]
    lines = [line for t in text for line in textwrap.wrap(t, int(width * 72 / 4.3))]
    text_height = 0.13 * len(lines) + (0.1 if lines else 0)  # inches under the panels
    height = 4.2 + text_height
    fig, axes = plt.subplots(1, len(reductions), figsize=(width, height), sharey=True, squeeze=False)
    threshold = _square_overflow_scale(records, dtype)
    for ax, reduction in zip(axes[0], reductions):
        for i, norm in enumerate(norms):
            c, shift = _color(norm), 1.08 ** (i - (len(norms) - 1) / 2)
            _accuracy_line(ax, _select(records, compute="native", dtype=dtype, reduction=reduction, norm=norm,
                                       regime="wd_on"), c, "-", f"{norm_label(norm)} native {dtype}", shift=shift)
            _accuracy_line(ax, _select(records, compute="framework", dtype=dtype, norm=norm, regime="wd_on"),
                           c, ":", f"{norm_label(norm)} framework (fp32 stats)", marker="s", shift=shift)
            _accuracy_line(ax, _select(records, compute="fp32", norm=norm, regime="wd_on"),
                           c, "--", f"{norm_label(norm)} fp32", marker=".", shift=shift)
        if threshold is not None:
            ax.axvline(threshold, color="grey", linestyle="-.", linewidth=1)
            ax.text(threshold, 0.5, " L2 square\n overflows", color="grey", fontsize=8, va="center")
        ax.set_xscale("log")
        ax.set_xlabel("scale of the activations entering batch-norm")
        ax.set_title(f"native reduction order: {reduction}" if reduction else "references", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final test accuracy (x: diverged)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    right = 1 - 2.3 / width
    fig.suptitle(f"Batch-norm computed in native {dtype}: which norms still train "
                 "(a diverged run is drawn at chance, 0.1)", fontsize=11)
    if lines:
        fig.text(0.01, 0.05 / height, "\n".join(lines), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, text_height / height, right, 1 - 0.3 / height))
    return fig


def failing_scale(records: Sequence[dict], dtype: str, reduction: str | None, verdicts: Sequence[dict]) -> float:
    """The scale where native L2 first fails in this dtype and order (from the verdicts); the
    largest scale tried when it never does."""
    for v in verdicts:
        if v["dtype"] == dtype and v["reduction"] == reduction and v["first_failing_scale"].get("l2") is not None:
            return v["first_failing_scale"]["l2"]
    return max(r["scale"] for r in records)


def fig_curves(records: Sequence[dict], dtype: str, reduction: str | None, scale: float) -> Figure:
    """Training loss and test accuracy per epoch at one scale: each norm native (solid) and fp32
    (dashed), mean over seeds."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for norm in dict.fromkeys(r["norm"] for r in records):
        for runs, style, name in (
            (_select(records, compute="native", dtype=dtype, reduction=reduction, norm=norm, scale=scale,
                     regime="wd_on"), "-", f"native {dtype}"),
            (_select(records, compute="fp32", norm=norm, scale=scale, regime="wd_on"), "--", "fp32"),
        ):
            if not runs:
                continue
            diverged = sum(r["diverged"] for r in runs)
            label = f"{norm_label(norm)} {name}" + (f" ({diverged} of {len(runs)} diverged)" if diverged else "")
            for ax, key in ((loss_ax, "train_loss"), (acc_ax, "test_acc")):
                length = max((len(r["epochs"]) for r in runs), default=0)
                ys = []
                for j in range(length):
                    vals = [r["epochs"][j][key] for r in runs if j < len(r["epochs"]) and r["epochs"][j][key] is not None]
                    ys.append(statistics.fmean(vals) if vals else math.nan)
                ax.plot(range(1, length + 1), ys, color=_color(norm), linestyle=style, marker=".",
                        label=label if ax is loss_ax else None)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    fig.suptitle(f"Training at scale {scale:g}, native {dtype} ({reduction}); a diverged run ends its line", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def fig_nonfinite(records: Sequence[dict], dtype: str) -> Figure:
    """The step of the first non-finite value per norm and scale (native runs, every seed);
    runs that never produced one are not drawn."""
    reductions = list(dict.fromkeys(r["reduction"] for r in _select(records, compute="native", dtype=dtype)))
    fig, axes = plt.subplots(1, max(len(reductions), 1), figsize=(5.2 * max(len(reductions), 1), 4.2),
                             sharey=True, squeeze=False)
    markers = {"input": "v", "mean": "D", "statistic": "o", "output": "s", "gradient": "^"}
    scales = sorted({r["scale"] for r in records})
    for ax, reduction in zip(axes[0], reductions or [None]):
        seen: set[tuple[str, str]] = set()
        ax.set_xlim(scales[0] / 3, scales[-1] * 3)
        for i, norm in enumerate(dict.fromkeys(r["norm"] for r in records)):
            for r in _select(records, compute="native", dtype=dtype, reduction=reduction, norm=norm, regime="wd_on"):
                event = r.get("first_nonfinite")
                if not event:
                    continue
                key = (norm, event["quantity"])
                ax.plot(r["scale"] * 1.15 ** i, event["step"] + 1, markers.get(event["quantity"], "o"),
                        color=_color(norm), label=f"{norm_label(norm)}: {event['quantity']}" if key not in seen else None)
                seen.add(key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("scale of the activations entering batch-norm")
        ax.set_title(f"reduction: {reduction}", fontsize=10)
        ax.grid(alpha=0.3)
        if seen:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no non-finite value in any run", transform=ax.transAxes, ha="center")
    axes[0][0].set_ylabel("step of the first inf/NaN (1 = first step)")
    fig.suptitle(f"Where native {dtype} batch-norm first produced inf or NaN", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def fig_natural(records: Sequence[dict], dtype: str) -> Figure:
    """The natural case: the largest pre-normalization deviation per epoch (over layers, mean over
    seeds) with WD on and WD off at scale 1, fp32 and native runs, beside the square's limit."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for regime, style in (("wd_on", "-"), ("wd_off", "--")):
        for norm in dict.fromkeys(r["norm"] for r in records):
            runs = [r for r in _select(records, compute="fp32", norm=norm, scale=1.0, regime=regime) if r["epochs"]]
            if not runs:
                continue
            length = min(len(r["epochs"]) for r in runs)
            ys = [statistics.fmean(max(v["max_deviation"] for v in r["epochs"][j]["norm_layers"].values())
                                   for r in runs) for j in range(length)]
            ax.plot(range(1, length + 1), ys, color=_color(norm), linestyle=style,
                    label=f"{norm_label(norm)} fp32, {'WD on' if regime == 'wd_on' else 'WD off'}")
    ax.axhline(_square_limit(records, dtype), color="grey", linestyle="-.", linewidth=1,
               label=f"{dtype} square overflows")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("largest |x - mean| entering a batch-norm")
    ax.set_title("The natural case: does the scale grow on its own without WD?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_all(records: Sequence[dict[str, Any]], output_dir: str | Path, formats: Sequence[str] = ("png",),
             verdicts: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """Every figure the records allow, per low-precision dtype: ``halfprec_accuracy_<dtype>``,
    ``halfprec_curves_<dtype>`` (at the scale where L2 first fails, first reduction order),
    ``halfprec_nonfinite_<dtype>``, and ``halfprec_natural`` when WD-off runs exist. Returns the
    files written."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}: use {', '.join(FORMATS)}")
    ok = [r for r in records if r.get("status") == "ok"]
    written: list[Path] = []
    dtypes = list(dict.fromkeys(r["dtype"] for r in ok if r["compute"] != "fp32"))
    for dtype in dtypes:
        written += save_figure(fig_accuracy(ok, dtype, verdicts), output_dir, f"halfprec_accuracy_{dtype}", formats)
        reductions = list(dict.fromkeys(r["reduction"] for r in _select(ok, compute="native", dtype=dtype)))
        if reductions:
            reduction = reductions[0]
            scale = failing_scale(ok, dtype, reduction, verdicts)
            written += save_figure(fig_curves(ok, dtype, reduction, scale), output_dir, f"halfprec_curves_{dtype}",
                                   formats)
            written += save_figure(fig_nonfinite(ok, dtype), output_dir, f"halfprec_nonfinite_{dtype}", formats)
    if any(r["regime"] == "wd_off" for r in ok) and dtypes:
        written += save_figure(fig_natural(ok, dtypes[0]), output_dir, "halfprec_natural", formats)
    return written
