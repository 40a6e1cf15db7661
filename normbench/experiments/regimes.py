"""The training regimes of the equivalence experiments and the two weight-decay protocols.

A regime fixes the normalization and what happens to the normalization-preceded convolution
weights (the *conv weights*, scale invariant under batch-norm):

=====================  ====  =========  ===========================================================
regime                 norm  conv WD    conv weights' step
=====================  ====  =========  ===========================================================
wd_on                  bn    yes        plain SGD step, lr schedule
wd_off                 bn    no         plain SGD step, lr schedule
wd_off_corrected       bn    no         step of channel c scaled by ||w_c||^2 / ||w_WD,c[e]||^2
wd_off_corrected_grad  bn    no         the same factor on the gradient, before momentum (variant)
norm_schedule          bn    no         no lr decay; after each step ||w_c|| set to ||w_WD,c[e]||
                                        times sqrt(1/gamma) per scheduled decay so far
batch_norm             bn    yes        as wd_on (the reference of the normalization comparison)
weight_norm            wn    yes        WN on the convs, mean-only batch-norm after them
bounded_weight_norm    bwn   yes        bounded WN (norm fixed at init), mean-only batch-norm
batch_norm_l1          bn-1  yes        as wd_on, L1 batch-norm
batch_norm_linf        bn-inf yes       as wd_on, L-inf batch-norm
=====================  ====  =========  ===========================================================

The paper's correction (``wd_off_corrected``, as in its code) scales the *step*, that is the
momentum buffer, by the factor of the current weights. Since the gradient of a scale-invariant
weight shrinks as ``1/||w||``, a buffer filled at smaller norms is multiplied by the larger factor
of a grown norm: when a channel's norm starts to grow, its next step grows faster still, and the
run can diverge (measured on digits: a conv1 channel going from 6 to 1e31 in a dozen steps).
``wd_off_corrected_grad`` is a variant, not the paper's: it scales each gradient by the factor of
the weights it was computed at, as it enters the buffer, so the feedback is gone; its effective
learning rate is the same ``lr / ||w_WD,c[e]||^2``.

``w_WD,c[e]`` is channel c's norm at the end of epoch e in the ``wd_on`` run of the same seed and
protocol (the paper's code uses the end-of-epoch norm as the target through that epoch).

Protocols say who else gets weight decay:

- ``paper``: the WD-on runs decay every parameter; the WD-off runs decay only the last layer
  (as in the paper's code): WD on and WD off then also differ in batch-norm's weight and bias.
- ``isolated``: every parameter but the conv weights gets the same WD in every regime, so the
  regimes differ only in the mechanism under test. The last layer keeps WD in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from normbench.errors import UserError

PROTOCOLS = ("paper", "isolated")


@dataclass(frozen=True)
class Regime:
    """What a regime trains and how it treats the conv weights."""

    name: str
    norm: str = "bn"
    p: float = 2.0
    conv_wd: bool = True
    correction: str | None = None  # "step" (the paper's) or "gradient" (variant), see module doc
    norm_schedule: bool = False
    needs_reference: bool = False
    description: str = ""

    def spec(self) -> dict:
        """The fields that change training (the regime's name does not: ``batch_norm`` and
        ``wd_on`` train the same run, so they share one cache entry)."""
        return {
            "norm": self.norm,
            "p": "inf" if math.isinf(self.p) else self.p,
            "conv_wd": self.conv_wd,
            "correction": self.correction,
            "norm_schedule": self.norm_schedule,
        }


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime("wd_on", description="weight decay on"),
        Regime("wd_off", conv_wd=False, description="weight decay off (last layer keeps it)"),
        Regime(
            "wd_off_corrected",
            conv_wd=False,
            correction="step",
            needs_reference=True,
            description="WD off, per-channel lr x ||w||^2/||w_WD||^2",
        ),
        Regime(
            "wd_off_corrected_grad",
            conv_wd=False,
            correction="gradient",
            needs_reference=True,
            description="as wd_off_corrected, the factor applied to the gradient before momentum",
        ),
        Regime(
            "norm_schedule",
            conv_wd=False,
            norm_schedule=True,
            needs_reference=True,
            description="no lr decay for conv weights; their norms follow the WD run",
        ),
        Regime("batch_norm", description="batch-norm (L2)"),
        Regime("weight_norm", norm="wn", description="weight norm + mean-only BN"),
        Regime("bounded_weight_norm", norm="bwn", description="bounded weight norm + mean-only BN"),
        Regime("batch_norm_l1", p=1.0, description="L1 batch-norm"),
        Regime("batch_norm_linf", p=math.inf, description="L-inf batch-norm"),
    )
}
WD_REGIMES = ("wd_on", "wd_off", "wd_off_corrected", "wd_off_corrected_grad", "norm_schedule")
NORM_REGIMES = ("batch_norm", "weight_norm", "bounded_weight_norm")
LP_REGIMES = ("batch_norm_l1", "batch_norm", "batch_norm_linf")
ALL_REGIMES = tuple(REGIMES)
REFERENCE_REGIME = "wd_on"


def parse_regimes(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Regime names from a comma list; ``all``, ``wd``, ``norms`` and ``lp`` name groups."""
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
    groups = {"all": ALL_REGIMES, "wd": WD_REGIMES, "norms": NORM_REGIMES, "lp": LP_REGIMES}
    out: list[str] = []
    for item in items:
        if not item:
            continue
        expanded = groups.get(item, (item,))
        for name in expanded:
            if name not in REGIMES:
                raise UserError(
                    f"unknown regime {name!r}: use {', '.join(REGIMES)} or a group ({', '.join(groups)})"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise UserError("no regime given")
    return out


def check_protocol(protocol: str) -> str:
    """A protocol name, or a UserError."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}: use {', '.join(PROTOCOLS)}")
    return protocol


def weight_decay_of(kind: str, regime: Regime, protocol: str, wd: float) -> float:
    """The weight decay of a parameter of kind ``"conv"`` (normalization-preceded conv weight,
    or its WN ``g``/``v``), ``"last"`` (the classifier) or ``"other"`` (normalization weights
    and biases) under a regime and protocol."""
    if kind == "last":
        return wd
    if kind == "conv":
        return wd if regime.conv_wd else 0.0
    if protocol == "isolated":
        return wd
    return wd if regime.conv_wd else 0.0


def milestones(epochs: int, decays: int = 3) -> list[int]:
    """Epochs at whose start the lr is multiplied by gamma: every quarter of training (the paper's
    schedule), as ``round(epochs * k / (decays + 1))`` for k = 1..decays, duplicates dropped."""
    out: list[int] = []
    for k in range(1, decays + 1):
        m = int(round(epochs * k / (decays + 1)))
        if 0 < m < epochs and m not in out:
            out.append(m)
    return out


def decays_before(epoch: int, epochs: int) -> int:
    """How many scheduled lr decays have happened by the start of ``epoch``."""
    return sum(1 for m in milestones(epochs) if m <= epoch)


def lr_at(epoch: int, epochs: int, lr: float, gamma: float) -> float:
    """The step schedule's learning rate during ``epoch``."""
    return lr * gamma ** decays_before(epoch, epochs)


def norm_schedule_factor(epoch: int, epochs: int, gamma: float) -> float:
    """How much the norm schedule grows the WD run's norms by ``epoch``: ``(1/gamma)^(1/2)`` per
    decay, so that ``lr / ||w||^2`` drops by gamma at a decay just as the lr schedule makes it."""
    return (1.0 / gamma) ** (0.5 * decays_before(epoch, epochs))


def equilibrium_angular_update(lr: float, wd: float, momentum: float) -> float:
    """The angular update per step of a scale-invariant weight at equilibrium under SGD with
    momentum and weight decay: ``sqrt(2 * lr * wd / (1 + momentum))`` (Wan et al. 2021)."""
    return math.sqrt(2.0 * lr * wd / (1.0 + momentum))


def equilibrium_time_scale(lr: float, wd: float, momentum: float) -> float:
    """Steps in which weight decay alone shrinks a weight's squared norm by a factor e under SGD
    with momentum (inf without weight decay): about ``(1 - momentum) / (2 lr wd)``; exactly
    ``-1 / (2 ln r)`` with r the larger root of ``r^2 - (1 + momentum - lr wd) r + momentum``,
    the recursion's slowest mode. After an lr decay the norms sit above the new equilibrium and the
    angular update below it, and this is about how long they take to get there, so a phase much
    shorter than it never reaches its equilibrium."""
    if lr * wd == 0:
        return math.inf
    b = 1.0 + momentum - lr * wd
    disc = b * b - 4.0 * momentum
    root = (b + math.sqrt(disc)) / 2.0 if disc >= 0 else math.sqrt(momentum)  # complex pair: |r| = sqrt(mu)
    return -1.0 / (2.0 * math.log(root))
