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
  a buffer twice its size, so every sample reads its input from device memory as a real network
  layer would. One call per sample.

The first call is timed by itself with a host clock (compilation, autotuning and allocation land
there); it is returned as ``Measurement.first_call_s`` and never enters the samples.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

Clock = Callable[[], float]


@dataclass(frozen=True)
class TimingSpec:
    """How to time one cell.

    Warm-up runs ``warmup_calls`` calls (at least one: the first call, timed apart). Then samples
    are taken until at least ``min_repeats`` samples and ``min_time_s`` of measured time are in,
    or ``max_repeats`` samples are in, or ``max_time_s`` of measured time has passed with at least
    ``floor_repeats`` samples (so a slow cell stays affordable and still gets a median and an IQR
    worth the name).
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
    """Times one call per sample with CUDA events, the L2 cache flushed before each sample."""

    batches = False

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
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
        self.flush_buffer.zero_()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def measure(fn: Callable[[], object], spec: TimingSpec = TimingSpec(), timer: Timer | None = None) -> Measurement:
    """Warm ``fn`` up, then time it as ``spec`` says; returns every sample.

    The number of calls per sample is chosen once, from the last warm-up call, so that a sample
    lasts at least ``spec.min_block_s`` (on a timer that batches calls).
    """
    timer = CpuTimer() if timer is None else timer
    first = timer.wall(fn)
    last = first
    for _ in range(spec.warmup_calls - 1):
        last = timer.wall(fn)
    number = 1
    if timer.batches and spec.min_block_s > 0:
        number = max(1, math.ceil(spec.min_block_s / max(last, 1e-9)))
    times: list[float] = []
    total = 0.0
    while True:
        dt = timer.sample(fn, number)
        times.append(dt / number)
        total += dt
        n = len(times)
        if n >= spec.max_repeats:
            break
        if n >= spec.min_repeats and total >= spec.min_time_s:
            break
        if n >= spec.floor_repeats and total >= spec.max_time_s:
            break
    return Measurement(tuple(times), number, first)
