"""What synchronizing the batch statistics costs: SyncLpBatchNorm per p (and torch's SyncBatchNorm
where it runs: CUDA) forward + backward in training, per rank, under torchrun.

    torchrun --standalone --nproc-per-node 2 benchmarks/sync_cost.py                  # gloo on the CPU
    torchrun --standalone --nproc-per-node 2 benchmarks/sync_cost.py --shape 64x64x28x28 --output cost.json
    torchrun --nproc-per-node 8 benchmarks/sync_cost.py --device cuda                  # NCCL, one GPU per rank

The shape is the GLOBAL batch; each rank takes N / world of it. For each layer: the median time
of a forward + backward, the collectives each call makes (counted by wrapping torch.distributed's
all_gather / all_gather_into_tensor / all_reduce, so torch's layer is measured the same way), the
values each rank contributes, the bytes each rank sends with ring algorithms (all_gather
``(W - 1) s``, all_reduce ``2 (W - 1) / W s`` for a contribution of ``s`` bytes), the median time
spent inside the collectives (waiting for the slowest rank included) and the rest (compute), and
the same layer without synchronization (``LpBatchNorm2d`` on the rank's share) for comparison.
Rank 0 prints the table and writes ``--output`` (JSON). docs/distributed.md shows a run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from normbench.nn import LpBatchNorm2d, SyncLpBatchNorm

NORMS = {"l2": (2.0, None), "l1": (1.0, None), "linf": (math.inf, None), "top10": (math.inf, 10)}


class Meter:
    """Wraps torch.distributed's collectives: how many, how many bytes contributed, how long."""

    OPS = ("all_gather", "all_gather_into_tensor", "all_reduce")

    def __init__(self) -> None:
        self.reset()
        for op in self.OPS:
            setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def reset(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.seconds = 0.0

    def _wrap(self, op: str, original: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            tensor = args[1] if op.startswith("all_gather") else args[0]
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if tensor.is_cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.calls.append((op, tensor.numel() * tensor.element_size()))
            return out
        return timed

    def sent_bytes(self, world: int) -> float:
        """Bytes this rank sends per call set, with ring algorithms."""
        return sum((world - 1) * b if op.startswith("all_gather") else 2 * (world - 1) / world * b
                   for op, b in self.calls)


def _measure(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, meter: Meter, repeats: int,
             warmup: int = 3) -> dict[str, Any]:
    totals, comms = [], []
    for i in range(warmup + repeats):
        x.grad = None
        dist.barrier()
        meter.reset()
        start = time.perf_counter()
        layer(x).backward(gy)
        if x.is_cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        if i >= warmup:
            totals.append(total)
            comms.append(meter.seconds)
    world = dist.get_world_size()
    median, comm = statistics.median(totals), statistics.median(comms)
    return {"median_s": median, "comm_s": comm, "compute_s": median - comm, "collectives": len(meter.calls),
            "ops": [op for op, _ in meter.calls], "contributed_bytes": sum(b for _, b in meter.calls),
            "sent_bytes_ring": meter.sent_bytes(world)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32x64x28x28", help="GLOBAL batch NxCxHxW")
    parser.add_argument("--norm", default="l2,l1,linf,top10")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp64"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    n, c, h, w = (int(s) for s in args.shape.lower().split("x"))
    share = n // world + (rank < n % world)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    device = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(share, c, h, w, generator=g).to(device, dtype).requires_grad_()
    gy = torch.randn(share, c, h, w, generator=g).to(device, dtype)
    meter = Meter()
    rows = []
    layers: list[tuple[str, str, torch.nn.Module]] = []
    for name in args.norm.split(","):
        p, k = NORMS[name]
        layers.append((name, "SyncLpBatchNorm", SyncLpBatchNorm(c, p=p, k=k)))
        layers.append((name, "LpBatchNorm2d (local, no sync)", LpBatchNorm2d(c, p=p, k=k, impl="analytic")))
    if cuda:
        layers.append(("l2", "torch SyncBatchNorm", torch.nn.SyncBatchNorm(c)))
    for name, impl, layer in layers:
        row = {"norm": name, "impl": impl, "world": world, "global_shape": [n, c, h, w], "dtype": args.dtype,
               "device": args.device, **_measure(layer.to(device, dtype).train(), x, gy, meter, args.repeats)}
        rows.append(row)
    if rank == 0:
        print(f"global batch {n}x{c}x{h}x{w} {args.dtype} on {world} ranks ({'nccl' if cuda else 'gloo'}), "
              f"fwd+bwd train, median of {args.repeats}, rank 0")
        print(f"{'norm':6} {'impl':32} {'ms':>8} {'comm ms':>8} {'compute ms':>10} {'colls':>5} {'sent B':>8}")
        for r in rows:
            print(f"{r['norm']:6} {r['impl']:32} {r['median_s'] * 1e3:8.3f} {r['comm_s'] * 1e3:8.3f} "
                  f"{r['compute_s'] * 1e3:10.3f} {r['collectives']:5d} {r['sent_bytes_ring']:8.0f}")
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"schema": "normbench.sync_cost/1", "records": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
