"""Joining and using the process group that ``torchrun`` describes: what the commands that run
under torchrun (``profile``, ``plot equivalence``, ``plot halfprec``) share.

Started by ``torchrun`` with more than one process (``WORLD_SIZE`` > 1 in the environment),
:func:`init_from_env` joins the process group: gloo on the CPU, NCCL on CUDA with each rank on
the GPU of its ``LOCAL_RANK``, every collective bounded by ``NORMBENCH_DIST_TIMEOUT_S`` (a crashed
or stuck rank ends the run after that instead of hanging it). Outside torchrun every function
here answers as for a group of one: rank 0 of 1.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a rank waits in a collective for the others (a crashed rank ends the run after this).
TIMEOUT_ENV = "NORMBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600

_alone = [False]  # inside alone(): this process works as a group of one


def launched() -> int:
    """The number of processes torchrun started this command in (1 outside torchrun), read from
    the environment before any group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world() -> int:
    """The number of ranks working together (1 outside torchrun, and inside :func:`alone`)."""
    if _alone[0]:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this process counts as a group of one (``world() == 1``, ``rank() == 0``): for
    work a rank does by itself and whole, such as one training run of a grid whose runs are spread
    over the ranks, which must then compute (and be cached as) exactly what one process computes."""
    before, _alone[0] = _alone[0], True
    try:
        yield
    finally:
        _alone[0] = before


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    """Whether this process records, writes and draws (rank 0)."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend (``gloo``, ``nccl``), None outside torchrun."""
    return str(dist.get_backend()) if world() > 1 else None


def init_from_env(device: str) -> int:
    """Join the process group torchrun describes in the environment, once; returns the world
    size (1, and nothing initialized, when not started by torchrun with more than one process).
    ``device`` is the resolved device: ``cuda`` runs on NCCL, each rank on the GPU of its
    ``LOCAL_RANK``; ``cpu`` on gloo."""
    if launched() <= 1:
        return 1
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return world()


def finish() -> None:
    """Wait for every rank, then leave the process group (each rank calls it once its work is
    done): a process that exits with the group still open can abort in its teardown."""
    if world() > 1:
        dist.barrier()
        dist.destroy_process_group()


def shard_bounds(batch: int, ranks: int | None = None, index: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``batch`` rows that rank ``index`` of ``ranks`` takes:
    contiguous and as equal as can be (the first ``batch % ranks`` ranks take one more; a rank
    may take none)."""
    ranks = world() if ranks is None else ranks
    index = rank() if index is None else index
    base, extra = divmod(batch, ranks)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


def from_main(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` computed on rank 0 and sent to every rank (a cache read whose answer all
    ranks must share, even without a shared file system)."""
    if world() == 1:
        return fn(*args)
    box = [fn(*args) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if world() == 1:
        return [value]
    out: list[Any] | None = [None] * world() if is_main() else None
    dist.gather_object(value, out, dst=0)
    return out
