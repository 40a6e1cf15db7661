"""What a profile run measures: the grid (:class:`ProfileSpec`), its shape groups and presets, and
the cells it expands to.

A :class:`ShapeGroup` is a named list of input shapes with the norms that suit them by default
(ResNet-50's batch-norm inputs go with batch-norm, a transformer's rows x hidden with layer- and
RMS-norm). A group is what ``normbench plot profile`` draws in one figure. ``--shape`` makes one
group called ``custom``; ``--preset`` names one or more groups.

:func:`make_spec` turns the CLI's comma-separated option strings (or Python values) into a
validated spec; a bad value is a :class:`~normbench.errors.UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from normbench.axes import (
    NormSpec,
    dtype_name,
    format_shape,
    parse_dtypes,
    parse_norms,
    parse_shapes,
    split_list,
)
from normbench.bench.allocator import MODES as MALLOC_MODES
from normbench.bench.bytes import MODES, PASSES
from normbench.bench.impls import IMPLS, TORCH_IMPLS, reference_impl, torch_reference
from normbench.bench.timing import TimingSpec
from normbench.errors import UserError

MEMORY_FORMATS = ("contiguous", "channels_last")
# "cold": every CPU repeat reads inputs out of the last-level cache (rotated copies, or an eviction;
# CUDA: the L2 flushed); "warm": hot-cache timing (--warm-cache).
CACHE_MODES = ("cold", "warm")
BATCHNORM_NORMS = ("l2", "l1", "linf", "top10")
ROW_NORMS = ("layernorm", "l1-layernorm", "linf-layernorm", "rmsnorm", "l1-rmsnorm")

# The input shapes (C, H, W) of ResNet-50's batch-norm layers (torchvision's, stride in the 3x3
# convolution), each distinct shape once: stem, then layer1 to layer4.
RESNET50_BN_SHAPES = (
    (64, 112, 112),
    (64, 56, 56), (256, 56, 56),
    (128, 56, 56), (128, 28, 28), (512, 28, 28),
    (256, 28, 28), (256, 14, 14), (1024, 14, 14),
    (512, 14, 14), (512, 7, 7), (2048, 7, 7),
)
TRANSFORMER_ROWS = 4096  # tokens per batch (e.g. 8 sequences of 512)
TRANSFORMER_HIDDEN = (1024, 2048, 4096, 8192, 16384)


CONV_FAMILIES = ("batchnorm", "groupnorm")
ROW_FAMILIES = ("layernorm", "rmsnorm")
ALL_FAMILIES = CONV_FAMILIES + ROW_FAMILIES


@dataclass(frozen=True)
class ShapeGroup:
    """Input shapes measured together and drawn in one figure, with the norms that suit them:
    ``default_norms`` run when no ``--norm`` is given; with ``--norm`` each norm runs on the
    groups whose ``families`` hold its family (and on every group if none does)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    default_norms: tuple[str, ...] = BATCHNORM_NORMS
    families: tuple[str, ...] = CONV_FAMILIES


def resnet50_group(batch: int) -> ShapeGroup:
    """ResNet-50's batch-norm input shapes at ``batch``."""
    return ShapeGroup(f"resnet50 b{batch}", tuple((batch, *chw) for chw in RESNET50_BN_SHAPES))


def transformer_group(rows: int = TRANSFORMER_ROWS) -> ShapeGroup:
    """A transformer's normalization inputs: ``rows`` tokens x hidden sizes from 1k to 16k."""
    return ShapeGroup(f"transformer {rows} rows", tuple((rows, h) for h in TRANSFORMER_HIDDEN), ROW_NORMS, ROW_FAMILIES)


PRESETS: dict[str, tuple[ShapeGroup, ...]] = {
    "resnet50": (resnet50_group(32), resnet50_group(256)),
    "resnet50-b32": (resnet50_group(32),),
    "resnet50-b256": (resnet50_group(256),),
    "transformer": (transformer_group(),),
}

# The grid `normbench profile` runs with no options (about a minute on a 2-core CPU), and the
# reduced one of --quick (well under a minute). Both pair each norm family with shapes it is used
# on: a ResNet-50 layer-1 batch-norm input and a transformer's 4096 tokens x 1024.
DEFAULT_GROUPS = (
    ShapeGroup("resnet50 b32 layer1", ((32, 64, 56, 56),)),
    ShapeGroup("transformer 4096 rows", ((4096, 1024),), ("layernorm", "l1-layernorm", "rmsnorm"), ROW_FAMILIES),
)
QUICK_GROUPS = (
    ShapeGroup("resnet50 b32 layer3", ((32, 256, 14, 14),), ("l2", "l1", "linf")),
    ShapeGroup("transformer 1024 rows", ((1024, 1024),), ("layernorm", "rmsnorm"), ROW_FAMILIES),
)
QUICK_PASSES = ("fwd+bwd",)

# profile --model: the norms each family of a model's layers runs with when no --norm is given
MODEL_NORMS = {
    "batchnorm": ("l2", "l1", "linf"),
    "layernorm": ("layernorm", "l1-layernorm", "linf-layernorm"),
    "rmsnorm": ("rmsnorm", "l1-rmsnorm", "linf-rmsnorm"),
    "groupnorm": ("groupnorm", "l1-groupnorm", "linf-groupnorm"),
}


def model_groups(label: str, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[ShapeGroup, ...]:
    """One shape group per norm family of a model's layers (``profile --model``): the distinct
    input shapes of its layers of that family, in network order, with that family's norms."""
    by_family: dict[str, dict[tuple[int, ...], None]] = {}
    for family, shape in shapes:
        if family not in MODEL_NORMS:
            raise ValueError(f"no profile norms for the {family} family")
        by_family.setdefault(family, {})[tuple(shape)] = None
    return tuple(ShapeGroup(f"{label} {family}", tuple(found), MODEL_NORMS[family], (family,))
                 for family, found in by_family.items())


def local_impls() -> tuple[str, ...]:
    """The implementations a one-process run times by default: every registered one that does
    not synchronize across ranks."""
    return tuple(name for name, impl in IMPLS.items() if not impl.synchronizes)


def quick_impls() -> tuple[str, ...]:
    """The registered implementations --quick runs: those that neither compile (seconds per
    shape on the CPU) nor synchronize, unless --impl names them."""
    return tuple(name for name in local_impls() if not IMPLS[name].compiles)


# Under torchrun: the synchronized layers, and normbench's layer on each rank's share alone (what
# the same layer costs without communicating), on batch-norm shapes only.
RANKS_IMPLS = ("torch-sync", "sync", "analytic")
RANKS_GROUPS = tuple(g for g in DEFAULT_GROUPS if "batchnorm" in g.families)
RANKS_QUICK_GROUPS = tuple(g for g in QUICK_GROUPS if "batchnorm" in g.families)
DEFAULT_TIMING = TimingSpec()
QUICK_TIMING = TimingSpec(warmup_calls=2, min_repeats=7, min_time_s=0.05, max_time_s=0.5)


@dataclass(frozen=True)
class Cell:
    """One measurement: a norm, an implementation, a dtype, a shape and the pass, mode, memory
    format and device it runs in."""

    norm: NormSpec
    impl: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    group: str
    pass_: str
    mode: str
    memory_format: str
    device: str
    world: int = 1  # ranks sharing the batch (torchrun); ``shape`` is the global batch

    @property
    def rank_shape(self) -> tuple[int, ...]:
        """The input this process holds: its share of the global batch along dim 0 (the whole
        shape in one process)."""
        if self.world == 1:
            return self.shape
        from normbench.distributed import shard_bounds

        lo, hi = shard_bounds(self.shape[0], self.world)
        return (hi - lo, *self.shape[1:])

    @property
    def is_reference(self) -> bool:
        """Whether this is the cell of the layer the speedups are measured against."""
        return self.impl == reference_impl(self.world)

    def axes(self) -> dict[str, object]:
        """The record fields that identify this cell (see :data:`KEY_FIELDS`)."""
        return {
            "norm": self.norm.name,
            "impl": self.impl,
            "dtype": dtype_name(self.dtype),
            "shape": format_shape(self.shape),
            "group": self.group,
            "pass": self.pass_,
            "mode": self.mode,
            "memory_format": self.memory_format,
            "device": self.device,
        }

    def torch_cell(self) -> "Cell":
        """The cell of torch's own layer that this cell's speedup is measured against."""
        return replace(self, norm=torch_reference(self.norm), impl=reference_impl(self.world))


# The fields that identify a cell in a results file (resume skips cells with these values).
KEY_FIELDS = ("norm", "impl", "dtype", "shape", "pass", "mode", "memory_format", "device")


@dataclass(frozen=True)
class ProfileSpec:
    """A profile grid. ``norms=None`` runs each shape group's own default norms; ``device`` may be
    ``auto`` (resolved by the runner). Build one with :func:`make_spec` to get validation."""

    groups: tuple[ShapeGroup, ...] = DEFAULT_GROUPS
    norms: tuple[str, ...] | None = None
    impls: tuple[str, ...] = field(default_factory=lambda: local_impls())  # every registered one but sync
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")
    modes: tuple[str, ...] = ("train",)
    memory_formats: tuple[str, ...] = ("contiguous",)
    device: str = "auto"
    timing: TimingSpec = field(default=DEFAULT_TIMING)
    measure_memory: bool = True  # peak_memory_bytes (on the CPU a profiled call: ~0.1 s per cell)
    threads: int | None = None  # CPU threads for torch during the run; None keeps torch's setting
    malloc: str = "steady"  # CPU runs: "steady" keeps freed memory mapped (normbench.bench.allocator)
    cache: str = "cold"  # "cold": inputs out of the cache in every repeat; "warm": hot cache (CACHE_MODES)
    world: int = 1  # ranks the cells run on together (torchrun); shapes are then global batches

    def cells(self, device: str | None = None) -> list[Cell]:
        """Every cell of the grid, in run order, without repeats. A cell of torch's layer carries
        the L2 norm of its family, so l1 and l2 share one torch cell; the reference one
        (``torch``, across ranks ``torch-sync``) comes first among the cells of its shape, dtype,
        mode, format and pass, as their speedup reference."""
        device = device or self.device
        ref = reference_impl(self.world)
        impls = sorted(self.impls, key=lambda name: name != ref)  # the reference first
        out: dict[Cell, None] = {}
        dtypes = parse_dtypes(self.dtypes)
        for group in self.groups:
            norms = self.group_norms(group)
            for shape in group.shapes:
                for dtype in dtypes:
                    for mode in self.modes:
                        for fmt in self.memory_formats:
                            for pass_ in self.passes:
                                for impl in impls:
                                    for norm in norms:
                                        n = torch_reference(norm) if impl in TORCH_IMPLS else norm
                                        out[Cell(n, impl, dtype, shape, group.name, pass_, mode, fmt, device,
                                                 self.world)] = None
        return list(out)

    def group_norms(self, group: ShapeGroup) -> list[NormSpec]:
        """The norms that run on ``group``: its defaults without ``norms``; otherwise the given
        norms of the group's families, plus those that no group of the spec is made for."""
        if self.norms is None:
            return parse_norms(group.default_norms)
        norms = parse_norms(self.norms)
        placed = {f for g in self.groups for f in g.families}
        return [n for n in norms if n.family in group.families or n.family not in placed]


def _choose(kind: str, text: str | Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.lower() for v in split_list(text)))
    if not values:
        raise UserError(f"--{kind} needs at least one value: {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise UserError(f"unknown {kind} {v!r}: use {', '.join(allowed)}")
    return values


def make_spec(
    norm: str | Sequence[str] | None = None,
    impl: str | Sequence[str] | None = None,
    dtype: str | Sequence[str] | None = None,
    shape: str | Sequence[str] | None = None,
    preset: str | Sequence[str] | None = None,
    pass_: str | Sequence[str] | None = None,
    mode: str | Sequence[str] | None = None,
    memory_format: str | Sequence[str] | None = None,
    device: str = "auto",
    quick: bool = False,
    measure_memory: bool = True,
    timing: TimingSpec | None = None,
    threads: int | None = None,
    malloc: str = "steady",
    cache: str = "cold",
    groups: Sequence[ShapeGroup] | None = None,
    world: int = 1,
) -> ProfileSpec:
    """A validated :class:`ProfileSpec` from option values (comma-separated strings or lists);
    None keeps the default grid's (or with ``quick`` the reduced grid's) value. ``groups``
    (a model's layer shapes, :func:`model_groups`) replace the grid's shapes. ``world`` > 1 (under
    torchrun) defaults to the synchronized layers on the batch-norm shapes (:data:`RANKS_IMPLS`),
    each shape being the global batch."""
    if groups is not None and (shape is not None or preset is not None):
        raise UserError("--model profiles the model's own shapes: leave out --shape and --preset")
    base = ProfileSpec(groups=QUICK_GROUPS, timing=QUICK_TIMING, passes=QUICK_PASSES, impls=quick_impls()) \
        if quick else ProfileSpec()
    if world > 1:
        base = replace(base, groups=RANKS_QUICK_GROUPS if quick else RANKS_GROUPS, impls=RANKS_IMPLS, world=world)
    groups = base.groups if groups is None else tuple(groups)
    if shape is not None and preset is not None:
        raise UserError("give --shape or --preset, not both")
    if shape is not None:
        shapes = tuple(parse_shapes(shape))
        if not shapes:
            raise UserError("--shape needs at least one shape, e.g. 32x64x56x56")
        groups = (ShapeGroup("custom", shapes, families=ALL_FAMILIES),)
    elif preset is not None:
        names = _choose("preset", preset, tuple(PRESETS))
        groups = tuple(dict.fromkeys(g for n in names for g in PRESETS[n]))
    norms = base.norms
    if norm is not None:
        norms = tuple(n.name for n in parse_norms(norm))
    elif shape is not None:
        norms = BATCHNORM_NORMS
    spec = ProfileSpec(
        groups=groups,
        norms=norms,
        impls=base.impls if impl is None else _choose("impl", impl, tuple(IMPLS)),
        dtypes=base.dtypes if dtype is None else tuple(dtype_name(d) for d in parse_dtypes(dtype)),
        passes=base.passes if pass_ is None else _choose("pass", pass_, PASSES),
        modes=base.modes if mode is None else _choose("mode", mode, MODES),
        memory_formats=base.memory_formats if memory_format is None else _choose(
            "memory-format", memory_format, MEMORY_FORMATS),
        device=device,
        timing=timing or base.timing,
        measure_memory=measure_memory,
        threads=threads,
        malloc=malloc,
        cache=cache,
        world=world,
    )
    if cache not in CACHE_MODES:
        raise UserError(f"unknown cache mode {cache!r}: use {', '.join(CACHE_MODES)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if malloc not in MALLOC_MODES:
        raise UserError(f"unknown malloc {malloc!r}: use {', '.join(MALLOC_MODES)}")
    for g in spec.groups:  # every norm must fit every shape it runs on
        for n in spec.group_norms(g):
            for s in g.shapes:
                n.check_shape(s)
    return spec
