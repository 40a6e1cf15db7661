import resource
import statistics

import pytest
import torch

from normbench.bench import allocator
from normbench.bench.runner import prepare_allocator
from normbench.bench.spec import make_spec


def _faults_per_call(fn, calls: int = 9) -> int:
    """The median count of page faults of one call (the heap grows to the working set's size in
    the first calls)."""
    counts = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts)


@pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (mallopt)")
def test_steady_malloc_takes_page_faults_out_of_fresh_large_tensors():
    # 48 MB: above glibc's largest dynamic mmap threshold, so without the steady state every
    # fresh tensor is a new mmap whose every page faults when written
    x = torch.ones(12 * 2**20)
    assert allocator.steady_cpu_malloc().startswith("steady")
    assert _faults_per_call(lambda: torch.empty_like(x).copy_(x)) < 100  # 12,288 pages per tensor


def test_steady_malloc_is_idempotent_and_cpu_only():
    first = allocator.steady_cpu_malloc()
    assert allocator.steady_cpu_malloc() == first
    assert prepare_allocator(make_spec(device="cpu"), "cpu") == first
    assert prepare_allocator(make_spec(device="cpu", malloc="system"), "cpu") == "system"
    assert prepare_allocator(make_spec(device="cpu"), "cuda") is None


@pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (mallinfo2)")
def test_memory_the_heap_keeps_counts_as_free():
    from normbench.bench.runner import free_memory

    allocator.steady_cpu_malloc()
    x = torch.ones(16 * 2**20)  # 64 MB from the heap (no mmap in the steady state)
    before = allocator.heap_free_bytes()
    del x
    assert allocator.heap_free_bytes() - before >= 60 * 2**20
    assert free_memory("cpu") >= allocator.heap_free_bytes()
