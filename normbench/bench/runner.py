"""The profile runner: every cell of a :class:`~normbench.bench.spec.ProfileSpec`, one record each.

``run(spec)`` is the whole of ``normbench profile`` without the rendering, usable from a notebook::

    from normbench.bench import make_spec, run
    records = run(make_spec(norm="l2,l1", dtype="fp32,bf16", shape="32x64x56x56"))

Per cell: build the implementation's layer, move it to the device and dtype, make the input
(seeded, in the memory format) and, for cold-cache timing on the CPU (the default), copies of
everything the pass reads (:func:`build_timed_pass`), time the pass with the timing engine,
measure the bytes kept for backward and the pass's peak memory, and compute the bandwidth figures
against the copy bandwidth measured once at the start of the run.

``speedup_vs_torch`` is torch's time over this cell's time for torch's layer of the same family,
dtype, shape, pass, mode and memory format, both timed in the same rounds
(:func:`~normbench.bench.timing.measure_interleaved`: one sample of each per round, the order
alternating), so a slow phase of the machine hits both. Torch's layer is built once per block of
cells that share it and timed again beside every candidate (and even when ``torch`` is not among
the implementations); torch's own record takes its times from the rounds it shared with the first
candidate of its block (``interleaved_with`` names it), so it is not timed a second time for itself.

A cell that cannot run is a ``skipped`` record with the reason (the implementation does not have
the norm, top-k larger than the values per statistic, a rank the memory format does not apply to,
a dtype the device or the layer does not run, not enough memory); a cell that fails otherwise is
an ``error`` record with the exception's first line. The run goes on in both cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from normbench.axes import format_shape, resolve_device
from normbench.bench.bytes import pass_bytes
from normbench.bench.impls import get as get_impl
from normbench.bench.memory import peak_memory, saved_tensor_bytes
from normbench.bench.spec import KEY_FIELDS, Cell, ProfileSpec  # noqa: F401 (KEY_FIELDS re-exported)
from normbench.bench.timing import (
    CallFailed,
    CpuTimer,
    CudaTimer,
    Measurement,
    Rotation,
    Timer,
    TimingSpec,
    measure_interleaved,
)
from normbench.results import record_key

if TYPE_CHECKING:
    from normbench.bench.collective import RankConsensus

Record = dict[str, Any]
RECORD_FIELDS = (
    "norm", "impl", "dtype", "shape", "group", "pass", "mode", "memory_format", "device",
    "status", "reason", "time_median_s", "time_iqr_s", "repeats", "bytes", "gbps", "peak_gbps",
    "sol_fraction", "peak_memory_bytes", "saved_bytes", "speedup_vs_torch", "compile_time_s",
    "threads", "cache", "input_copies", "times_s", "torch_times_s", "interleaved_with",
    "world_size", "rank_shape", "collectives", "collective_ops", "contributed_bytes", "sent_bytes", "comm_s",
    "compute_s", "rank_medians_s",
)
# Memory a cell may need, in tensors of the input's size computed in fp32 (eager top-k fwd+bwd
# keeps about eight); a cell that would need more than the device has free is skipped, so a large
# preset cannot push the machine into its out-of-memory killer.
MEMORY_FACTOR = 10
# Cold-cache timing on the CPU: the rotated copies of a pass's inputs hold at least COPY_FACTOR
# times the last-level cache, so that between two uses of one copy more than the whole cache of
# other data has been read; at most MAX_COPIES copies (below that size an eviction buffer of
# COPY_FACTOR times the cache is read before every sample instead).
COPY_FACTOR = 2
MAX_COPIES = 256
# Under torchrun: the calls (apart from the timed samples) in which the collectives are counted and timed.
INSTRUMENTED_CALLS = 10


class CellSkipped(Exception):
    """A cell that cannot run here; the message is the record's reason."""


def empty_record(cell: Cell, status: str, reason: str | None) -> Record:
    """A record of ``cell`` with every measured field None."""
    record: Record = {f: None for f in RECORD_FIELDS}
    record.update(cell.axes())
    record.update(status=status, reason=reason, threads=torch.get_num_threads(), world_size=cell.world,
                  rank_shape=format_shape(cell.rank_shape) if cell.world > 1 else None)
    return record


def check_cell(cell: Cell, consensus: RankConsensus | None = None) -> None:
    """Raise :class:`CellSkipped` when ``cell`` cannot run, before anything is allocated
    (``consensus``: under torchrun, on every rank alike: the free memory is the smallest rank's)."""
    impl = get_impl(cell.impl)
    why = impl.unsupported(cell.norm)
    if why:
        raise CellSkipped(why)
    if impl.devices is not None and torch.device(cell.device).type not in impl.devices:
        raise CellSkipped(f"{cell.impl} runs on {', '.join(impl.devices)} only")
    n = cell.norm.reduced_numel(cell.shape)
    if cell.norm.k is not None and cell.norm.k > n:
        raise CellSkipped(f"top-{cell.norm.k} needs at least {cell.norm.k} values per statistic, this shape has {n}")
    if cell.norm.family == "batchnorm" and cell.mode == "train" and n < 2:
        raise CellSkipped("batch-norm in training needs more than one value per channel")
    if cell.norm.family == "groupnorm" and cell.impl == "torch" and cell.shape[0] * n < 2:
        # torch checks batch x values per group, in eval mode too ("Expected more than 1 value per channel")
        raise CellSkipped("torch's GroupNorm needs more than one value per group over the batch")
    if cell.memory_format == "channels_last" and len(cell.shape) not in (4, 5):
        raise CellSkipped("channels_last applies to 4-D and 5-D inputs only")
    need = MEMORY_FACTOR * math.prod(cell.rank_shape) * 4
    free = free_memory(cell.device)
    if consensus is not None:
        free = consensus.smallest(free)
    if free is not None and need > free:
        raise CellSkipped(f"out of memory: would need about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")


def free_memory(device: str) -> int | None:
    """Bytes free for new tensors on ``device`` (CPU: MemAvailable of /proc/meminfo plus what the
    C allocator holds free for this process), None if unknown."""
    if torch.device(device).type == "cuda":  # the driver's free memory plus torch's cached blocks
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    from normbench.bench.allocator import heap_free_bytes

                    return int(line.split()[1]) * 1024 + heap_free_bytes()
    except OSError:
        pass
    return None


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(status, reason) of an exception raised by a cell: out of memory and unsupported dtypes or
    operations are ``skipped``; anything else is an ``error``."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    low = text.lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in low or "can't allocate memory" in low:
        return "skipped", f"out of memory: {text}"
    if isinstance(exc, NotImplementedError) or any(
        s in low for s in ("not implemented for", "unsupported", "not supported", "only supports")
    ):
        return "skipped", f"not supported: {text}"
    return "error", f"{type(exc).__name__}: {text}"


def _seed(cell: Cell, base: int) -> int:
    """The seed of one of the cell's random tensors: under torchrun each rank's share of the
    batch holds values of its own (identical shares would tie every extreme across ranks)."""
    if cell.world == 1:
        return base
    from normbench.distributed import rank

    return base + 2 * rank()


def make_input(cell: Cell) -> torch.Tensor:
    """The cell's input (this rank's share under torchrun): standard normal values (seeded), in
    the dtype and memory format."""
    gen = torch.Generator(device=cell.device).manual_seed(_seed(cell, 0))
    base_dtype = cell.dtype if cell.dtype == torch.float64 else torch.float32
    x = torch.randn(cell.rank_shape, generator=gen, dtype=base_dtype, device=cell.device).to(cell.dtype)
    if cell.memory_format == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _pass_calls(cell: Cell, module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor | None) -> tuple[
        Callable[[], object], Callable[[], object]]:
    """(the timed call of the cell's pass on input ``x`` and upstream gradient ``dy``, a forward
    in the same autograd state)."""
    if cell.pass_ == "fwd" and cell.mode == "eval":
        def infer() -> torch.Tensor:
            with torch.no_grad():
                return module(x)
        return infer, infer
    forward = lambda: module(x)  # noqa: E731
    if cell.pass_ == "fwd":
        return forward, forward
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
    if cell.pass_ == "fwd+bwd":
        return (lambda: torch.autograd.grad(module(x), inputs, dy)), forward
    y = module(x)  # bwd: the graph is built once per copy and timed with retain_graph
    return (lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)), forward


def _module_and_inputs(cell: Cell) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """The cell's layer (on the device, in the dtype and mode), its input and, for passes with a
    backward, a fixed upstream gradient (seeded standard normal values)."""
    module = get_impl(cell.impl).build(cell.norm, cell.rank_shape).to(device=cell.device, dtype=cell.dtype)
    module.train(cell.mode == "train")
    x = make_input(cell)
    if cell.pass_ == "fwd" and cell.mode == "eval":
        return module, x, None
    x.requires_grad_(True)
    if cell.pass_ == "fwd":
        return module, x, None
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator(device=cell.device).manual_seed(_seed(cell, 1)),
                     dtype=torch.float32, device=cell.device).to(y.dtype)
    return module, x, dy


def build_pass(cell: Cell) -> tuple[Callable[[], object], Callable[[], object]]:
    """(the timed call of the cell's pass, a forward in the same autograd state as the pass's),
    on one copy of the inputs.

    ``fwd`` in train mode records the graph as training does; ``fwd`` in eval mode runs under
    ``torch.no_grad()`` as inference does. ``fwd+bwd`` calls the layer and
    ``torch.autograd.grad`` for the input and the parameters with a fixed upstream gradient;
    ``bwd`` builds the graph once and times ``torch.autograd.grad(..., retain_graph=True)`` on it.
    """
    module, x, dy = _module_and_inputs(cell)
    return _pass_calls(cell, module, x, dy)


@dataclass
class TimedPass:
    """What the runner times for a cell: ``fn`` (a :class:`Rotation` over ``copies`` copies of
    the pass's inputs), one copy's call (``single``, for the peak memory) and its forward (for the
    bytes saved for backward); ``copy_bytes`` are the bytes of one copy of what the pass reads
    (the input, and the upstream gradient for passes with a backward)."""

    fn: Rotation
    single: Callable[[], object]
    forward: Callable[[], object]
    copy_bytes: int

    @property
    def copies(self) -> int:
        return self.fn.copies


class Evictor:
    """Reads a buffer of ``nbytes`` (outside the timed region), so the data read before it is
    out of a cache smaller than that; reading leaves nothing dirty for the timed call to write
    back."""

    def __init__(self, nbytes: int, device: str = "cpu") -> None:
        self.buffer = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.sum()


def rotation_copies(copy_bytes: int, llc_bytes: int, spare_bytes: int | None = None,
                    copy_memory: int | None = None) -> tuple[int, bool]:
    """(copies of the inputs to rotate through, whether an eviction before each sample is needed
    as well) for cold-cache timing.

    Enough copies to hold :data:`COPY_FACTOR` times the last-level cache ``llc_bytes``, at least
    2, at most :data:`MAX_COPIES`, and no more than ``spare_bytes`` of memory hold at
    ``copy_memory`` bytes each beyond the first. When the copies fall short of the target (a small
    tensor past the cap, or memory), the eviction covers what they do not.
    """
    target = COPY_FACTOR * llc_bytes
    want = max(2, math.ceil(target / max(copy_bytes, 1)))
    copies = min(want, MAX_COPIES)
    if spare_bytes is not None:
        copies = max(1, min(copies, 1 + spare_bytes // max(copy_memory or copy_bytes, 1)))
    return copies, copies < 2 or copies * copy_bytes < target


@dataclass
class RunContext:
    """What every cell of a run shares: where and how it is timed."""

    device: str
    timing: TimingSpec
    timer: Timer
    peak_gbps: float | None
    cache: str = "cold"
    llc_bytes: int = 32 << 20  # the last-level cache(s) to keep inputs out of (CPU, cold)
    measure_memory: bool = True
    consensus: RankConsensus | None = None  # under torchrun: what every rank must agree on
    _evictor: Evictor | None = field(default=None, repr=False)

    @property
    def rotates(self) -> bool:
        """Copies and eviction: cold-cache timing on the CPU (CUDA flushes its L2 in the timer)."""
        return self.cache == "cold" and torch.device(self.device).type == "cpu"

    def evictor(self) -> Evictor:
        if self._evictor is None:
            self._evictor = Evictor(COPY_FACTOR * self.llc_bytes, self.device)
        return self._evictor


def build_timed_pass(cell: Cell, ctx: RunContext) -> TimedPass:
    """The cell's pass, ready to time as ``ctx`` says.

    Warm cache (or CUDA): one copy; warm, every sample is preceded by an untimed call, so it starts
    with its inputs in the cache whatever ran before. Cold cache on the CPU: the input (and for a
    backward the upstream gradient, and the graph built on them) copied :func:`rotation_copies`
    times, one copy per call in turn, each copy holding its last output until its next call (so
    outputs, too, land in memory that is not in the cache), plus an eviction before each sample
    where the copies cannot cover the cache. Copies hold the same values in separate storage; the
    layer is shared.
    """
    module, x, dy = _module_and_inputs(cell)
    fn, forward = _pass_calls(cell, module, x, dy)
    copy_bytes = x.nbytes + (dy.nbytes if dy is not None else 0)
    if not ctx.rotates:
        return TimedPass(Rotation([fn], prime=ctx.cache == "warm"), fn, forward, copy_bytes)
    free = free_memory(cell.device)
    reserve = MEMORY_FACTOR * math.prod(cell.rank_shape) * 4  # what the pass itself may need (check_cell)
    graph = 5 * math.prod(cell.rank_shape) * 4 if cell.pass_ == "bwd" else 0  # a bwd copy keeps its graph
    held = x.nbytes + sum(p.nbytes for p in module.parameters())  # the output a copy holds (y, or dx and grads)
    copies, evict = rotation_copies(copy_bytes, ctx.llc_bytes, None if free is None else max(0, free - reserve),
                                    copy_bytes + held + graph)
    fns = [fn]
    for _ in range(copies - 1):
        xc = x.detach().clone().requires_grad_(x.requires_grad)
        fns.append(_pass_calls(cell, module, xc, None if dy is None else dy.clone())[0])
    return TimedPass(Rotation(fns, evict=ctx.evictor() if evict else None, hold=True), fn, forward, copy_bytes)


def _time(passes: list[TimedPass], ctx: RunContext) -> list[Measurement | Exception]:
    """Time ``passes`` in the same rounds; a pass that fails gets its exception and the others
    are timed again without it."""
    out: list[Measurement | Exception | None] = [None] * len(passes)
    alive = list(range(len(passes)))
    while alive:
        try:
            measured = measure_interleaved([passes[i].fn for i in alive], ctx.timing, ctx.timer, ctx.consensus)
        except CallFailed as failed:
            out[alive.pop(failed.index)] = failed.error
            continue
        for i, m in zip(alive, measured):
            out[i] = m
        break
    return out  # type: ignore[return-value]


def _label(cell: Cell, full: bool = False) -> str:
    a = cell.axes()
    if not full:
        return f"{a['norm']} {a['impl']}"
    return f"{a['norm']} {a['impl']} {a['dtype']} {a['shape']} {a['pass']} {a['mode']}"


def _finish(cell: Cell, tp: TimedPass, m: Measurement | Exception, ctx: RunContext,
            ref: Measurement | None = None, interleaved_with: str | None = None) -> Record:
    """The record of a timed cell: bandwidth figures, memory, and the speedup from the torch
    times ``ref`` of the same rounds."""
    if isinstance(m, Exception):
        return empty_record(cell, *classify_error(m))
    ranks: dict[str, Any] = {}
    if ctx.consensus is not None:  # every rank alike, before anything that may fail on one rank only
        from normbench.bench.collective import instrumented

        calls = max(3, min(INSTRUMENTED_CALLS, ctx.timing.min_repeats))
        ranks = instrumented(tp.single, calls, torch.device(cell.device).type == "cuda")
        ranks["rank_medians_s"] = ctx.consensus.gather(m.median)
    try:
        saved = saved_tensor_bytes(tp.forward)
        peak, why = peak_memory(tp.single, cell.device) if ctx.measure_memory else (None, "not measured (--no-memory)")
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the run
        return empty_record(cell, *classify_error(exc))
    nbytes = pass_bytes(cell.norm, cell.rank_shape, cell.dtype, cell.pass_, cell.mode)
    median = m.median
    gbps = nbytes / median / 1e9 if median > 0 else None
    is_torch = cell.is_reference
    record = empty_record(cell, "ok", None if peak is not None else f"peak_memory_bytes {why}")
    record.update(
        time_median_s=median,
        time_iqr_s=m.iqr,
        repeats=m.repeats,
        bytes=nbytes,
        gbps=gbps,
        peak_gbps=ctx.peak_gbps,
        sol_fraction=gbps / ctx.peak_gbps if gbps is not None and ctx.peak_gbps else None,
        peak_memory_bytes=peak,
        saved_bytes=saved,
        speedup_vs_torch=1.0 if is_torch else (ref.median / median if ref is not None and median > 0 else None),
        compile_time_s=m.first_call_s if get_impl(cell.impl).compiles else None,
        cache=ctx.cache,
        input_copies=tp.copies,
        times_s=list(m.times),
        torch_times_s=None if is_torch or ref is None else list(ref.times),
        interleaved_with=interleaved_with,
        **ranks,
    )
    return record


def profile_cell(
    cell: Cell,
    timing: TimingSpec,
    timer: Timer,
    peak_gbps: float | None,
    torch_time: float | None = None,
    measure_memory: bool = True,
    cache: str = "cold",
    llc_bytes: int | None = None,
) -> Record:
    """Measure one cell alone; a ``skipped`` or ``error`` record instead of an exception.

    The runner does not use this: it times each cell in the same rounds as torch's layer. Here
    ``speedup_vs_torch`` is ``torch_time`` (timed at some other time) over this cell's median.
    """
    ctx = RunContext(cell.device, timing, timer, peak_gbps, cache, llc_bytes or _llc_bytes(), measure_memory)
    try:
        check_cell(cell)
        tp = build_timed_pass(cell, ctx)
        m: Measurement | Exception = _time([tp], ctx)[0]
    except CellSkipped as exc:
        return empty_record(cell, "skipped", str(exc))
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the run
        return empty_record(cell, *classify_error(exc))
    record = _finish(cell, tp, m, ctx)
    if record["status"] == "ok" and not cell.is_reference:
        record["speedup_vs_torch"] = torch_time / record["time_median_s"] if torch_time and record["time_median_s"] else None
    return record


def _llc_bytes() -> int:
    from normbench.kernels.machine import last_level_cache_total

    return last_level_cache_total()


def default_timer(device: str, cache: str = "cold") -> Timer:
    """CUDA events with an L2 flush (none for ``cache="warm"``) on a CUDA device,
    ``time.perf_counter`` on the CPU."""
    return CudaTimer(device, flush=cache != "warm") if torch.device(device).type == "cuda" else CpuTimer()


def run(
    spec: ProfileSpec,
    on_record: Callable[[Record], None] | None = None,
    *,
    skip: Callable[[Record], bool] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    timer: Timer | None = None,
    peak_gbps: float | None = None,
    llc_bytes: int | None = None,
) -> list[Record]:
    """Run every cell of ``spec``; returns the records of the cells it ran, in order.

    ``on_record`` receives each record as soon as its cell finishes (stream it to a file there).
    ``skip(axes)`` says which cells are done already (``ResultsWriter.has``); a resumed cell's
    speedup comes from torch's layer timed in the same rounds as the cell, never from an earlier run.
    ``on_progress(done, total, label)`` is called before each cell and at the end. ``timer``,
    ``peak_gbps`` and ``llc_bytes`` replace the device's timer, the copy-bandwidth measurement and
    the last-level cache size read from the machine (tests inject a fake clock and cache through
    them). ``spec.threads`` sets torch's CPU threads for the run (restored afterwards); every
    record carries the thread count it ran with. On the CPU, ``spec.malloc == "steady"`` first
    puts the process's allocator in a steady state (:func:`prepare_allocator`).
    """
    device = resolve_device(spec.device)
    prepare_allocator(spec, device)
    threads_before = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        return _run_cells(spec, device, on_record, skip, on_progress, timer, peak_gbps, llc_bytes)
    finally:
        torch.set_num_threads(threads_before)


def prepare_allocator(spec: ProfileSpec, device: str) -> str | None:
    """For a CPU run with ``spec.malloc == "steady"``, keep freed memory mapped so that no timed
    call pays page faults that depend on earlier allocations (see :mod:`normbench.bench.allocator`);
    return the allocator's state for the results' environment (None on CUDA)."""
    if torch.device(device).type != "cpu":
        return None
    if spec.malloc == "steady":
        from normbench.bench.allocator import steady_cpu_malloc

        return steady_cpu_malloc()
    return "system"


@dataclass
class _Reference:
    """Torch's layer for one block of cells: built once, timed beside each candidate."""

    cell: Cell
    tp: TimedPass | None = None
    failure: tuple[str, str] | None = None  # (status, reason) when it cannot be timed

    def record(self, cell: Cell) -> Record:
        assert self.failure is not None
        return empty_record(cell, *self.failure)


def _build(cell: Cell, ctx: RunContext) -> TimedPass | tuple[str, str]:
    """The cell's timed pass, or (status, reason) when it cannot be built (under torchrun: when
    it cannot be built on some rank, the first such rank's reason on every rank)."""
    built: TimedPass | tuple[str, str]
    try:
        check_cell(cell, ctx.consensus)
        built = build_timed_pass(cell, ctx)
    except CellSkipped as exc:
        built = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the run
        built = classify_error(exc)
    if ctx.consensus is not None:
        failure = ctx.consensus.first_failure(None if isinstance(built, TimedPass) else built)
        if failure is not None:
            return failure
    return built


def _run_cells(
    spec: ProfileSpec,
    device: str,
    on_record: Callable[[Record], None] | None,
    skip: Callable[[Record], bool] | None,
    on_progress: Callable[[int, int, str], None] | None,
    timer: Timer | None,
    peak_gbps: float | None,
    llc_bytes: int | None,
) -> list[Record]:
    cells = spec.cells(device)
    timer = timer or default_timer(device, spec.cache)
    consensus = None
    if spec.world > 1:
        from normbench.bench.collective import BarrierTimer, RankConsensus

        consensus, timer = RankConsensus(device), BarrierTimer(timer)
    if peak_gbps is None:
        from normbench.bench.bandwidth import copy_bandwidth

        peak_gbps = copy_bandwidth(device)
    ctx = RunContext(device, spec.timing, timer, peak_gbps, spec.cache, llc_bytes or _llc_bytes(),
                     spec.measure_memory, consensus)
    refs: dict[tuple[str, ...], _Reference] = {}
    ready: dict[Cell, Record] = {}  # candidates already timed beside their torch cell
    records: list[Record] = []
    now: list = [0, ""]  # the cell in progress, for the compile notice

    def compiling(event: str, key, seconds: float | None) -> None:
        """Say in the progress line that kernels compile (the first call of a cell, which the
        timing engine keeps out of the samples and records as ``compile_time_s``)."""
        if on_progress and event == "start":
            what = " ".join(str(part).replace("torch.", "") for part in key) if isinstance(key, tuple) else str(key)
            on_progress(now[0], len(cells), f"{now[1]}: compiling {what} kernels (first use; cached on disk after)")

    from normbench.kernels import background

    background.add_listener(compiling)
    try:
        _cells_loop(cells, ctx, refs, ready, skip, on_record, on_progress, records, now)
    finally:
        background.remove_listener(compiling)
    if on_progress:
        on_progress(len(cells), len(cells), "done")
    return records


def _cells_loop(cells, ctx, refs, ready, skip, on_record, on_progress, records, now) -> None:
    """Measure every cell in order (torch's cell of a block once, beside its candidates)."""
    block = None
    for i, cell in enumerate(cells):
        now[0], now[1] = i, _label(cell, full=True)
        if on_progress:
            on_progress(i, len(cells), _label(cell, full=True))
        if _block(cell) != block:  # torch's layers of the previous block are no longer needed
            refs.clear()
            block = _block(cell)
        if skip is not None and skip(cell.axes()):
            continue
        record = ready.pop(cell, None)
        if record is None:
            record = _measure_cell(cells, i, ctx, refs, ready, skip)
        records.append(record)
        if on_record:
            on_record(record)


def _block(cell: Cell) -> tuple:
    """Cells that can share torch's layers: same group, shape, dtype, pass, mode, format."""
    return cell.group, cell.shape, cell.dtype, cell.pass_, cell.mode, cell.memory_format


def _reference(cell: Cell, ctx: RunContext, refs: dict[tuple[str, ...], _Reference]) -> _Reference:
    """Torch's layer for ``cell`` (a torch cell or a candidate), built on first use."""
    tcell = cell if cell.is_reference else cell.torch_cell()
    key = record_key(tcell.axes(), KEY_FIELDS)
    if key not in refs:
        built = _build(tcell, ctx)
        refs[key] = _Reference(tcell, tp=built) if isinstance(built, TimedPass) else _Reference(tcell, failure=built)
    return refs[key]


def _partner(cells: list[Cell], i: int, skip: Callable[[Record], bool] | None,
             consensus: RankConsensus | None = None) -> Cell | None:
    """The first later candidate of torch cell ``cells[i]``'s block that will run."""
    key = record_key(cells[i].axes(), KEY_FIELDS)
    for cell in cells[i + 1:]:
        if _block(cell) != _block(cells[i]):
            break
        if cell.is_reference or record_key(cell.torch_cell().axes(), KEY_FIELDS) != key:
            continue
        if skip is not None and skip(cell.axes()):
            continue
        try:
            check_cell(cell, consensus)
        except CellSkipped:
            continue
        return cell
    return None


def _measure_cell(cells: list[Cell], i: int, ctx: RunContext, refs: dict[tuple[str, ...], _Reference],
                  ready: dict[Cell, Record], skip: Callable[[Record], bool] | None) -> Record:
    """The record of ``cells[i]``. A torch cell is timed in the rounds of its block's first
    candidate, whose record waits in ``ready``; a candidate beside torch's layer of its block."""
    cell = cells[i]
    try:
        check_cell(cell, ctx.consensus)  # a cell that cannot run needs no torch reference either
    except CellSkipped as exc:
        return empty_record(cell, "skipped", str(exc))
    ref = _reference(cell, ctx, refs)
    if cell.is_reference:
        if ref.tp is None:
            return ref.record(cell)
        tp = ref.tp
        partner = _partner(cells, i, skip, ctx.consensus)
        built = _build(partner, ctx) if partner is not None else None
        if partner is not None and isinstance(built, TimedPass):
            m_torch, m_partner = _time([tp, built], ctx)
            torch_ok, partner_ok = isinstance(m_torch, Measurement), isinstance(m_partner, Measurement)
            if not torch_ok:
                ref.tp, ref.failure = None, classify_error(m_torch)
            ready[partner] = _finish(partner, built, m_partner, ctx, m_torch if torch_ok else None,
                                     _label(ref.cell) if torch_ok else None)
            return _finish(cell, tp, m_torch, ctx, interleaved_with=_label(partner) if partner_ok else None)
        if partner is not None:  # the partner cannot be built: its record says why
            ready[partner] = empty_record(partner, *built)
        m_torch = _time([tp], ctx)[0]
        if isinstance(m_torch, Exception):
            ref.tp, ref.failure = None, classify_error(m_torch)
        return _finish(cell, tp, m_torch, ctx)
    built = _build(cell, ctx)
    if not isinstance(built, TimedPass):
        return empty_record(cell, *built)
    if ref.tp is None:
        return _finish(cell, built, _time([built], ctx)[0], ctx)
    m_torch, m = _time([ref.tp, built], ctx)
    if isinstance(m_torch, Exception):
        ref.tp, ref.failure = None, classify_error(m_torch)
        return _finish(cell, built, m, ctx)
    return _finish(cell, built, m, ctx, m_torch, _label(ref.cell))
