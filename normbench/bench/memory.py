"""Memory a layer keeps for backward (``saved_bytes``) and the peak memory of one pass
(``peak_memory_bytes``), both measured.

``saved_bytes``: a forward pass runs under ``torch.autograd.graph.saved_tensors_hooks``; every
tensor autograd saves is seen by the pack hook, and the bytes of the distinct storages behind them
are summed (a storage saved by two nodes counts once; a view keeps its whole storage alive, so the
storage's size counts). The input and the parameters count when they are saved: the graph keeps
them alive whether or not anything else does.

``peak_memory_bytes``: the most bytes allocated at once during one call of the pass, beyond what was
allocated before the call (so the input, dy, the parameters and, for ``bwd``, the graph built
beforehand are not counted; the output and every temporary are).

- CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated() - memory_allocated()``
  around the call.
- CPU: torch keeps no allocator statistics for the CPU, so the call runs once under
  ``torch.profiler`` with ``profile_memory=True``; the profiler records every allocation and free
  of torch's CPU allocator with its size and time, and the running sum over them, in time order,
  peaks at the value reported. This reads the profiler's raw event list (``kineto_results``); if a
  torch version lacks it, the peak is None and the reason says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

import torch


def saved_tensor_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``forward()`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def peak_memory(fn: Callable[[], object], device: str) -> tuple[int | None, str | None]:
    """(peak bytes allocated during one ``fn()`` beyond those allocated before it, reason if None)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()  # its output is freed on return: the peak counts it all the same
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, None
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> tuple[int | None, str | None]:
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # the output is allocated and freed inside the profiled region
    try:
        events = prof.profiler.kineto_results.events()
        allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError as exc:
        return None, f"the torch profiler of torch {torch.__version__} gives no allocation events ({exc})"
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return peak, None


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment: the profiler's C++ side prints a
    start and a stop line to it on every run, which would break the progress bar and the table."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
