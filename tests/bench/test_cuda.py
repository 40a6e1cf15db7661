"""The CUDA paths of the profile (events with an L2 flush, allocator peak memory). Skipped here
without a GPU; they run where one is present."""

from __future__ import annotations

import pytest
import torch

from normbench.bench import make_spec, run
from normbench.bench.memory import peak_memory
from normbench.bench.timing import CudaTimer, TimingSpec, measure

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_timer_times_a_kernel_and_flushes_l2():
    timer = CudaTimer("cuda")
    assert timer.flush_buffer.numel() >= 2 * 2**20
    x = torch.randn(1 << 22, device="cuda")
    m = measure(lambda: x * 2, TimingSpec(warmup_calls=1, min_repeats=5, min_time_s=0), timer)
    assert m.number == 1 and m.repeats >= 5 and 0 < m.median < 0.1


def test_cuda_peak_memory_counts_the_temporaries():
    def two_mib():
        a = torch.ones(1 << 18, device="cuda")  # 1 MiB
        return (a * 2).sum()

    peak, why = peak_memory(two_mib, "cuda")
    assert why is None and peak >= 2 * 2**20


def test_cuda_run_gives_ok_records():
    spec = make_spec(norm="l2,l1", impl="torch,analytic", dtype="fp32,bf16", shape="8x16x8x8", pass_="fwd+bwd",
                     device="cuda", timing=TimingSpec(warmup_calls=1, min_repeats=5, min_time_s=0))
    records = run(spec)
    assert records and all(r["status"] == "ok" and r["device"] == "cuda" for r in records)
    assert all(r["peak_memory_bytes"] > 0 and r["peak_gbps"] > 0 for r in records)
