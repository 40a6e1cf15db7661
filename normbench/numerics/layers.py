"""The three ways a stability cell computes a norm layer, forward and input gradient:

- :func:`reference`: normbench's layer (plain formula, ``impl="eager"``) in float64;
- :func:`framework`: normbench's layer as shipped (``impl="auto"``), or torch's own L2 layer, run
  in the tested dtype; both accumulate their statistics in float32;
- :func:`native`: the same formula through the :class:`~normbench.numerics.emulator.Emulator`,
  every intermediate rounded to the dtype and every reduction done in the dtype.

All three see the same input values (already rounded to the tested dtype) and the same upstream
gradient. The layers' affine parameters stay at their initial values (weight 1, bias 0), where the
affine step is exact in every format, so the emulated formula leaves it out.

Every statistic reduces one "row": a channel for batch-norm, a normalized row for layer/RMS-norm,
a (sample, group) for group-norm. :func:`to_rows` lays a tensor out as ``(rows, n)``, the layout
metrics are computed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from normbench.axes import GROUPS, NormSpec
from normbench.kernels.constants import dispersion_constant
from normbench.kernels.reference import lp_normalize
from normbench.numerics.emulator import Emulator
from normbench.numerics.formats import Format


def to_rows(x: torch.Tensor, norm: NormSpec) -> torch.Tensor:
    """``x`` as ``(rows, n)``: one row per statistic of ``norm`` (a copy where needed)."""
    if norm.family == "batchnorm":
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if norm.family == "groupnorm":
        return x.reshape(x.shape[0] * math.gcd(GROUPS, x.shape[1]), -1)
    return x.reshape(-1, x.shape[-1])


def from_rows(rows: torch.Tensor, shape: tuple[int, ...], norm: NormSpec) -> torch.Tensor:
    """Inverse of :func:`to_rows`."""
    if norm.family == "batchnorm":
        moved = (shape[1], shape[0], *shape[2:])
        return rows.reshape(moved).transpose(0, 1)
    return rows.reshape(shape)


@dataclass
class Outcome:
    """What one computation of a layer gave, as float64 rows ``(rows, n)``: the output ``y`` and
    input gradient ``dx`` (after rounding to the storage dtype), the per-row statistic and
    dispersion, and where values left the dtype's range (``overflow_stage``: ``"statistic"`` or
    ``"output"``, None when nothing overflowed; the input cast is checked by the caller), and
    whether the input gradient left the storage dtype's range before it was stored (a saturating
    format would hide it)."""

    y: torch.Tensor
    dx: torch.Tensor
    stat: torch.Tensor | None
    scale: torch.Tensor | None
    overflow_stage: str | None
    grad_overflow: bool = False


def _overflowed(t: torch.Tensor | None, fmt: Format) -> bool:
    """Whether ``t`` holds an infinity or a value beyond ``fmt``'s range (a saturating format
    hides overflow by clamping; this catches it before the clamp)."""
    if t is None:
        return False
    t = t.detach()
    return bool(torch.isinf(t).any() or (t.abs() >= fmt.overflow_threshold).any())


def _store(t: torch.Tensor, storage: Format) -> torch.Tensor:
    return storage.round(t.detach().to(torch.float64))


def reference(x: torch.Tensor, dy: torch.Tensor, norm: NormSpec, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of normbench's layer in float64 (``impl="eager"``: the plain
    formula under autograd), as rows."""
    module = norm.module(tuple(x.shape), impl="eager", eps=eps).to(device=x.device, dtype=torch.float64).train()
    xr = x.detach().to(torch.float64).requires_grad_(True)
    y = module(xr)
    y.backward(dy.to(torch.float64))
    return to_rows(y.detach(), norm), to_rows(xr.grad, norm)


def framework(
    x: torch.Tensor, dy: torch.Tensor, norm: NormSpec, eps: float, compute: torch.dtype, storage: Format,
    torch_layer: bool = False,
) -> Outcome:
    """The layer as users run it: normbench's module (``impl="auto"``), or with ``torch_layer``
    torch's own layer of the family (L2 only), in the dtype ``compute`` (float32 statistics
    inside), output and gradient rounded to ``storage`` (fp8 is storage only). The statistic stage
    is checked on the float32 statistics of the same formula."""
    if torch_layer:
        if norm.p != 2 or norm.k is not None:
            raise ValueError(f"torch has no {norm.name} layer (only L2 ones)")
        module = norm.torch_module(tuple(x.shape), eps=eps).to(device=x.device).train()
    else:
        module = norm.module(tuple(x.shape), eps=eps).to(device=x.device).train()
    xc = x.detach().to(compute).requires_grad_(True)
    y = module(xc)
    y.backward(dy.to(compute))
    rows = to_rows(xc.detach(), norm)
    with torch.no_grad():
        _, _, stat = lp_normalize(rows, (1,), norm.p, norm.k, eps, center=norm.family != "rmsnorm")
    stage = None
    if bool(torch.isinf(stat).any()):
        stage = "statistic"
    elif _overflowed(y.detach().double(), storage):
        stage = "output"
    return Outcome(
        y=to_rows(_store(y, storage), norm),
        dx=to_rows(_store(xc.grad, storage), norm),
        stat=stat.reshape(-1).double(),
        scale=None,
        overflow_stage=stage,
        grad_overflow=_overflowed(xc.grad.double(), storage),
    )


class NativeForward(NamedTuple):
    """What :func:`native_forward` computed, per row: the normalized rows ``y``, the ``mean``
    (None without centering), the dispersion statistic ``stat`` and the divisor ``scale`` (D)."""

    y: torch.Tensor
    mean: torch.Tensor | None
    stat: torch.Tensor
    scale: torch.Tensor


def native_forward(
    x: torch.Tensor, emu: Emulator, p: float, k: int | None, eps: float, center: bool = True
) -> NativeForward:
    """The Lp normalization of rows ``x`` (float64 values of the emulator's format, shape
    ``(rows, n)``) in emulated arithmetic: every operation rounded, means in the emulator's
    reduction order, eps and the dispersion constant rounded to the format.
    Differentiable through the emulator."""
    n = x.shape[-1]
    mean = emu.mean(x, (-1,), keepdim=True) if center else None
    u = emu.sub(x, mean) if center else x
    if p == 2:
        stat = emu.mean(emu.mul(u, u), (-1,), keepdim=True)
        scale = emu.sqrt(emu.add_scalar(stat, eps))
    else:
        a = emu.abs(u)
        if p == 1:
            stat = emu.mean(a, (-1,), keepdim=True)
        elif k is None:
            stat = emu.amax(a, (-1,), keepdim=True)
        else:
            stat = emu.topk_mean_last(a, k)
        scale = emu.add_scalar(emu.scale(stat, dispersion_constant(p, n, k, center)), eps)
    return NativeForward(emu.div(u, scale), mean, stat, scale)


def native(x: torch.Tensor, dy: torch.Tensor, norm: NormSpec, eps: float, emu: Emulator, storage: Format) -> Outcome:
    """The layer's formula in emulated low-precision arithmetic (format and reduction order of
    ``emu``), forward and backward, output and gradient rounded to ``storage``."""
    rows = to_rows(x.detach().to(torch.float64), norm)
    if norm.k is not None and norm.k > rows.shape[-1]:
        raise ValueError(f"top-k needs k <= the {rows.shape[-1]} values per statistic, got k={norm.k}")
    xr = rows.clone().requires_grad_(True)
    y, _, stat, scale = native_forward(emu.input(xr), emu, norm.p, norm.k, eps, center=norm.family != "rmsnorm")
    y.backward(to_rows(dy.to(torch.float64), norm))
    stage = None
    if _overflowed(stat, emu.format) or _overflowed(scale, emu.format):
        stage = "statistic"
    elif _overflowed(y, emu.format) or _overflowed(y, storage):
        stage = "output"
    return Outcome(
        y=_store(y, storage),
        dx=_store(xr.grad, storage),
        stat=stat.detach().reshape(-1),
        scale=scale.detach().reshape(-1),
        overflow_stage=stage,
        grad_overflow=_overflowed(xr.grad, emu.format) or _overflowed(xr.grad, storage),
    )
