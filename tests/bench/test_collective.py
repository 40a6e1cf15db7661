"""The pieces of ``profile`` under torchrun that run in one process: the collective meter and the
ring byte counts (the whole command across ranks: tests/cli/test_profile_torchrun.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from normbench.bench.collective import METERED, CollectiveMeter, sent_bytes


def test_ring_bytes_by_hand():
    # all_gather of 100 bytes from each of 4 ranks: each sends its 100 bytes to 3 others along the ring;
    # all_reduce of 100 bytes: reduce-scatter then all-gather, 2 * 3/4 * 100 = 150
    assert sent_bytes([("all_gather", 100)], 4) == 300
    assert sent_bytes([("all_reduce", 100)], 4) == 150
    assert sent_bytes([("all_gather_into_tensor", 8), ("all_reduce", 8)], 2) == 8 + 8
    assert sent_bytes([], 3) == 0


def test_the_meter_counts_contributions_and_restores_torch_distributed(monkeypatch):
    seen = []
    for op in METERED:  # stand-ins for the real collectives (no process group here)
        monkeypatch.setattr(dist, op, lambda *a, _op=op, **k: seen.append(_op), raising=False)
    originals = {op: getattr(dist, op) for op in METERED}
    x = torch.zeros(5, dtype=torch.float64)
    with CollectiveMeter() as meter:
        dist.all_reduce(x)
        dist.all_gather([torch.empty(3), torch.empty(3)], torch.ones(3))
        dist.all_gather_into_tensor(torch.empty(4, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
    assert seen == ["all_reduce", "all_gather", "all_gather_into_tensor"]
    assert meter.calls == [("all_reduce", 40), ("all_gather", 12), ("all_gather_into_tensor", 4)]
    assert meter.seconds >= 0
    assert {op: getattr(dist, op) for op in METERED} == originals
