"""The stability runner: a grid of cells (norm x dtype x compute x reduction x case), each
measured against the float64 reference, one record per cell.

Usable from a notebook::

    from normbench.numerics import StabilitySpec, run
    records = run(StabilitySpec(norms=("l2", "l1"), dtypes=("fp16",), quick=True))

A cell computes the layer on the case's values rounded to the dtype, forward and backward with a
fixed upstream gradient (N(0, 1) from the case's seed, rounded to the dtype), in one compute model:

- ``framework``: normbench's layer as shipped (``impl="normbench"``), or torch's own layer of the
  family for L2 norms (``impl="torch"``), run in the dtype (statistics in float32 inside);
- ``native``: the formula in emulated arithmetic of the dtype, reductions in ``reduction`` order.

fp8 is a storage format: input, upstream gradient, output and input gradient are fp8 values, the
arithmetic runs in ``fp8_compute`` (default fp16, the narrowest IEEE format that holds every fp8
value of both variants). Records carry that as ``compute_dtype``.

A cell that cannot run (a shape too small for top-k, a shape the family does not take, a dtype
the device lacks) is recorded with ``status: "skipped"`` and its reason; an unexpected failure with
``status: "error"``; the run goes on.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from normbench.axes import NormSpec, format_shape, parse_norm
from normbench.errors import UserError
from normbench.numerics import layers
from normbench.numerics.cases import CASE_NAMES, Case, default_cases
from normbench.numerics.emulator import REDUCTIONS, Emulator
from normbench.numerics.formats import FP8, FORMATS, Format
from normbench.numerics.metrics import compare, input_cast

DTYPE_CHOICES = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32")
COMPUTES = ("framework", "native")
FP8_COMPUTE_CHOICES = ("fp16", "bf16", "fp32")
# ``layer``: the qualified name of a model's layer (--model), null for every other case; files
# written before it lack the field, which ``record_key`` reads as null: they keep their keys
KEY_FIELDS = ("norm", "impl", "dtype", "compute", "compute_dtype", "reduction", "eps", "case", "layer")
LAYER_CASE = "layer"  # the name of the cases that are a model's layers (normbench.models)
# the headroom search: powers of 2 of the captured input, from 2^-HEADROOM_MAX_EXP to 2^HEADROOM_MAX_EXP
HEADROOM_MAX_EXP = 128
HEADROOM_SEARCH = (f"input scaled by powers of 2 (upstream gradient kept), 2^-{HEADROOM_MAX_EXP} .. "
                   f"2^{HEADROOM_MAX_EXP}: doubling exponents, then bisection")
IMPLS = ("normbench", "torch")


@dataclass(frozen=True)
class StabilitySpec:
    """What to measure. ``cases``: generator names (None: all of them; an empty tuple: none, for
    runs on ``input_path`` alone); ``shape``: the generated cases' shape (None: 32x4x128, quick
    16x4x64). ``safe_ulps``: the error (output and input gradient, in units
    of the dtype's epsilon, capped at a relative error of ``max_safe_rel_err``) within which a
    cell counts as safe; ``max_input_underflow``: the largest fraction of the input that may
    underflow (zero or subnormal after the cast) in a safe cell. ``threads``: torch's CPU threads
    during the run (cells are many small tensors: one thread is fastest and leaves the other cores
    free; None keeps torch's setting)."""

    norms: tuple[str, ...] = ("l2", "l1", "linf")
    dtypes: tuple[str, ...] = DTYPE_CHOICES
    computes: tuple[str, ...] = COMPUTES
    reductions: tuple[str, ...] = ("pairwise",)
    impls: tuple[str, ...] = ("normbench",)
    shape: tuple[int, ...] | None = None
    eps: float = 1e-5
    cases: tuple[str, ...] | None = None
    input_path: str | None = None
    layers: tuple[Case, ...] = ()
    quick: bool = False
    device: str = "cpu"
    fp8_compute: str = "fp16"
    seed: int = 0
    safe_ulps: float = 8.0
    max_safe_rel_err: float = 0.25
    max_input_underflow: float = 0.1
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in self.norms:
            parse_norm(name)
        if not self.norms or not self.dtypes or not self.computes or not self.reductions:
            raise UserError("stability needs at least one norm, dtype, compute model and reduction")
        for d in self.dtypes:
            if d not in DTYPE_CHOICES:
                raise UserError(f"dtype {d!r}: stability measures {', '.join(DTYPE_CHOICES)}")
        for c in self.computes:
            if c not in COMPUTES:
                raise UserError(f"compute {c!r}: use framework or native")
        for r in self.reductions:
            if r not in REDUCTIONS:
                raise UserError(f"reduction {r!r}: use {', '.join(REDUCTIONS)}")
        if not self.impls or any(i not in IMPLS for i in self.impls):
            raise UserError(f"impl {','.join(self.impls)!r}: use normbench and/or torch")
        if self.cases is not None:
            for c in self.cases:
                if c not in CASE_NAMES:
                    raise UserError(f"unknown case {c!r}: use {', '.join(CASE_NAMES)}")
        if self.shape is not None and (not 2 <= len(self.shape) <= 5 or min(self.shape) < 1):
            raise UserError(f"shape {list(self.shape)}: the cases take (N, C, ...) shapes of 2 to 5 dimensions")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise UserError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.fp8_compute not in FP8_COMPUTE_CHOICES:
            raise UserError(f"fp8 compute dtype {self.fp8_compute!r}: use {', '.join(FP8_COMPUTE_CHOICES)}")
        if self.safe_ulps <= 0:
            raise UserError("safe_ulps must be > 0")

    def compute_format(self, dtype: str) -> Format:
        """The format arithmetic runs in for a tested dtype (fp8: ``fp8_compute``)."""
        return FORMATS[self.fp8_compute if dtype in FP8 else dtype]

    def tolerance(self, dtype: str) -> float:
        """The largest relative error a safe cell may have in ``dtype``."""
        return min(self.safe_ulps * FORMATS[dtype].eps, self.max_safe_rel_err)

    def all_cases(self) -> list[Case]:
        """Generated cases, the user's tensors, then a model's layers (``layers``)."""
        cases = [] if self.cases == () else default_cases(self.cases, self.quick, self.seed, self.shape)
        if self.input_path is not None:
            from normbench.numerics.inputs import load_inputs

            cases += load_inputs(self.input_path)
        cases += list(self.layers)
        if not cases:
            raise UserError("no cases to run: give --case, --input or --model")
        return cases


@dataclass(frozen=True)
class Cell:
    """One measurement: its axes."""

    norm: NormSpec
    dtype: str
    compute: str
    reduction: str | None
    case: Case
    compute_dtype: str
    impl: str = "emulated"

    def eps(self, spec: StabilitySpec) -> float:
        """The layer's eps: a model layer's own, else the run's."""
        return spec.eps if self.case.eps is None else self.case.eps

    def axes(self, spec: StabilitySpec) -> dict[str, Any]:
        """The record's axis fields (what identifies the cell in a results file), and for a
        model's layer its fields (``layer``, ``layer_kind`` ...)."""
        return {
            "norm": self.norm.name,
            "impl": self.impl,
            "dtype": self.dtype,
            "compute": self.compute,
            "compute_dtype": self.compute_dtype,
            "reduction": self.reduction,
            "eps": self.eps(spec),
            "case": self.case.describe(),
            "shape": format_shape(self.case.shape),
            "layer": None,  # a model's layer (--model) names itself in its case's fields
            **dict(self.case.fields),
        }


def cells(spec: StabilitySpec, cases: list[Case] | None = None) -> list[Cell]:
    """Every cell of the grid, grouped by (case, dtype, norm) so that one reference serves all
    compute models of a group."""
    out: list[Cell] = []
    for case in spec.all_cases() if cases is None else cases:
        for dtype in spec.dtypes:
            cdt = spec.compute_format(dtype).name
            for norm in case_norms(spec.norms, case):
                for compute in spec.computes:
                    if compute == "native":
                        for reduction in spec.reductions:
                            out.append(Cell(norm, dtype, compute, reduction, case, cdt, "emulated"))
                        continue
                    for impl in spec.impls:
                        if impl == "torch" and (norm.p != 2 or norm.k is not None):
                            continue  # torch has L2 layers only
                        out.append(Cell(norm, dtype, compute, None, case, cdt, impl))
    return out


def case_norms(names: tuple[str, ...], case: Case) -> list[NormSpec]:
    """The norms a case is measured with: as named, or for a model's layer (``case.family`` set)
    each named dispersion in the layer's own family (``l1`` on a LayerNorm is ``l1-layernorm``),
    without repeats."""
    specs = [parse_norm(n) for n in names]
    if case.family is not None:
        specs = [NormSpec(case.family, s.p, s.k) for s in specs]
    return list(dict.fromkeys(specs))


def _skip_reason(exc: BaseException) -> str | None:
    """The reason a cell cannot run, or None when the exception is a failure (an error)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, (ValueError, NotImplementedError)):
        return text
    if isinstance(exc, RuntimeError) and ("not implemented" in text.lower() or "not supported" in text.lower()):
        return text
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    return None


class _Group:
    """Inputs and reference shared by the cells of one (case, dtype, norm)."""

    def __init__(self, case: Case, dtype: str, norm: NormSpec, spec: StabilitySpec, eps: float,
                 scale: float = 1.0) -> None:
        self.storage = FORMATS[dtype]
        exact = case.generate() * scale
        if case.grad is not None:
            dy_exact = case.grad.detach().to("cpu", torch.float64)
        else:
            gen = torch.Generator().manual_seed(case.seed + 1)
            dy_exact = torch.randn(exact.shape, generator=gen, dtype=torch.float64)
        x, self.input_info = input_cast(exact, self.storage)
        self.x = x.to(spec.device)
        self.dy = self.storage.round(dy_exact).to(spec.device)
        norm.check_shape(tuple(x.shape))
        self.n = norm.reduced_numel(tuple(x.shape))
        if norm.k is not None and norm.k > self.n:
            raise ValueError(f"top-{norm.k} needs at least {norm.k} values per statistic, this case has {self.n}")
        self.ref_y, self.ref_dx = layers.reference(self.x, self.dy, norm, eps)


def _measure(cell: Cell, group: _Group, spec: StabilitySpec) -> dict[str, Any]:
    storage = group.storage
    compute_fmt = FORMATS[cell.compute_dtype]
    eps = cell.eps(spec)
    if cell.compute == "framework":
        out = layers.framework(group.x, group.dy, cell.norm, eps, compute_fmt.dtype, storage,
                               torch_layer=cell.impl == "torch")
    else:
        emu = Emulator(compute_fmt, cell.reduction or "pairwise")
        out = layers.native(group.x, group.dy, cell.norm, eps, emu, storage)
    stage = "input" if group.input_info["input_overflow"] else out.overflow_stage
    fwd = compare(out.y, group.ref_y, storage)
    bwd = compare(out.dx, group.ref_dx, storage, prefix="grad_")
    # An inf in the input gradient, or a non-finite one under a finite forward pass: inf - inf
    # and 0 * inf are the only ways to a NaN there, so a value overflowed inside the backward.
    grad_inf = out.grad_overflow or bool(torch.isinf(out.dx).any())
    if stage is None and fwd["nonfinite_fraction"] == 0 and bwd["grad_nonfinite_fraction"] > 0:
        grad_inf = True
    # the eps the arithmetic adds: rounded to the compute dtype (native) or float32 (framework)
    eps_stored = Emulator(compute_fmt if cell.compute == "native" else FORMATS["fp32"]).constant(eps)
    record: dict[str, Any] = {
        "n": group.n,
        "overflow": stage is not None,
        "overflow_stage": stage,
        **group.input_info,
        "eps_in_dtype": eps_stored,
        **fwd,
        "grad_overflow": grad_inf or stage is not None,
        "grad_overflow_stage": "forward" if stage is not None else ("backward" if grad_inf else None),
        **bwd,
    }
    tol = spec.tolerance(cell.dtype)
    record["tolerance"] = tol
    record["safe"] = is_safe(record, tol, spec.max_input_underflow)
    return record


def headroom(cell: Cell, spec: StabilitySpec, safe_now: bool) -> dict[str, Any]:
    """How far the cell's input may grow before the cell stops being safe (:func:`is_safe`: an
    overflow, a non-finite value, an error above the tolerance, input underflow): the input is
    scaled by powers of 2 (exact in every format while nothing overflows or underflows), the
    upstream gradient kept. Safe now: the exponent doubles (2, 4, 8 ... up to
    ``HEADROOM_MAX_EXP``) until a scale fails, then bisection finds the first failing power;
    ``headroom`` is the largest safe factor found, ``headroom_fails_at`` the smallest failing
    one (None: safe up to ``2^HEADROOM_MAX_EXP``, ``headroom_open``). Failing now: the same
    search downwards gives a factor below 1 (how far the input would have to shrink), or 0 when
    no tested scale is safe. Assumes one boundary between safe and failing scales on the side
    searched (bisection finds a boundary, not every one)."""

    def safe(exp: int) -> bool:
        try:
            group = _Group(cell.case, cell.dtype, cell.norm, spec, cell.eps(spec), scale=2.0**exp)
            return bool(_measure(cell, group, spec)["safe"])
        except (ValueError, RuntimeError, OverflowError):
            return False

    good: int | None = 0 if safe_now else None  # a safe exponent
    bad: int | None = None if safe_now else 0  # a failing exponent
    exp = 1 if safe_now else -1
    while abs(exp) <= HEADROOM_MAX_EXP:
        ok = safe(exp)
        if ok:
            good = exp
        else:
            bad = exp
        if ok != safe_now:
            break
        exp *= 2
    if good is not None and bad is not None:
        while abs(bad - good) > 1:
            mid = (good + bad) // 2
            if safe(mid):
                good = mid
            else:
                bad = mid
    return {
        "headroom": 0.0 if good is None else 2.0**good,
        "headroom_exp": good,
        "headroom_fails_at": None if bad is None else 2.0**bad,
        "headroom_open": bad is None,
        "headroom_search": HEADROOM_SEARCH,
    }


def is_safe(record: dict[str, Any], tolerance: float, max_input_underflow: float = 0.1) -> bool:
    """Whether a measured record is within the safe range: nothing overflowed, every output and
    gradient value finite, both errors at most ``tolerance``, and at most ``max_input_underflow``
    of the input flushed to zero or subnormal by the cast (the reference sees the rounded input,
    so an input lost to underflow shows no error: it has to be caught here)."""
    if record.get("status", "ok") != "ok" or record.get("overflow") or record.get("grad_overflow"):
        return False
    if record.get("input_underflow_fraction", 0) > max_input_underflow:
        return False
    for prefix in ("", "grad_"):
        if record.get(f"{prefix}nonfinite_fraction", 0) > 0:
            return False
        err = record.get(f"{prefix}max_rel_err")
        if err is None or err > tolerance:
            return False
    return True


def iter_records(
    spec: StabilitySpec,
    skip: Callable[[dict[str, Any]], bool] | None = None,
    grid: list[Cell] | None = None,
) -> Iterator[dict[str, Any]]:
    """Measure the grid cell by cell, yielding each record as it finishes; cells for which
    ``skip(axes)`` is true (already in a resumed file) are not run and not yielded."""
    grid = cells(spec) if grid is None else grid
    before = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        yield from _iter(spec, skip, grid)
    finally:
        torch.set_num_threads(before)


def _iter(
    spec: StabilitySpec, skip: Callable[[dict[str, Any]], bool] | None, grid: list[Cell]
) -> Iterator[dict[str, Any]]:
    group_key, group, group_error = None, None, None
    for cell in grid:
        axes = cell.axes(spec)
        if skip is not None and skip(axes):
            continue
        key = (id(cell.case), cell.dtype, cell.norm)
        if key != group_key:
            group_key, group, group_error = key, None, None
            try:
                group = _Group(cell.case, cell.dtype, cell.norm, spec, cell.eps(spec))
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                group_error = exc
        record = dict(axes)
        exc: BaseException | None = group_error
        if exc is None:
            try:
                record.update(status="ok", reason=None)
                record.update(_measure(cell, group, spec))
                if cell.case.name == LAYER_CASE:
                    record.update(headroom(cell, spec, record["safe"]))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                exc = e
        if exc is not None:
            reason = _skip_reason(exc)
            record = dict(axes)
            if reason is not None:
                record.update(status="skipped", reason=reason)
            else:
                last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
                where = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}" if last else ""
                record.update(status="error", reason=f"{type(exc).__name__}: {exc}{where}")
        yield record


def run(
    spec: StabilitySpec,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    skip: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Measure every cell of ``spec``; returns the records (and hands each to ``on_record`` as
    soon as it is measured, for streaming to a file or a progress bar)."""
    records = []
    for record in iter_records(spec, skip):
        if on_record is not None:
            on_record(record)
        records.append(record)
    return records
