"""The training experiments under ``torchrun``: data-parallel training that computes what one
process computes on the same global batch (docs/distributed.md).

Started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the command joins the process
group (:func:`normbench.distributed.init_from_env`). Every rank then runs the same grid of runs; in
each training step each rank takes its contiguous share of the global batch
(:func:`~normbench.distributed.shard_bounds`), through the model wrapped by :func:`wrap`:
batch-norms become :class:`~normbench.nn.SyncLpBatchNorm` (and the weight-norm models' mean-only
batch-norms :class:`SyncMeanOnlyBatchNorm2d`), so the statistics are the global batch's; the
model is wrapped in DistributedDataParallel; and the logits of every rank are gathered
(:class:`_GatherRows`), so the loss, its finiteness check and the accuracy are the global batch's,
identical on every rank. Every rank ends each step with the same parameters; rank 0 alone reads
and writes the cache (:func:`~normbench.distributed.from_main`), the results and the figures.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from normbench.distributed import shard_bounds, world
from normbench.errors import UserError
from normbench.experiments.models import MeanOnlyBatchNorm2d
from normbench.nn import SyncLpBatchNorm


class _GlobalMean(torch.autograd.Function):
    """The per-channel mean of (N, C, H, W) input over every rank's batch (one all_reduce of the
    sums and the count), and its gradient (one all_reduce of the mean's gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        sums = torch.cat([x.sum((0, 2, 3)), x.new_tensor([x.numel() // c if c else 0])])
        dist.all_reduce(sums)
        ctx.n, ctx.shape = float(sums[-1]), x.shape
        return sums[:-1] / ctx.n

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor) -> torch.Tensor:
        grad = grad_mean.contiguous().clone()
        dist.all_reduce(grad)  # the mean takes every rank's x: its gradient is the ranks' sum
        return (grad / ctx.n).view(1, -1, 1, 1).expand(ctx.shape)


class SyncMeanOnlyBatchNorm2d(MeanOnlyBatchNorm2d):
    """:class:`~normbench.experiments.models.MeanOnlyBatchNorm2d` with the mean of the whole batch
    across ranks in training (eval mode and its running mean are the same as there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world() == 1:
            return super().forward(x)
        mean = _GlobalMean.apply(x)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
        return x - mean.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows stacked in rank order (the global batch's logits on every rank). Every
    rank then computes the same loss from them, so the gradient of this rank's rows is its slice
    of that loss's gradient, times the world size: DistributedDataParallel averages the ranks'
    parameter gradients, and the gradient of the one loss is their sum."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, batch: int) -> torch.Tensor:
        ranks = world()
        size = shard_bounds(batch, ranks, 0)[1]  # the largest share
        padded = rows.new_zeros(size, *rows.shape[1:])
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded)
        ctx.bounds, ctx.ranks = shard_bounds(batch), ranks
        return torch.cat([part[: hi - lo] for part, (lo, hi) in
                          zip(parts, (shard_bounds(batch, ranks, r) for r in range(ranks)))])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo, hi = ctx.bounds
        return grad[lo:hi] * ctx.ranks, None


class ShardedBatch(nn.Module):
    """Takes the global batch, runs this rank's share through ``ddp`` and returns every rank's
    output (the global batch's, in order)."""

    def __init__(self, ddp: nn.Module) -> None:
        super().__init__()
        self.ddp = ddp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = shard_bounds(len(x))
        return _GatherRows.apply(self.ddp(x[lo:hi]), len(x))


def _sync_mean_only(model: nn.Module) -> None:
    """Swap every MeanOnlyBatchNorm2d for the synchronized one (same parameter and buffer)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is MeanOnlyBatchNorm2d:
                new = SyncMeanOnlyBatchNorm2d.__new__(SyncMeanOnlyBatchNorm2d)
                new.__dict__.update(child.__dict__)
                parent._modules[name] = new


def wrap(model: nn.Module) -> nn.Module:
    """What a training step calls instead of ``model``: ``model`` itself in one process;
    otherwise ``model``'s normalizations synchronized in place (the same parameter objects) and
    a :class:`ShardedBatch` around DistributedDataParallel of it. Call after moving ``model`` to
    its device; evaluate ``model`` itself (eval mode communicates nothing, and every rank holds
    the same parameters and running statistics)."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    SyncLpBatchNorm.convert_sync_batchnorm(model)
    _sync_mean_only(model)
    local = [name for name, m in model.named_modules() if "running_mean" in m._buffers
             and not isinstance(m, (SyncLpBatchNorm, SyncMeanOnlyBatchNorm2d))]
    if local:  # batch statistics this module cannot synchronize: the run would not be one process's
        raise UserError(f"cannot train {', '.join(local)} ({type(model.get_submodule(local[0])).__name__}) "
                        "data-parallel: its batch statistics are not synchronized across ranks")
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  broadcast_buffers=False)  # the running statistics agree already
    return ShardedBatch(ddp)
