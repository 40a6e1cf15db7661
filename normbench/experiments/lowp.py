"""Batch-norm computed in low precision inside an fp32 network: the layers ``plot halfprec`` trains.

:func:`attach` replaces every batch-norm of a network by a :class:`LowPrecisionBatchNorm2d` that
first multiplies its input by a fixed ``scale`` (the experiment's axis: in exact arithmetic
batch-norm ignores it, in fp16 it decides whether squares overflow), then computes the layer in one
of three ways:

``native``
    every operation of the forward and backward pass rounded to the dtype and every reduction done
    in the dtype in the chosen order, through :class:`~normbench.numerics.emulator.Emulator` and the
    same formula ``normbench stability`` uses (:func:`~normbench.numerics.layers.native_forward`);
    the affine step too (weight and bias gradients are reductions in the dtype). Input, output and
    input gradient are values of the storage dtype (fp8 is storage only: its arithmetic runs in
    fp16).
``framework``
    what a framework does with low-precision activations: input and output stored in the dtype,
    statistics accumulated in fp32 (normbench's ``analytic`` layer run on the dtype's tensor).
``fp32``
    the layer in fp32 throughout (the reference).

The running statistics are fp32 buffers updated from the batch statistics the layer computed (an
overflowed statistic poisons them, as it would on hardware). Eval mode normalizes with them in fp32
and stores the output in the dtype: at deployment the running statistics fold into the preceding
convolution, so the experiment tests training, where the paper's claim lies.

A :class:`Monitor` shared by a network's layers notes the first non-finite value (training step,
layer, and quantity: ``input`` after the cast, the ``mean``, the dispersion ``statistic`` (D), the
``output``, or the ``gradient`` arriving at the input) and the largest deviation ``|x - mean|`` each layer saw per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normbench.axes import parse_norm
from normbench.nn import LpBatchNorm2d
from normbench.nn.functional import lp_batch_norm, update_running_stats
from normbench.numerics.emulator import REDUCTIONS, Emulator
from normbench.numerics.formats import FP8, FORMATS
from normbench.numerics.layers import from_rows, native_forward, to_rows

COMPUTES = ("native", "framework", "fp32")
QUANTITIES = ("input", "mean", "statistic", "output", "gradient")
DTYPES = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
FP8_COMPUTE = "fp16"  # fp8 is a storage format; its arithmetic runs in fp16
_ROWS = parse_norm("l2")  # batch-norm's row layout: one row per channel


@dataclass(frozen=True)
class LowpSpec:
    """How every batch-norm of a network computes: dispersion ``p`` (and ``k`` for top-k),
    ``compute`` (one of :data:`COMPUTES`), ``dtype`` (storage dtype of the layer's input, output
    and gradients; ignored by ``fp32``), ``reduction`` (native only) and the input ``scale``."""

    p: float
    k: int | None
    compute: str
    dtype: str = "fp16"
    reduction: str | None = "pairwise"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.compute not in COMPUTES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTES)}, got {self.compute!r}")
        if self.compute != "fp32" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compute == "native" and self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")

    @property
    def compute_dtype(self) -> str:
        """The format the arithmetic runs in (fp8 storage computes in fp16)."""
        if self.compute == "fp32":
            return "fp32"
        return FP8_COMPUTE if self.dtype in FP8 else self.dtype


class Monitor:
    """What a network's low-precision layers saw: the first non-finite value and, per epoch, the
    largest pre-normalization deviation per layer. ``step`` is set by the training loop."""

    def __init__(self) -> None:
        self.step = 0
        self.first_nonfinite: dict[str, Any] | None = None
        self._max_deviation: dict[str, float] = {}

    def check(self, layer: str, quantity: str, t: torch.Tensor) -> None:
        """Note ``t`` if it is the first non-finite tensor of the run."""
        if self.first_nonfinite is None and not bool(torch.isfinite(t).all()):
            self.first_nonfinite = {"step": self.step, "layer": layer, "quantity": quantity}

    def deviation(self, layer: str, value: float) -> None:
        self._max_deviation[layer] = max(self._max_deviation.get(layer, 0.0), value)

    def epoch_fields(self) -> dict[str, Any]:
        """The epoch entry's ``norm_layers`` (largest deviation per layer), and reset it."""
        out = {"norm_layers": {name: {"max_deviation": v} for name, v in self._max_deviation.items()}}
        self._max_deviation = {}
        return out


def _store(t: torch.Tensor, storage: Emulator) -> torch.Tensor:
    """``t`` rounded to the storage format forward and its gradient rounded backward (float64)."""
    return storage.input(t.to(torch.float64))


class LowPrecisionBatchNorm2d(nn.Module):
    """A 2-D batch-norm whose input is multiplied by ``spec.scale`` and which computes in
    ``spec.compute`` (see the module doc). Built from an existing batch-norm, whose parameters and
    buffers it takes over (the same Parameter objects)."""

    def __init__(self, source: nn.BatchNorm2d, spec: LowpSpec, name: str, monitor: Monitor) -> None:
        super().__init__()
        if source.momentum is None or not source.affine or not source.track_running_stats:
            raise ValueError("the low-precision layer needs an affine batch-norm with running statistics and a momentum")
        self.spec, self.layer_name, self.monitor = spec, name, monitor
        self.eps, self.momentum = source.eps, source.momentum
        self.weight, self.bias = source.weight, source.bias
        self.register_buffer("running_mean", source.running_mean)
        self.register_buffer("running_var", source.running_var)
        self.storage = Emulator("fp32" if spec.compute == "fp32" else spec.dtype)
        self.emulator = Emulator(spec.compute_dtype, spec.reduction or "pairwise")

    def extra_repr(self) -> str:
        s = self.spec
        return f"p={s.p}, k={s.k}, compute={s.compute}, dtype={s.dtype}, reduction={s.reduction}, scale={s.scale:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self.spec.scale
        if not self.training:
            return self._eval(z)
        if self.spec.compute == "native":
            return self._native(z).to(x.dtype)
        return self._torch(z).to(x.dtype)

    def _watch_input(self, stored: torch.Tensor, rows: torch.Tensor) -> None:
        """Check the stored input, hook its gradient, and note its largest deviation (``rows``:
        the same values laid out one row per channel)."""
        self.monitor.check(self.layer_name, "input", stored)
        if stored.requires_grad:
            stored.register_hook(lambda g: self.monitor.check(self.layer_name, "gradient", g))
        with torch.no_grad():
            dev = (rows - rows.mean(-1, keepdim=True)).abs().amax()
        if bool(torch.isfinite(dev)):
            self.monitor.deviation(self.layer_name, float(dev))

    def _native(self, z: torch.Tensor) -> torch.Tensor:
        emu, spec = self.emulator, self.spec
        rows = to_rows(z, _ROWS)
        stored = _store(rows, self.storage)
        self._watch_input(stored, stored.detach())
        xhat, mean, stat, scale = native_forward(emu.input(stored), emu, spec.p, spec.k, self.eps)
        self.monitor.check(self.layer_name, "mean", mean.detach())
        self.monitor.check(self.layer_name, "statistic", scale.detach())
        w = emu.input(self.weight.view(-1, 1).to(torch.float64))
        b = emu.input(self.bias.view(-1, 1).to(torch.float64))
        y = _store(emu.add(emu.mul(xhat, w), b), self.storage)
        self.monitor.check(self.layer_name, "output", y.detach())
        with torch.no_grad():
            update_running_stats(self.running_mean, self.running_var,
                                 mean.detach().reshape(-1).to(self.running_mean.dtype),
                                 stat.detach().reshape(-1).to(self.running_var.dtype),
                                 spec.p, spec.k, rows.shape[-1], self.momentum, self.eps)
        return from_rows(y, tuple(z.shape), _ROWS)

    def _torch(self, z: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.compute == "fp32":
            stored, xc = z, z
        else:
            stored = _store(z, self.storage)
            xc = stored.to(FORMATS[spec.compute_dtype].dtype)  # exact: the values are storage values
        self._watch_input(stored, to_rows(stored.detach(), _ROWS))
        y = lp_batch_norm(xc, self.running_mean, self.running_var, self.weight, self.bias, True,
                          self.momentum, self.eps, spec.p, spec.k, impl="analytic")
        if spec.compute != "fp32":
            y = _store(y, self.storage)
        self.monitor.check(self.layer_name, "output", y.detach())
        return y

    @torch.no_grad()
    def _eval(self, z: torch.Tensor) -> torch.Tensor:
        stored = z if self.spec.compute == "fp32" else self.storage.round(z).to(z.dtype)
        y = F.batch_norm(stored, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return y if self.spec.compute == "fp32" else self.storage.round(y).to(z.dtype)


def _round_output(storage: Emulator):
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return _store(out, storage).to(out.dtype)

    return hook


def attach(model: nn.Module, spec: LowpSpec, monitor: Monitor, storage: str = "fp32") -> nn.Module:
    """Replace every ``BatchNorm2d`` (torch's or normbench's) of ``model`` in place by a
    :class:`LowPrecisionBatchNorm2d` of ``spec`` sharing its parameters and buffers, and with
    ``storage`` other than fp32 round every other activation (each layer's output, and the
    gradient flowing back through it) to that dtype. Returns ``model``."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, LpBatchNorm2d))]
    if not targets:
        raise ValueError("the model has no BatchNorm2d layer to compute in low precision")
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowPrecisionBatchNorm2d(m, spec, name, monitor))
    if storage != "fp32":
        rounding = Emulator(storage)
        model.register_forward_pre_hook(lambda module, args: tuple(_store(a, rounding).to(a.dtype) for a in args))
        for m in model.modules():
            if not isinstance(m, LowPrecisionBatchNorm2d) and not list(m.children()):
                m.register_forward_hook(_round_output(rounding))
    return model
