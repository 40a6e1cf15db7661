"""The profile runner: every cell of a :class:`~normbench.bench.spec.ProfileSpec`, one record each.

``run(spec)`` is the whole of ``normbench profile`` without the rendering, usable from a notebook::

    from normbench.bench import make_spec, run
    records = run(make_spec(norm="l2,l1", dtype="fp32,bf16", shape="32x64x56x56"))

Per cell: build the implementation's layer, move it to the device and dtype, make the input
(seeded, in the memory format), time the pass with the timing engine, measure the bytes kept for
backward and the pass's peak memory, and compute the bandwidth figures against the copy bandwidth
measured once at the start of the run. ``speedup_vs_torch`` is torch's time over this cell's time
for torch's layer of the same family, dtype, shape, pass, mode and memory format; that torch cell is
measured once and reused (and measured even when ``torch`` is not among the implementations).

A cell that cannot run is a ``skipped`` record with the reason (the implementation does not have
the norm, top-k larger than the values per statistic, a rank the memory format does not apply to,
a dtype the device or the layer does not run, not enough memory); a cell that fails otherwise is
an ``error`` record with the exception's first line. The run goes on in both cases.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from normbench.axes import resolve_device
from normbench.bench.bytes import pass_bytes
from normbench.bench.impls import get as get_impl
from normbench.bench.memory import peak_memory, saved_tensor_bytes
from normbench.bench.spec import KEY_FIELDS, Cell, ProfileSpec  # noqa: F401 (KEY_FIELDS re-exported)
from normbench.bench.timing import CpuTimer, CudaTimer, Measurement, Timer, TimingSpec, measure
from normbench.results import record_key

Record = dict[str, Any]
RECORD_FIELDS = (
    "norm", "impl", "dtype", "shape", "group", "pass", "mode", "memory_format", "device",
    "status", "reason", "time_median_s", "time_iqr_s", "repeats", "bytes", "gbps", "peak_gbps",
    "sol_fraction", "peak_memory_bytes", "saved_bytes", "speedup_vs_torch", "compile_time_s",
    "threads",
)
# Memory a cell may need, in tensors of the input's size computed in fp32 (eager top-k fwd+bwd
# keeps about eight); a cell that would need more than the device has free is skipped, so a large
# preset cannot push the machine into its out-of-memory killer.
MEMORY_FACTOR = 10


class CellSkipped(Exception):
    """A cell that cannot run here; the message is the record's reason."""


def empty_record(cell: Cell, status: str, reason: str | None) -> Record:
    """A record of ``cell`` with every measured field None."""
    record: Record = {f: None for f in RECORD_FIELDS}
    record.update(cell.axes())
    record.update(status=status, reason=reason, threads=torch.get_num_threads())
    return record


def check_cell(cell: Cell) -> None:
    """Raise :class:`CellSkipped` when ``cell`` cannot run, before anything is allocated."""
    why = get_impl(cell.impl).unsupported(cell.norm)
    if why:
        raise CellSkipped(why)
    n = cell.norm.reduced_numel(cell.shape)
    if cell.norm.k is not None and cell.norm.k > n:
        raise CellSkipped(f"top-{cell.norm.k} needs at least {cell.norm.k} values per statistic, this shape has {n}")
    if cell.norm.family == "batchnorm" and cell.mode == "train" and n < 2:
        raise CellSkipped("batch-norm in training needs more than one value per channel")
    if cell.memory_format == "channels_last" and len(cell.shape) not in (4, 5):
        raise CellSkipped("channels_last applies to 4-D and 5-D inputs only")
    need = MEMORY_FACTOR * math.prod(cell.shape) * 4
    free = free_memory(cell.device)
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


def make_input(cell: Cell) -> torch.Tensor:
    """The cell's input: standard normal values (seeded), in the dtype and memory format."""
    gen = torch.Generator(device=cell.device).manual_seed(0)
    base_dtype = cell.dtype if cell.dtype == torch.float64 else torch.float32
    x = torch.randn(cell.shape, generator=gen, dtype=base_dtype, device=cell.device).to(cell.dtype)
    if cell.memory_format == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def build_pass(cell: Cell) -> tuple[Callable[[], object], Callable[[], object]]:
    """(the timed call of the cell's pass, a forward in the same autograd state as the pass's).

    ``fwd`` in train mode records the graph as training does; ``fwd`` in eval mode runs under
    ``torch.no_grad()`` as inference does. ``fwd+bwd`` calls the layer and
    ``torch.autograd.grad`` for the input and the parameters with a fixed upstream gradient;
    ``bwd`` builds the graph once and times ``torch.autograd.grad(..., retain_graph=True)`` on it.
    """
    module = get_impl(cell.impl).build(cell.norm, cell.shape).to(device=cell.device, dtype=cell.dtype)
    module.train(cell.mode == "train")
    x = make_input(cell)
    if cell.pass_ == "fwd" and cell.mode == "eval":
        def infer() -> torch.Tensor:
            with torch.no_grad():
                return module(x)
        return infer, infer
    x.requires_grad_(True)
    if cell.pass_ == "fwd":
        return (lambda: module(x)), (lambda: module(x))
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
    y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator(device=cell.device).manual_seed(1),
                     dtype=torch.float32, device=cell.device).to(y.dtype)
    forward = lambda: module(x)  # noqa: E731
    if cell.pass_ == "fwd+bwd":
        return (lambda: torch.autograd.grad(module(x), inputs, dy)), forward
    return (lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)), forward


def profile_cell(
    cell: Cell,
    timing: TimingSpec,
    timer: Timer,
    peak_gbps: float | None,
    torch_time: float | None = None,
    measure_memory: bool = True,
) -> Record:
    """Measure one cell; a ``skipped`` or ``error`` record instead of an exception."""
    try:
        check_cell(cell)
        fn, forward = build_pass(cell)
        m: Measurement = measure(fn, timing, timer)
        saved = saved_tensor_bytes(forward)
        peak, why = peak_memory(fn, cell.device) if measure_memory else (None, "not measured (--no-memory)")
    except CellSkipped as exc:
        return empty_record(cell, "skipped", str(exc))
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the run
        return empty_record(cell, *classify_error(exc))
    nbytes = pass_bytes(cell.norm, cell.shape, cell.dtype, cell.pass_, cell.mode)
    median = m.median
    gbps = nbytes / median / 1e9 if median > 0 else None
    record = empty_record(cell, "ok", None if peak is not None else f"peak_memory_bytes {why}")
    record.update(
        time_median_s=median,
        time_iqr_s=m.iqr,
        repeats=m.repeats,
        bytes=nbytes,
        gbps=gbps,
        peak_gbps=peak_gbps,
        sol_fraction=gbps / peak_gbps if gbps is not None and peak_gbps else None,
        peak_memory_bytes=peak,
        saved_bytes=saved,
        speedup_vs_torch=(torch_time / median) if torch_time and median > 0 else None,
        compile_time_s=m.first_call_s if get_impl(cell.impl).compiles else None,
    )
    if cell.impl == "torch":
        record["speedup_vs_torch"] = 1.0
    return record


def default_timer(device: str) -> Timer:
    """CUDA events with an L2 flush on a CUDA device, ``time.perf_counter`` on the CPU."""
    return CudaTimer(device) if torch.device(device).type == "cuda" else CpuTimer()


def run(
    spec: ProfileSpec,
    on_record: Callable[[Record], None] | None = None,
    *,
    skip: Callable[[Record], bool] | None = None,
    previous: Iterable[Record] = (),
    on_progress: Callable[[int, int, str], None] | None = None,
    timer: Timer | None = None,
    peak_gbps: float | None = None,
) -> list[Record]:
    """Run every cell of ``spec``; returns the records of the cells it ran, in order.

    ``on_record`` receives each record as soon as its cell finishes (stream it to a file there).
    ``skip(axes)`` says which cells are done already (``ResultsWriter.has``); ``previous`` records
    (those of a resumed file) supply torch's times for the speedups. ``on_progress(done, total,
    label)`` is called before each cell and at the end. ``timer`` and ``peak_gbps`` replace the
    device's timer and the copy-bandwidth measurement (tests inject a fake clock through them).
    ``spec.threads`` sets torch's CPU threads for the run (restored afterwards); every record
    carries the thread count it ran with. On the CPU, ``spec.malloc == "steady"`` first puts the
    process's allocator in a steady state (:func:`prepare_allocator`).
    """
    device = resolve_device(spec.device)
    prepare_allocator(spec, device)
    threads_before = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        return _run_cells(spec, device, on_record, skip, previous, on_progress, timer, peak_gbps)
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


def _run_cells(
    spec: ProfileSpec,
    device: str,
    on_record: Callable[[Record], None] | None,
    skip: Callable[[Record], bool] | None,
    previous: Iterable[Record],
    on_progress: Callable[[int, int, str], None] | None,
    timer: Timer | None,
    peak_gbps: float | None,
) -> list[Record]:
    cells = spec.cells(device)
    timer = timer or default_timer(device)
    if peak_gbps is None:
        from normbench.bench.bandwidth import copy_bandwidth

        peak_gbps = copy_bandwidth(device)
    torch_times: dict[tuple[str, ...], float | None] = {}
    for r in previous:
        if r.get("impl") == "torch" and r.get("status") == "ok":
            torch_times[record_key(r, KEY_FIELDS)] = r.get("time_median_s")
    records: list[Record] = []
    for i, cell in enumerate(cells):
        if on_progress:
            on_progress(i, len(cells), _label(cell))
        if skip is not None and skip(cell.axes()):
            continue
        ref_key = record_key(cell.torch_cell().axes(), KEY_FIELDS)
        try:
            check_cell(cell)  # a cell that cannot run needs no torch reference either
        except CellSkipped as exc:
            record = empty_record(cell, "skipped", str(exc))
        else:
            record = _measure_with_reference(cell, spec, timer, peak_gbps, torch_times, ref_key)
        records.append(record)
        if on_record:
            on_record(record)
    if on_progress:
        on_progress(len(cells), len(cells), "done")
    return records


def _measure_with_reference(
    cell: Cell,
    spec: ProfileSpec,
    timer: Timer,
    peak_gbps: float | None,
    torch_times: dict[tuple[str, ...], float | None],
    ref_key: tuple[str, ...],
) -> Record:
    """Measure ``cell``, first measuring torch's layer for its speedup unless that time is known
    (``torch_times`` caches it under ``ref_key``)."""
    if cell.impl != "torch" and ref_key not in torch_times:
        ref = profile_cell(cell.torch_cell(), spec.timing, timer, peak_gbps, None, False)
        torch_times[ref_key] = ref["time_median_s"]
    record = profile_cell(cell, spec.timing, timer, peak_gbps, torch_times.get(ref_key), spec.measure_memory)
    if cell.impl == "torch":
        torch_times[ref_key] = record["time_median_s"]
    return record


def _label(cell: Cell) -> str:
    a = cell.axes()
    return f"{a['norm']} {a['impl']} {a['dtype']} {a['shape']} {a['pass']} {a['mode']}"

