"""The device's copy bandwidth: the speed of light that a memory-bound norm layer is held to."""

from __future__ import annotations

import statistics
import time

import torch

DEFAULT_COPY_BYTES = 256 * 2**20  # far beyond any CPU's last-level cache and a GPU's L2


def copy_bandwidth(device: str = "cpu", nbytes: int = DEFAULT_COPY_BYTES, repeats: int = 10) -> float:
    """Median GB/s (1e9 bytes per second) of ``dst.copy_(src)`` over ``nbytes``, counting the read
    and the write (2 * nbytes per copy), as the byte model of every pass does."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    cuda = torch.device(device).type == "cuda"
    dst.copy_(src)  # warm-up: page faults and allocation stay out of the numbers
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9
