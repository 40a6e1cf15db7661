"""Lp normalization modules. Each subclasses torch's layer of its family, so parameters, buffers
and state_dict keys are torch's (a checkpoint loads both ways), and p=2 is torch's layer."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.kernels.reference import check_pk
from normbench.nn.functional import lp_batch_norm, lp_group_norm, lp_layer_norm, lp_rms_norm


def _lp_repr(p: float, k: int | None, impl: str) -> str:
    text = f"p={p:g}"
    if k is not None:
        text += f", k={k}"
    return text + ("" if impl == "auto" else f", impl={impl!r}")


class _LpBatchNorm(_BatchNorm):
    """Batch-norm with an Lp dispersion; see :func:`normbench.nn.functional.lp_batch_norm`.

    ``running_var`` holds, for every p, the running estimate of sigma^2 (for p != 2 the squared,
    bias-corrected dispersion), so eval mode is ``weight * (x - running_mean) / running_scale + bias``
    with ``running_scale = sqrt(running_var + eps)`` for every p, and converting between p (or from
    torch's BatchNorm) keeps eval outputs.
    """

    def __init__(
        self,
        num_features: int,
        p: float = 2,
        k: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        impl: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.p, self.k = check_pk(p, k)
        self.impl = impl

    @property
    def running_scale(self) -> torch.Tensor | None:
        """The per-channel scale eval mode divides by: ``sqrt(running_var + eps)``."""
        return None if self.running_var is None else (self.running_var + self.eps).sqrt()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return lp_batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            self.p,
            self.k,
            self.impl,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_lp_repr(self.p, self.k, self.impl)}"


class LpBatchNorm1d(_LpBatchNorm):
    """Lp batch-norm of (N, C) or (N, C, L) input."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (N, C[, L]), got {input.dim()}D input")


class LpBatchNorm2d(_LpBatchNorm):
    """Lp batch-norm of (N, C, H, W) input, contiguous or channels_last."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (N, C, H, W), got {input.dim()}D input")


class LpBatchNorm3d(_LpBatchNorm):
    """Lp batch-norm of (N, C, D, H, W) input, contiguous or channels_last_3d."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (N, C, D, H, W), got {input.dim()}D input")


class LpLayerNorm(nn.LayerNorm):
    """Layer-norm over the last dimensions with an Lp dispersion (p=2: torch's LayerNorm)."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        p: float = 2,
        k: int | None = None,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        impl: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.p, self.k = check_pk(p, k)
        self.impl = impl

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return lp_layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, self.p, self.k, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_lp_repr(self.p, self.k, self.impl)}"


class LpRMSNorm(nn.RMSNorm):
    """RMS-norm (no centering) with an Lp dispersion (p=2: torch's RMSNorm)."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        p: float = 2,
        k: int | None = None,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        impl: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.p, self.k = check_pk(p, k)
        self.impl = impl

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return lp_rms_norm(input, self.normalized_shape, self.weight, self.eps, self.p, self.k, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_lp_repr(self.p, self.k, self.impl)}"


class LpGroupNorm(nn.GroupNorm):
    """Group-norm with an Lp dispersion (p=2: torch's GroupNorm)."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        p: float = 2,
        k: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        impl: str = "auto",
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.p, self.k = check_pk(p, k)
        self.impl = impl

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input with {self.num_channels} channels (dim 1), got shape {tuple(input.shape)}")
        return lp_group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.p, self.k, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_lp_repr(self.p, self.k, self.impl)}"
