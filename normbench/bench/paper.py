"""The paper's original formulation of Lp batch-norm, rewritten as the ``paper`` baseline.

What users of the paper's code (eladhoffer/norm_matters, ``models/lp_norm.py``) ran, step for step,
so that ``normbench profile`` can show what normbench's layers gain over it. In training:

1. ``mean``: a view to (N, C, rest), mean over ``rest``, then mean over N;
2. a transpose of the input to (C, N, rest) and a **contiguous copy** of it, viewed as (C, n);
3. back to (n, C) (a strided view), minus the mean, ``abs``;
4. the dispersion: ``mean(|u|^p)`` then ``(. + eps)^(-1/p)`` for p=2 (the paper's L2 baseline),
   ``C1 * mean(|u|)`` for p=1, ``paper_linf_constant(n) * mean(topk(|u|, k, dim=0))`` for p=inf;
5. ``out = (x - mean) * scale * weight + bias`` with per-channel views.

Eval mode uses the running mean and running *scale* (the paper keeps 1 / dispersion in its
``running_var`` buffer). This is the formulation only: the paper's code blends running statistics
with the momentum weights swapped, which costs the same and is not reproduced.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from normbench.kernels.constants import C1, paper_linf_constant


class PaperLpBatchNorm(nn.Module):
    """Lp batch-norm of (N, C, ...) input as the paper's code computed it (see the module doc)."""

    def __init__(self, num_features: int, p: float = 2.0, k: int | None = None, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        if p not in (1.0, 2.0, math.inf):
            raise ValueError(f"p must be 1, 2 or inf, got {p!r}")
        self.p, self.k, self.eps, self.momentum = float(p), (k or 1), eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_batch, c = x.shape[0], x.shape[1]
        view = (1, c) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.reshape(n_batch, c, -1).mean(-1).mean(0)
            t = x.transpose(0, 1).contiguous().view(c, -1)  # the contiguous copy of every step
            a = (t.transpose(1, 0) - mean).abs()  # (n, C)
            if self.p == 2:
                scale = ((a ** 2).mean(0) + self.eps) ** -0.5
            elif self.p == 1:
                scale = 1.0 / (a.mean(0) * C1 + self.eps)
            else:
                top = torch.topk(a, self.k, dim=0)[0].mean(0)
                scale = 1.0 / (top * paper_linf_constant(a.shape[0]) + self.eps)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_scale.lerp_(scale.detach().to(self.running_scale.dtype), self.momentum)
        else:
            mean, scale = self.running_mean, self.running_scale
        out = (x - mean.view(view)) * scale.view(view)
        return out * self.weight.view(view) + self.bias.view(view)
