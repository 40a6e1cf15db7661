"""Lp normalization layers: batch-norm with an L2, L1, L-inf or top-k dispersion (the paper's
layers), the same dispersions for layer-norm, RMS-norm and group-norm, weight normalization
(plain and bounded), and :func:`convert` to swap a model's batch-norms.

Imports nothing from normbench but :mod:`normbench.kernels`.
"""

from normbench.nn import functional
from normbench.nn.convert import convert
from normbench.nn.modules import (
    LpBatchNorm1d,
    LpBatchNorm2d,
    LpBatchNorm3d,
    LpGroupNorm,
    LpLayerNorm,
    LpRMSNorm,
)
from normbench.nn.sync import SyncLpBatchNorm
from normbench.nn.weight_norm import bounded_weight_norm, channel_norm, remove_weight_norm, weight_norm

__all__ = [
    "functional",
    "convert",
    "LpBatchNorm1d",
    "LpBatchNorm2d",
    "LpBatchNorm3d",
    "LpLayerNorm",
    "LpRMSNorm",
    "LpGroupNorm",
    "SyncLpBatchNorm",
    "weight_norm",
    "bounded_weight_norm",
    "remove_weight_norm",
    "channel_norm",
]
