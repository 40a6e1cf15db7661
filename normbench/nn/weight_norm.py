"""Weight normalization per output channel, as ``torch.nn.utils.parametrize`` parametrizations.

- plain WN: ``w = g * v / ||v||_p`` with ``g`` learned (one value per output channel);
- bounded WN: ``w = rho * v / ||v||_p`` with ``rho`` a fixed buffer, by default the initial
  per-channel norm of the weight (the paper's choice: the norm stays where initialization put it).

The norm runs over every dimension but 0 (output channels), for p in {1, 2, inf}. Both are
removable with :func:`remove_weight_norm` (the current weight is kept) and survive state_dict
round trips (``g``, ``v`` and ``rho`` are stored).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

_VALID_P = (1.0, 2.0, math.inf)


def _check_p(p: float) -> float:
    if p not in _VALID_P:
        raise ValueError(f"weight norm p must be 1, 2 or float('inf'), got {p!r}")
    return float(p)


def channel_norm(w: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The Lp norm of each output channel (dim 0) of ``w``, keepdim so it broadcasts against ``w``."""
    if w.dim() == 1:
        return w.abs()
    return torch.linalg.vector_norm(w, ord=p, dim=tuple(range(1, w.dim())), keepdim=True)


class LpWeightNorm(nn.Module):
    """Parametrization ``w = g * v / ||v||_p`` (originals: ``original0 = g``, ``original1 = v``)."""

    def __init__(self, p: float = 2) -> None:
        super().__init__()
        self.p = _check_p(p)

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return g * v / channel_norm(v, self.p)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_norm(w, self.p), w

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class BoundedWeightNorm(nn.Module):
    """Parametrization ``w = rho * v / ||v||_p`` with ``rho`` a buffer (not trained)."""

    def __init__(self, rho: torch.Tensor, p: float = 2) -> None:
        super().__init__()
        self.p = _check_p(p)
        self.register_buffer("rho", rho)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.rho * v / channel_norm(v, self.p)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    w = getattr(module, name, None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor parameter {name!r}")
    if parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is already parametrized; remove it first")
    return w


def weight_norm(module: nn.Module, name: str = "weight", p: float = 2) -> nn.Module:
    """Apply plain Lp weight normalization to ``module.<name>`` (in place); returns the module."""
    _weight(module, name)
    parametrize.register_parametrization(module, name, LpWeightNorm(p))
    return module


def bounded_weight_norm(
    module: nn.Module, name: str = "weight", p: float = 2, rho: float | torch.Tensor | None = None
) -> nn.Module:
    """Apply bounded Lp weight normalization to ``module.<name>`` (in place); returns the module.

    ``rho``: None (default) keeps each channel's initial norm; a float or a tensor broadcastable
    against the per-channel norm sets it.
    """
    w = _weight(module, name)
    p = _check_p(p)
    with torch.no_grad():
        norm = channel_norm(w, p)
        if rho is None:
            rho_t = norm.detach().clone()
        else:
            rho_t = torch.as_tensor(rho, dtype=w.dtype, device=w.device).expand_as(norm).clone()
    parametrize.register_parametrization(module, name, BoundedWeightNorm(rho_t, p))
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove a (bounded) weight norm, keeping the current weight as a plain parameter."""
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} has no weight norm to remove")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module
