"""Steady CPU memory allocation for timing.

torch allocates CPU tensors with the C library's ``malloc``. glibc's ``malloc`` serves a block
above its mmap threshold (128 KB at first, raised as blocks are freed, up to 32 MB) with a fresh
``mmap``. It also gives the freed top of its heap back to the kernel once that top is larger than
twice the threshold. Whether a layer's tens-of-MB output then lands on pages already mapped, or
page-faults every 4 KB of itself on every call, depends on the history of earlier allocations.
On a 2-core machine this was measured on one shape, fp32 32x64x56x56 fwd+bwd:

- normbench's fused L1 batch-norm took 7 ms or 20 ms, depending on that history
  (12,500 page faults per call);
- torch's BatchNorm2d took 11 ms or 17 ms.

A long-running training process reaches a steady state (and jemalloc or tcmalloc, which PyTorch's
CPU tuning guide recommends, keep freed memory mapped). :func:`steady_cpu_malloc` puts glibc in
that state for the whole process. ``mmap`` is off, so every block comes from the heap, and trimming
is off, so freed memory stays mapped. Both torch's layers and normbench's are then timed without
page faults. It changes the process for good; ``normbench profile --malloc system`` leaves it alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
MODES = ("steady", "system")

_state: str | None = None


def steady_cpu_malloc() -> str:
    """Keep freed memory mapped and serve every block from the heap (glibc only); return what the
    allocator does now, for the results' environment. Idempotent."""
    global _state
    if _state is not None:
        return _state
    libc = _glibc()
    if libc is None:
        _state = "system (not glibc: left as it is)"
    elif libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1:
        _state = "steady (glibc: no mmap, no trim)"
    else:
        _state = "system (glibc refused mallopt)"
    return _state


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free_bytes() -> int:
    """Bytes that glibc's heap holds free for this process (``mallinfo2().fordblks``; 0 when not
    glibc or too old). In the steady state this memory is never given back to the kernel, so a
    check of free memory must count it with what the kernel reports as available."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    mallinfo2 = libc.mallinfo2
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc
