"""What the code needs to know about the CPU it runs on: the size of its last-level cache.

One reader for the whole package, in ``kernels`` because the kernels may import nothing else of
normbench: the fused CPU kernels size their blocks of work from it
(:mod:`normbench.kernels.numba_bn`), and the profile keeps its inputs out of it between repeats
(:mod:`normbench.bench.runner`).

The size comes from Linux's ``/sys/devices/system/cpu/cpu*/cache`` (what the kernel was told of
the cache this machine's CPUs share), then from ``sysconf`` (glibc's CPUID reading, which on a
virtual machine may report the host's whole cache: 384 MiB on a 2-core VM whose cache is 32 MiB),
then 32 MiB where neither says.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

DEFAULT_LLC_BYTES = 32 << 20
_CPU_DIR = Path("/sys/devices/system/cpu")


def _parse_size(text: str) -> int:
    """``32768K`` -> 33554432 (sysfs writes K, sometimes M or G)."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale


def _sysfs_llc(cpus: list[int]) -> tuple[int, int]:
    """(bytes of one last-level cache instance, bytes of the distinct instances that ``cpus``
    use), (0, 0) where sysfs does not say."""
    best_level, instances = 0, {}
    for cpu in cpus:
        cache_dir = _CPU_DIR / f"cpu{cpu}" / "cache"
        try:
            entries = sorted(cache_dir.glob("index*"))
        except OSError:
            continue
        for entry in entries:
            try:
                if (entry / "type").read_text().strip() == "Instruction":
                    continue
                level = int((entry / "level").read_text())
                size = _parse_size((entry / "size").read_text())
                shared = (entry / "shared_cpu_list").read_text().strip()
            except (OSError, ValueError):
                continue
            if level > best_level:
                best_level, instances = level, {}
            if level == best_level:
                instances[shared] = size
    if not instances:
        return 0, 0
    return max(instances.values()), sum(instances.values())


@functools.cache
def _llc() -> tuple[int, int]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    one, total = _sysfs_llc(cpus)
    if one > 0:
        return one, total
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        size = 0
    size = size if size > 0 else DEFAULT_LLC_BYTES
    return size, size


def last_level_cache() -> int:
    """Bytes of one last-level cache (the cache a group of cores shares; L3 on this machine)."""
    return _llc()[0]


def last_level_cache_total() -> int:
    """Bytes of every distinct last-level cache that this process's CPUs use together (one
    instance on a single-die CPU; a CPU of several dies has one per die): what data must exceed
    to be out of every cache."""
    return _llc()[1]
