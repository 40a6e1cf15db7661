"""Figures of the weight-norm / learning-rate equivalence experiments.

Every function reads records in the ``normbench.equivalence/1`` layout (and the scale-invariance
check's records) and draws; nothing here trains or measures. Lines are the mean over seeds and
the shaded band spans the lowest to the highest seed. matplotlib is imported here only, with the
non-interactive Agg backend, so that drawing works without a display.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from normbench.plots.common import save_figure  # noqa: E402

FORMATS = ("png", "svg", "pdf")
WD_REGIMES = ("wd_on", "wd_off", "wd_off_corrected", "wd_off_corrected_grad", "norm_schedule")
NORM_REGIMES = ("batch_norm", "weight_norm", "bounded_weight_norm")
LP_REGIMES = ("batch_norm_l1", "batch_norm", "batch_norm_linf")
STYLE = {
    "wd_on": ("tab:blue", "-"),
    "wd_off": ("tab:red", "-"),
    "wd_off_corrected": ("tab:green", "--"),
    "wd_off_corrected_grad": ("tab:olive", "-."),
    "norm_schedule": ("tab:purple", ":"),
    "batch_norm": ("tab:blue", "-"),
    "weight_norm": ("tab:orange", "-"),
    "bounded_weight_norm": ("tab:green", "--"),
    "batch_norm_l1": ("tab:brown", "-"),
    "batch_norm_linf": ("tab:pink", "--"),
}
LABEL = {
    "wd_on": "WD on",
    "wd_off": "WD off",
    "wd_off_corrected": "WD off, lr corrected (paper)",
    "wd_off_corrected_grad": "WD off, corrected before momentum",
    "norm_schedule": "norm schedule",
    "batch_norm": "BN (L2)",
    "weight_norm": "WN + mean-only BN",
    "bounded_weight_norm": "bounded WN + mean-only BN",
    "batch_norm_l1": "BN (L1)",
    "batch_norm_linf": "BN (L-inf)",
}


def _runs(records: Sequence[dict], regime: str, protocol: str | None) -> list[dict]:
    return [
        r
        for r in records
        if r.get("regime") == regime and r.get("status") == "ok" and (protocol is None or r.get("protocol") == protocol)
    ]


def _matrix(runs: Sequence[dict], value: Callable[[dict], float]) -> np.ndarray:
    """Runs x epochs, NaN where a run stopped early (diverged)."""
    length = max(len(r["epochs"]) for r in runs)
    out = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        for j, e in enumerate(r["epochs"]):
            v = value(e)
            out[i, j] = np.nan if v is None else v
    return out


def _band(ax, runs: Sequence[dict], value: Callable[[dict], float], regime: str, label: bool = True) -> None:
    """Mean line over seeds with a min-max band."""
    if not runs:
        return
    m = _matrix(runs, value)
    x = np.arange(1, m.shape[1] + 1)
    color, style = STYLE.get(regime, ("black", "-"))
    with warnings.catch_warnings():  # an epoch where every run had diverged is all-NaN: drawn as a gap
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, low, high = np.nanmean(m, 0), np.nanmin(m, 0), np.nanmax(m, 0)
    diverged = sum(bool(r.get("diverged")) for r in runs)
    count = f"n={len(runs)}" + (f", {diverged} diverged" if diverged else "")
    name = f"{LABEL.get(regime, regime)} ({count})" if label else None
    ax.plot(x, mean, color=color, linestyle=style, label=name, linewidth=1.6)
    if len(runs) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)


def _setting(records: Sequence[dict], protocol: str | None) -> str:
    for r in records:
        if protocol is None or r.get("protocol") == protocol:
            c = r["config"]
            extra = f", {c['label_noise']:.0%} label noise" if c.get("label_noise") else ""
            extra += f", augmented ({c['augment']})" if c.get("augment") else ""
            size = f", {c['train_size']} train images" if c.get("train_size") else ""
            proto = f"protocol {r['protocol']}, " if protocol is not None else ""
            return (
                f"{proto}{c['dataset']}{size}{extra}, model {c['model']}, SGD lr {c['lr']:g} "
                f"momentum {c['momentum']:g}, WD {c['wd']:g}, {c['epochs']} epochs"
            )
    return ""


def _layers(records: Sequence[dict]) -> list[str]:
    for r in records:
        if r.get("epochs"):
            return list(r["epochs"][0]["layers"])
    return []


def fig_training(
    records: Sequence[dict], regimes: Sequence[str], protocol: str | None, title: str, note: str | None = None
) -> Figure:
    """Test accuracy, test loss and training loss per epoch for the given regimes; ``note`` (the
    verdict, say) is printed as a last line of the title."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    panels = (
        ("test accuracy", lambda e: e["test_acc"], False),
        ("test loss", lambda e: e["test_loss"], True),
        ("training loss (epoch mean)", lambda e: e["train_loss"], True),
    )
    for ax, (name, value, log) in zip(axes, panels):
        for regime in regimes:
            _band(ax, _runs(records, regime, protocol), value, regime)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}\n{_setting(records, protocol)}" + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def fig_per_layer(
    records: Sequence[dict],
    regimes: Sequence[str],
    protocol: str | None,
    key: str,
    ylabel: str,
    title: str,
    theory: Callable[[dict], float] | None = None,
    theory_label: str = "",
) -> Figure:
    """One panel per conv layer: ``key`` of the layer per epoch, log scale; optionally a theory
    line computed from the epoch entries of the first regime's runs."""
    fig, axes, layers = _layer_panels(records)
    for ax, layer in zip(axes.flat, layers):
        for regime in regimes:
            _band(ax, _runs(records, regime, protocol), lambda e, L=layer: e["layers"][L][key], regime)
        if theory is not None:
            runs = _runs(records, regimes[0], protocol)
            if runs:
                line = [theory(e) for e in runs[0]["epochs"]]
                ax.plot(np.arange(1, len(line) + 1), line, color="black", linestyle=":", label=theory_label)
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel(ylabel)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title}\n{_setting(records, protocol)}", fontsize=10)
    return fig


def _layer_panels(records: Sequence[dict]) -> tuple[Figure, np.ndarray, list[str]]:
    """A figure with one panel per conv layer of ``records`` (up to 4 a row), its axes and the layers."""
    layers = _layers(records)
    cols = min(4, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    return fig, axes, layers


def fig_equilibrium(records: Sequence[dict], protocol: str | None, regimes: Sequence[str] = ("wd_on", "wd_off"),
                    window: int = 20, tolerance: float = 0.2) -> Figure:
    """The rotational equilibrium as it forms: per conv layer, the per-step angular update of the
    given regimes (each seed, running mean over about ``window`` steps) over the theory line
    ``sqrt(2 lr WD / (1 + momentum))`` of each lr phase, with a band of +-``tolerance``. Runs
    without a per-step series (older records) are left out."""
    from normbench.experiments.summary import equilibrium_fraction, running_mean

    fig, axes, layers = _layer_panels(records)
    on = [r for r in _runs(records, "wd_on", protocol) if r.get("steps")]
    for ax, layer in zip(axes.flat, layers):
        for regime in regimes:
            color, style = STYLE.get(regime, ("black", "-"))
            for k, r in enumerate(run for run in _runs(records, regime, protocol) if run.get("steps")):
                series = r["steps"]
                points = max(1, round(window / series.get("every", 1)))
                ax.plot(series["step"], running_mean(series["layers"][layer]["angular_update"], points), color=color,
                        linestyle=style, linewidth=0.9, alpha=0.8, label=LABEL.get(regime, regime) if k == 0 else None)
        if on:
            c = on[0]["config"]
            wd = c.get("spec", {}).get("wd_conv", c["wd"])
            steps = np.asarray(on[0]["steps"]["step"])
            theory = np.sqrt(2 * np.asarray(on[0]["steps"]["lr"], dtype=float) * wd / (1 + c["momentum"]))
            ax.plot(steps, theory, color="black", linestyle="--", linewidth=1.2, label="sqrt(2 lr WD / (1 + mu))")
            ax.fill_between(steps, theory * (1 - tolerance), theory * (1 + tolerance), color="black", alpha=0.1,
                            linewidth=0, label=f"+-{tolerance:.0%}")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("angular update per step (rad)")
    axes.flat[0].legend(fontsize=7)
    note = ""
    if on:
        phases = [equilibrium_fraction(r, tolerance, window) for r in on]
        n = min(len(p) for p in phases)
        fractions = [float(np.mean([p[k]["fraction"] for p in phases])) for k in range(n)]
        note = (f"\nWD on: fraction of steps within {tolerance:.0%} of the equilibrium per lr phase "
                f"(mean over {len(on)} seeds and the layers): " + ", ".join(f"{f:.0%}" for f in fractions))
    fig.suptitle(f"Rotational equilibrium: angular update per step (running mean over {window} steps) "
                 f"against sqrt(2 lr WD / (1 + momentum))\n{_setting(records, protocol)}{note}", fontsize=10)
    return fig


def fig_scale_invariance(checks: Sequence[dict]) -> Figure:
    """The numeric check: loss change and alpha * gradient ratio against alpha, per layer."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    layers = list(dict.fromkeys(c["layer"] for c in checks))
    for layer in layers:
        rows = [c for c in checks if c["layer"] == layer]
        kind = rows[0]["kind"]
        alphas = [c["alpha"] for c in rows]
        style = "--" if kind == "control" else "-"
        label = f"{layer} ({'last layer, control' if kind == 'control' else 'BN-preceded'})"
        axes[0].plot(alphas, [max(c["loss_rel_change"], 1e-17) for c in rows], style, marker="o", label=label)
        axes[1].plot(alphas, [c["grad_ratio"] for c in rows], style, marker="o", label=label)
    axes[0].set_ylabel("|L(alpha w) - L(w)| / L(w)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("alpha * ||grad at alpha w|| / ||grad at w||  (1 = scales as 1/alpha)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("alpha (weight scaled by)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    eps = checks[0].get("eps") if checks else None
    fig.suptitle(f"Scale invariance of batch-norm-preceded weights (float64, BN eps {eps:g})", fontsize=10)
    return fig


def draw_all(
    records: Sequence[dict[str, Any]],
    checks: Sequence[dict[str, Any]] | None,
    output_dir: str | Path,
    formats: Sequence[str] = ("png",),
    verdicts: Sequence[dict[str, Any]] | None = None,
) -> list[Path]:
    """Draw every figure the records allow into ``output_dir``; returns the files written.

    Per protocol present: ``wd_regimes_<protocol>`` (accuracy and losses, with the line ``short``
    of the protocol's entry in ``verdicts``, from :func:`normbench.experiments.summary.verdict`,
    under the title), ``weight_norm_<protocol>``,
    ``effective_lr_<protocol>`` and ``angular_update_<protocol>`` (with the equilibrium line of the
    WD-on run), and ``equilibrium_<protocol>`` (the per-step angular update of WD on and WD off over
    the equilibrium line, when the records carry per-step series). Then ``normalizations`` (BN vs WN vs bounded WN), ``lp_batch_norm`` and
    ``scale_invariance``. A figure whose regimes were not run is not drawn.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}: use {', '.join(FORMATS)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = [r for r in records if r.get("status") == "ok" and r.get("epochs")]
    protocols = list(dict.fromkeys(r["protocol"] for r in ok))
    for protocol in protocols:
        present = [g for g in WD_REGIMES if _runs(ok, g, protocol)]
        if not present:
            continue
        first = _runs(ok, present[0], protocol)[0]["config"]
        wd, mu = first["wd"], first["momentum"]
        note = next((f"verdict {v['short']}" for v in verdicts or () if v["protocol"] == protocol), None)
        written += save_figure(
            fig_training(ok, present, protocol, "Weight decay regimes: the paper's claim tested", note),
            out, f"wd_regimes_{protocol}", formats,
        )
        written += save_figure(
            fig_per_layer(ok, present, protocol, "norm", "||w|| (layer)", "Weight norm per layer"),
            out, f"weight_norm_{protocol}", formats,
        )
        written += save_figure(
            fig_per_layer(
                ok, present, protocol, "effective_lr", "lr / ||w_c||^2 (channel mean)",
                "Effective learning rate per layer: the correction follows WD on by construction",
            ),
            out, f"effective_lr_{protocol}", formats,
        )
        theory = None
        if "wd_on" in present and wd > 0:
            theory = lambda e: math.sqrt(2 * e["lr"] * wd / (1 + mu))  # noqa: E731
        written += save_figure(
            fig_per_layer(
                ok, present, protocol, "angular_update", "angular update per step (rad)",
                "Angular update per step; dotted: equilibrium sqrt(2 lr WD / (1 + momentum)) of WD on",
                theory=theory, theory_label="equilibrium (WD on)",
            ),
            out, f"angular_update_{protocol}", formats,
        )
        if "wd_on" in present and wd > 0 and any(r.get("steps") for r in _runs(ok, "wd_on", protocol)):
            written += save_figure(fig_equilibrium(ok, protocol), out, f"equilibrium_{protocol}", formats)
    for regimes, stem, title in (
        (NORM_REGIMES, "normalizations", "Batch-norm vs weight norm vs bounded weight norm"),
        (LP_REGIMES, "lp_batch_norm", "Lp batch-norms: L1 and L-inf beside L2"),
    ):
        present = [g for g in regimes if _runs(ok, g, None)]
        if len(present) >= 2:
            proto = protocols[0] if protocols else None
            written += save_figure(fig_training(ok, present, proto, title), out, stem, formats)
    if checks:
        written += save_figure(fig_scale_invariance(checks), out, "scale_invariance", formats)
    return written
