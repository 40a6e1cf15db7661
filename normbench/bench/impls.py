"""The implementation registry: every ``--impl`` name is one :class:`Impl` entry in :data:`IMPLS`.

An entry says which norms it can run (``unsupported`` returns the reason it cannot, or None) and
builds the layer for a norm and an input shape. The runner moves the layer to the device and
dtype, sets train or eval mode and times it; nothing else is implementation-specific. A new
implementation (the later ``fused`` one) is one :func:`register` call:

    register(Impl("fused", "normbench's fast path", build=lambda norm, shape: ..., compiles=True))

``compiles=True`` tells the runner that the first call compiles: its time is then reported as
``compile_time_s``. ``synchronizes=True`` marks a layer whose statistics cross ranks (what
``profile`` runs under torchrun); ``devices`` lists the device types a layer runs on, if not all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from normbench.axes import NormSpec


def _no_limits(norm: NormSpec) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of the norm layers, as the profile runs it."""

    name: str
    description: str
    build: Callable[[NormSpec, Sequence[int]], torch.nn.Module]
    unsupported: Callable[[NormSpec], str | None] = _no_limits
    compiles: bool = False
    synchronizes: bool = False
    devices: tuple[str, ...] | None = None  # device types it runs on (None: every one)


IMPLS: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
    """Add (or replace) an implementation under its name."""
    IMPLS[impl.name] = impl
    return impl


def get(name: str) -> Impl:
    """The entry called ``name``; a KeyError listing the names otherwise."""
    try:
        return IMPLS[name]
    except KeyError:
        raise KeyError(f"unknown impl {name!r}: use {', '.join(IMPLS)}") from None


def torch_reference(norm: NormSpec) -> NormSpec:
    """The norm whose name a record of torch's layer carries (``torch``, ``torch-sync``): torch's
    layers are the L2 member of each family (torch's BatchNorm is ``l2``, its LayerNorm
    ``layernorm`` ...)."""
    return NormSpec(norm.family, 2.0, None)


# The implementations that are torch's own layers (their cells carry the family's L2 norm).
TORCH_IMPLS = ("torch", "torch-sync")


def reference_impl(world: int) -> str:
    """The implementation every speedup is measured against: torch's layer in one process,
    torch's SyncBatchNorm across ranks (torchrun)."""
    return "torch-sync" if world > 1 else "torch"


def _paper_unsupported(norm: NormSpec) -> str | None:
    if norm.family != "batchnorm":
        return "the paper's code has batch-norm layers only"
    return None


def _build_paper(norm: NormSpec, shape: Sequence[int]) -> torch.nn.Module:
    from normbench.bench.paper import PaperLpBatchNorm

    norm.check_shape(shape)
    return PaperLpBatchNorm(shape[1], p=norm.p, k=norm.k)


register(Impl(
    "torch",
    "torch's own layer of the family (BatchNorm, LayerNorm, RMSNorm, GroupNorm: their L2 norm)",
    build=lambda norm, shape: norm.torch_module(shape),
))
register(Impl(
    "eager",
    "normbench's layer, autograd through the plain formula (the reference)",
    build=lambda norm, shape: norm.module(shape, impl="eager"),
))
register(Impl(
    "analytic",
    "normbench's layer, custom autograd Function with an analytic backward",
    build=lambda norm, shape: norm.module(shape, impl="analytic"),
))
register(Impl(
    "paper",
    "the paper's original formulation (mean, transposed contiguous copy, abs, mean/top-k)",
    build=_build_paper,
    unsupported=_paper_unsupported,
))


register(Impl(
    "fused",
    "normbench's fast path: pass-minimal kernels for every family (Triton on CUDA, numba on the CPU; "
    "torch.compile'd stages or analytic where neither takes the input)",
    build=lambda norm, shape: norm.module(shape, impl="fused"),
    compiles=True,
))


def _batchnorm_only(norm: NormSpec) -> str | None:
    if norm.family != "batchnorm":
        return "only batch-norm synchronizes its statistics across ranks (the other families normalize per sample)"
    return None


def _build_sync(norm: NormSpec, shape: Sequence[int]) -> torch.nn.Module:
    from normbench.nn import SyncLpBatchNorm

    norm.check_shape(shape)
    return SyncLpBatchNorm(shape[1], p=norm.p, k=norm.k)


register(Impl(
    "sync",
    "normbench's SyncLpBatchNorm: the whole batch's statistics across ranks (torchrun; one process: local)",
    build=_build_sync,
    unsupported=_batchnorm_only,
    synchronizes=True,
))
register(Impl(
    "torch-sync",
    "torch's SyncBatchNorm (L2; CUDA only)",
    build=lambda norm, shape: torch.nn.SyncBatchNorm(shape[1]),
    unsupported=_batchnorm_only,
    synchronizes=True,
    devices=("cuda",),
))
