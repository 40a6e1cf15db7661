"""The timing engine: warm up, then time repeated calls and keep every sample.

Modelled on ``torch.utils.benchmark``: a frozen :class:`TimingSpec` says how long and how often to
measure, :func:`measure` returns a :class:`Measurement` that keeps the raw per-call times and
computes the median and the interquartile range on demand. The clock is injected through a timer
object, so unit tests drive the engine with a fake clock and no real timing.

Two timers:

- :class:`CpuTimer`: ``time.perf_counter`` (or any clock) around a block of ``number`` calls; a
  block lasts at least ``TimingSpec.min_block_s`` so that the clock's resolution and the Python
  call overhead stay small against the time measured. Each block gives one sample (its time over
  ``number``).
- :class:`CudaTimer`: CUDA events around one call, after the L2 cache has been flushed by writing
  a buffer twice its size (outside the events), so every sample reads its input from device memory
  as a real network layer would. One call per sample.

The first call is timed by itself with a host clock (compilation, autotuning and allocation land
there); it is returned as ``Measurement.first_call_s`` and never enters the samples.

What the timed call reads is the caller's business, with one helper here: a :class:`Rotation`
calls one of several callables per call, in turn, each reading its own copy of the inputs (and,
with ``hold``, writing its output where no recent call wrote), so that a repeat never finds its
inputs or its output's memory in the CPU's cache from the repeat before (the runner sizes the
copies from the last-level cache). A rotation may also ask for something to run before every
sample, outside the timed region: ``evict`` (read a buffer larger than the cache, where the copies
alone cannot cover it) or ``prime`` (one untimed call, for hot-cache timing).

:func:`measure_interleaved` times several callables in the same rounds, one sample of each per
round, in an order that alternates from round to round (0, 1, ..., then ..., 1, 0), so that a slow
phase of a shared machine, or a drift of its clock, hits all of them alike and the ratios of their
medians stay honest. :func:`measure` is the case of one callable.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

Clock = Callable[[], float]


@dataclass(frozen=True)
class TimingSpec:
    """How to time one cell.

    Warm-up runs ``warmup_calls`` calls (at least one: the first call, timed apart). Then samples
    are taken until at least ``min_repeats`` samples and ``min_time_s`` of measured time are in,
    or ``max_repeats`` samples are in, or ``max_time_s`` of measured time has passed with at least
    ``floor_repeats`` samples (so a slow cell stays affordable and still gets a median and an IQR
    worth the name), or ``max_time_s`` has passed counting the untimed evictions before the samples
    too, with at least ``min_repeats`` samples (a tiny tensor timed cold reads a buffer of twice the
    last-level cache before every sample: 0.1 s each where a VM reports its host's 480 MiB L3, so
    200 samples would cost 20 s of eviction around a few ms of timed calls).
    """

    warmup_calls: int = 2
    min_repeats: int = 10
    max_repeats: int = 200
    min_time_s: float = 0.2
    max_time_s: float = 1.5
    min_block_s: float = 1e-3
    floor_repeats: int = 5

    def __post_init__(self) -> None:
        if self.warmup_calls < 1:
            raise ValueError("warmup_calls must be >= 1 (the first call is never timed)")
        if not 1 <= self.floor_repeats <= self.min_repeats <= self.max_repeats:
            raise ValueError("need 1 <= floor_repeats <= min_repeats <= max_repeats")
        if self.min_time_s < 0 or self.max_time_s < self.min_time_s or self.min_block_s < 0:
            raise ValueError("need 0 <= min_time_s <= max_time_s and min_block_s >= 0")


@dataclass(frozen=True)
class Measurement:
    """The raw samples of one timed call (seconds per call) and what they summarize to."""

    times: tuple[float, ...]
    number: int  # calls per sample
    first_call_s: float  # the first (warm-up) call alone: compilation, allocation

    @property
    def repeats(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        """Interquartile range (75th minus 25th percentile, inclusive method); 0 for one sample."""
        if len(self.times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q3 - q1

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)


class Timer(Protocol):
    """What :func:`measure` needs from a device: a host clock for the first call, and samples."""

    batches: bool  # may a sample hold more than one call?

    def wall(self, fn: Callable[[], object]) -> float:
        """Host seconds of one call, finished on the device."""
        ...

    def sample(self, fn: Callable[[], object], number: int) -> float:
        """Seconds of ``number`` back-to-back calls."""
        ...


class CpuTimer:
    """Times calls on the CPU with ``clock`` (``time.perf_counter`` unless a test injects one)."""

    batches = True

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock

    def wall(self, fn: Callable[[], object]) -> float:
        return self.sample(fn, 1)

    def sample(self, fn: Callable[[], object], number: int) -> float:
        t0 = self.clock()
        for _ in range(number):
            fn()
        return self.clock() - t0


class CudaTimer:
    """Times one call per sample with CUDA events, the L2 cache flushed before each sample
    (``flush=False``: not flushed, for hot-cache timing)."""

    batches = False

    def __init__(self, device: str, flush: bool = True) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.flush = flush
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 64 * 2**20
        self.flush_buffer = torch.empty(2 * l2, dtype=torch.uint8, device=self.device)

    def wall(self, fn: Callable[[], object]) -> float:
        self.torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        self.torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def sample(self, fn: Callable[[], object], number: int) -> float:
        cuda = self.torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        if self.flush:
            self.flush_buffer.zero_()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class Rotation:
    """A timed callable that reads a different copy of its inputs on each call: the ``i``-th call
    runs ``fns[i % len(fns)]``.

    ``hold``: keep each copy's last output (its tensors, detached: not the graph) until that copy
    is called again, so that the output of a call is written to memory last touched ``copies``
    calls before, not to the block the previous call just freed, which would still be in the
    cache (a write to a cached line skips the read from memory a write to a cold one costs).
    ``evict``: called before every sample, outside the timed region, when the copies together are
    too small to push each other out of the cache (:func:`measure` then puts at most one call per
    copy in a sample). ``prime``: one untimed call before every sample (hot-cache timing: the
    sample starts with its inputs in the cache whatever ran before it).
    """

    def __init__(self, fns: Sequence[Callable[[], object]], evict: Callable[[], object] | None = None,
                 prime: bool = False, hold: bool = False) -> None:
        if not fns:
            raise ValueError("a rotation needs at least one callable")
        self.fns = tuple(fns)
        self.evict = evict
        self.prime = prime
        self.hold = hold
        self.held: list[object] = [None] * len(self.fns)
        self.calls = 0

    @property
    def copies(self) -> int:
        return len(self.fns)

    def __call__(self) -> object:
        i = self.calls % len(self.fns)
        self.calls += 1
        out = self.fns[i]()
        if self.hold:
            self.held[i] = _detached(out)  # frees the output this copy made last time
        return out

    def before_sample(self) -> None:
        """What runs before each sample, untimed."""
        if self.evict is not None:
            self.evict()
        if self.prime:
            self()


def _detached(out: object) -> object:
    """The tensors of a call's result without their autograd graph (the storage only)."""
    if isinstance(out, (tuple, list)):
        return tuple(_detached(o) for o in out)
    detach = getattr(out, "detach", None)
    return detach() if callable(detach) else None


class Consensus(Protocol):
    """What the ranks of a process group timing collective calls together must agree on, so
    that every rank makes the same calls (a rank that stopped early would leave the others
    waiting in a collective): the calls per sample and when sampling stops."""

    def numbers(self, numbers: list[int]) -> list[int]:
        """The calls per sample of each callable, the same on every rank."""
        ...

    def stop(self, stop: bool) -> bool:
        """Whether sampling stops after this round, the same on every rank."""
        ...


class CallFailed(Exception):
    """The callable at ``index`` of :func:`measure_interleaved` raised ``error``."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"callable {index} failed: {error}")
        self.index = index
        self.error = error


def measure(fn: Callable[[], object], spec: TimingSpec = TimingSpec(), timer: Timer | None = None,
            consensus: Consensus | None = None) -> Measurement:
    """Warm ``fn`` up, then time it as ``spec`` says; returns every sample.

    The number of calls per sample is chosen once, from the last warm-up call, so that a sample
    lasts at least ``spec.min_block_s`` (on a timer that batches calls).
    """
    try:
        return measure_interleaved([fn], spec, timer, consensus)[0]
    except CallFailed as failed:
        raise failed.error from None


def measure_interleaved(
    fns: Sequence[Callable[[], object]], spec: TimingSpec = TimingSpec(), timer: Timer | None = None,
    consensus: Consensus | None = None,
) -> tuple[Measurement, ...]:
    """Time every callable of ``fns`` in the same rounds; one :class:`Measurement` each.

    Each callable is warmed up (its first call timed apart) and gets its own number of calls per
    sample, chosen from its last warm-up call. Then every round takes one sample of each, in the
    order 0, 1, ..., k-1 in even rounds and k-1, ..., 0 in odd ones (ABBA for two: a drift that is
    linear over a pair of rounds cancels, and neither callable always runs right after the other).
    Rounds stop as :class:`TimingSpec` says, counting rounds as repeats and the time of every
    callable's samples together against k times its time limits (for one callable: exactly the
    rule of a single measurement; for several, the same time budget per callable on average).
    An exception in one callable is raised as :class:`CallFailed` with its index.

    ``consensus`` (ranks timing calls that communicate, under torchrun): the calls per sample and
    the stopping decision are agreed across ranks, so every rank makes the same calls.
    """
    timer = CpuTimer() if timer is None else timer
    fns = list(fns)
    k = len(fns)
    firsts, lasts, numbers = [], [], []
    for i, fn in enumerate(fns):
        try:
            first = timer.wall(fn)
            last = first
            for _ in range(spec.warmup_calls - 1):
                last = timer.wall(fn)
        except Exception as exc:  # noqa: BLE001 - the caller tells which callable failed
            raise CallFailed(i, exc) from exc
        firsts.append(first)
        lasts.append(last)
        number = 1
        if timer.batches and spec.min_block_s > 0:
            number = max(1, math.ceil(spec.min_block_s / max(last, 1e-9)))
        if isinstance(fn, Rotation) and fn.evict is not None:
            number = min(number, fn.copies)  # every call of a sample reads a copy evicted before it
        numbers.append(number)
    if consensus is not None:
        numbers = consensus.numbers(numbers)
    times: list[list[float]] = [[] for _ in fns]
    total = 0.0  # measured seconds, every callable's samples together
    untimed = 0.0  # seconds of the evictions before the samples
    rounds = 0
    while True:
        order = range(k) if rounds % 2 == 0 else range(k - 1, -1, -1)
        for i in order:
            fn = fns[i]
            try:
                if isinstance(fn, Rotation) and fn.evict is not None:
                    untimed += timer.wall(fn.before_sample)
                elif isinstance(fn, Rotation):
                    fn.before_sample()
                dt = timer.sample(fn, numbers[i])
            except Exception as exc:  # noqa: BLE001
                raise CallFailed(i, exc) from exc
            times[i].append(dt / numbers[i])
            total += dt
        rounds += 1
        stop = (rounds >= spec.max_repeats or (rounds >= spec.min_repeats and total >= spec.min_time_s * k)
                or (rounds >= spec.floor_repeats and total >= spec.max_time_s * k)
                or (rounds >= spec.min_repeats and total + untimed >= spec.max_time_s * k))
        if consensus is not None:
            stop = consensus.stop(stop)
        if stop:
            break
    return tuple(Measurement(tuple(t), n, f) for t, n, f in zip(times, numbers, firsts))
