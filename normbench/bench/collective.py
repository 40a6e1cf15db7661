"""Timing layers that communicate: ``normbench profile`` under torchrun.

Every rank times the same cells, each on its share of the global batch, and every call of a
synchronized layer is a collective in which the ranks wait for each other. So the ranks must make
exactly the same calls, in the same order:

- :class:`RankConsensus` agrees, for the timing engine, on the calls per sample (the smallest
  any rank chose) and on when sampling stops (rank 0's rule), and for the runner on every decision
  that could differ between ranks (free memory: the smallest; a cell that fails to build on one
  rank is skipped on all, with that rank's reason);
- :class:`BarrierTimer` starts every sample on every rank together (a barrier outside the timed
  region), so a sample times the collective calls from a common start, the wait for the slowest
  rank included;
- :class:`CollectiveMeter` counts the collectives a call makes and the bytes it contributes, and
  times them, by wrapping torch.distributed's functions while it is active (so torch's own
  SyncBatchNorm is counted exactly as normbench's layer is). :func:`instrumented` runs a few
  calls under it, apart from the timed samples: the time inside the collectives against the rest.

Bytes sent assume ring algorithms: an all_gather of ``s`` bytes per rank sends ``(W - 1) s`` from
each rank, an all_reduce of ``s`` bytes ``2 (W - 1) / W s``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from normbench.bench.timing import Timer

# torch.distributed's collectives that normbench's and torch's synchronized batch-norms call;
# the contributed tensor is the first argument of a reduce, the second of a gather.
METERED = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce")


class RankConsensus:
    """The agreements of :mod:`normbench.bench.collective`'s docstring, over the default group."""

    def __init__(self, device: str) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.device(device).type == "cuda" \
            else torch.device("cpu")

    def _reduce(self, values: list[int], op: dist.ReduceOp) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=op)
        return [int(v) for v in t.tolist()]

    def numbers(self, numbers: list[int]) -> list[int]:
        return self._reduce(numbers, dist.ReduceOp.MIN)

    def stop(self, stop: bool) -> bool:
        t = torch.tensor([int(stop)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def smallest(self, value: int | None) -> int | None:
        """The smallest ``value`` over the ranks (None when any rank has None)."""
        got = self._reduce([-1 if value is None else value], dist.ReduceOp.MIN)[0]
        return None if got < 0 else got

    def first_failure(self, failure: tuple[str, str] | None) -> tuple[str, str] | None:
        """The (status, reason) of the first rank whose step failed, None when none did; the
        reason names the rank."""
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, failure)
        for r, f in enumerate(every):
            if f is not None:
                return f[0], f[1] if r == 0 else f"rank {r}: {f[1]}"
        return None

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, value)
        return every


class BarrierTimer:
    """A :class:`~normbench.bench.timing.Timer` whose samples (and first calls) start after a
    barrier of every rank, outside the timed region."""

    def __init__(self, inner: Timer) -> None:
        self.inner = inner
        self.batches = inner.batches

    def wall(self, fn: Callable[[], object]) -> float:
        dist.barrier()
        return self.inner.wall(fn)

    def sample(self, fn: Callable[[], object], number: int) -> float:
        dist.barrier()
        return self.inner.sample(fn, number)


class CollectiveMeter:
    """While active (``with meter:``), every call of :data:`METERED` is counted with the bytes
    this rank contributes and timed, finished on the device; the functions are restored after."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.seconds = 0.0
        self._saved: dict[str, Callable] = {}

    def reset(self) -> None:
        self.calls, self.seconds = [], 0.0

    def __enter__(self) -> "CollectiveMeter":
        for op in METERED:
            if hasattr(dist, op):
                self._saved[op] = getattr(dist, op)
                setattr(dist, op, self._wrap(op, self._saved[op]))
        return self

    def __exit__(self, *exc: object) -> None:
        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved = {}

    def _wrap(self, op: str, original: Callable) -> Callable:
        def metered(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if op == "all_reduce" else args[1]
            if isinstance(tensor, (list, tuple)):
                tensor = tensor[0]
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if tensor.is_cuda:
                torch.cuda.synchronize(tensor.device)
            self.seconds += time.perf_counter() - start
            self.calls.append((op, tensor.numel() * tensor.element_size()))
            return out
        return metered


def sent_bytes(calls: list[tuple[str, int]], world: int) -> float:
    """Bytes one rank sends for ``calls`` (op, contributed bytes) with ring algorithms."""
    return sum((world - 1) * b if op != "all_reduce" else 2 * (world - 1) / world * b for op, b in calls)


def instrumented(fn: Callable[[], object], calls: int, cuda: bool) -> dict[str, Any]:
    """``calls`` calls of ``fn`` under a :class:`CollectiveMeter`, each after a barrier: the
    collectives one call makes, what this rank contributes and sends, and the median time per call
    inside the collectives (``comm_s``, the wait for the other ranks included) and outside them
    (``compute_s``). These calls are apart from the timed samples: the meter finishes every
    collective on the device before the next step, which an un-metered call does not."""
    totals, comms = [], []
    meter = CollectiveMeter()
    with meter:
        for _ in range(calls):
            meter.reset()
            dist.barrier()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            totals.append(time.perf_counter() - start)
            comms.append(meter.seconds)
    world = dist.get_world_size()
    comm = statistics.median(comms)
    return {
        "collectives": len(meter.calls),
        "collective_ops": [op for op, _ in meter.calls],
        "contributed_bytes": sum(b for _, b in meter.calls),
        "sent_bytes": sent_bytes(meter.calls, world),
        "comm_s": comm,
        "compute_s": max(0.0, statistics.median(totals) - comm),
    }
