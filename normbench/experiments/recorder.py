"""What the experiments record about each normalization-preceded convolution.

For every conv layer the recorder follows its *direction parameter*: the tensor whose norm the
output does not depend on (under batch-norm the conv weight itself; under weight normalization
``v`` in ``w = g v / ||v||``). Per epoch it gives the layer's norm, the per-channel norms, the
effective learning rate ``lr_c / ||w_c||^2`` (mean over channels and per channel) and the angular
update per step ``arccos(<w_t, w_t+1> / (||w_t|| ||w_t+1||))`` (mean over the epoch's steps and the
layer's channels).

Per step, where it costs nothing more than the epoch mean already does, it also keeps a series
(:meth:`Recorder.step_series`): the layer's channel-mean angular update and its norm, averaged
over blocks of ``every`` consecutive steps (blocks end at each epoch's end, so none straddles a
learning-rate decay), so that the equilibrium is seen as it forms while a record stays small.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from normbench.experiments.models import conv_layers


def direction_param(conv: nn.Conv2d) -> nn.Parameter:
    """The parameter of ``conv`` whose norm the network's output ignores (see module doc)."""
    if parametrize.is_parametrized(conv, "weight"):
        originals = conv.parametrizations.weight
        return originals.original1 if hasattr(originals, "original1") else originals.original
    return conv.weight


def channel_norms(w: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output channel of a weight, as a 1-D float64 tensor."""
    return torch.linalg.vector_norm(w.detach().double().flatten(1), dim=1)


def channel_angles(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The angle (radians) each output channel turned through between two weights."""
    a = before.detach().double().flatten(1)
    b = after.detach().double().flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1.0, 1.0))


class Recorder:
    """Accumulates angular updates over an epoch and writes the per-layer part of its entry."""

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        self.layers = [(name, direction_param(conv)) for name, conv in conv_layers(model)]
        self._angle_sum = {name: 0.0 for name, _ in self.layers}
        self._steps = 0
        self.every = max(1, int(every))
        self._block_sum = {name: 0.0 for name, _ in self.layers}
        self._block_steps = 0
        self._block_lr: float | None = None
        self._total_steps = 0
        self._series: dict = {
            "every": self.every,
            "step": [],
            "lr": [],
            "layers": {name: {"angular_update": [], "norm": []} for name, _ in self.layers},
        }

    def snapshot(self) -> list[torch.Tensor]:
        """The direction parameters now (call before a step)."""
        return [p.detach().clone() for _, p in self.layers]

    def after_step(self, before: list[torch.Tensor], lr: float | None = None) -> None:
        """Add the angular update of the step just taken (``lr``: the conv weights' learning rate
        of that step, kept with the per-step series)."""
        for (name, p), b in zip(self.layers, before):
            angle = float(channel_angles(b, p).mean())
            self._angle_sum[name] += angle
            self._block_sum[name] += angle
        self._steps += 1
        self._total_steps += 1
        self._block_steps += 1
        self._block_lr = lr
        if self._block_steps == self.every:
            self._flush_block()

    def _flush_block(self) -> None:
        """Append the block of steps since the last flush to the per-step series."""
        if self._block_steps == 0:
            return
        self._series["step"].append(self._total_steps)
        self._series["lr"].append(self._block_lr)
        for name, p in self.layers:
            layer = self._series["layers"][name]
            layer["angular_update"].append(self._block_sum[name] / self._block_steps)
            layer["norm"].append(float(torch.linalg.vector_norm(p.detach().double())))
            self._block_sum[name] = 0.0
        self._block_steps = 0

    def step_series(self) -> dict:
        """The per-step series so far: ``every`` (steps per block), ``step`` (the last step of each
        block, counted from 1 over the run), ``lr`` and per layer ``angular_update`` (the block's
        mean) and ``norm`` (at the block's end)."""
        self._flush_block()
        return self._series

    def epoch_layers(self, lr: float, multipliers: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
        """The per-layer entry for the epoch that just ended, and reset the accumulators.

        ``lr``: the conv weights' learning rate this epoch; ``multipliers``: per layer, the
        per-channel step multiplier the regime applies at the current weights (the correction's
        ``||w_c||^2 / ||w_WD,c||^2``); None means 1.
        """
        out: dict[str, dict] = {}
        for name, p in self.layers:
            norms = channel_norms(p)
            scale = torch.ones_like(norms) if multipliers is None else multipliers[name].double()
            eff = lr * scale / norms.square()
            out[name] = {
                "norm": float(torch.linalg.vector_norm(p.detach().double())),
                "effective_lr": float(eff.mean()),
                "angular_update": self._angle_sum[name] / max(self._steps, 1),
                "channel_norms": norms.tolist(),
                "channel_effective_lr": eff.tolist(),
            }
            self._angle_sum[name] = 0.0
        self._steps = 0
        self._flush_block()  # a block never straddles two epochs (nor, so, an lr decay)
        return out
