"""The fused Lp batch-norm's targets, measured in one run by normbench's profile engine.

    python benchmarks/fused_bn.py [--device cpu|cuda] [--threads N] [--memory-format contiguous,channels_last]

On the CPU it also times torch and every fused norm round-robin, which on a machine with a large
last-level cache gives a more modest (and more realistic) ratio than timing one layer at a time.

Runs torch's BatchNorm and normbench's ``fused`` batch-norm (L2, L1, L-inf, top-10) in training,
fwd+bwd (CPU) or fwd and bwd (CUDA), on ResNet shapes, and prints each ratio beside its target:

- CPU: fused L1, L-inf and top-k at least 1.5x torch in fp32 and 1.0x in bf16; fused L2 at least 1.0x.
- CUDA: forward at >= 85% and backward at >= 70% of the copy bandwidth (over the fewest bytes),
  and faster than torch (cuDNN) in both memory formats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from normbench.axes import resolve_device
from normbench.bench import runner
from normbench.bench.spec import make_spec

SHAPES = "32x64x56x56,64x256x14x14"
NORMS = {"l2": (2.0, None), "l1": (1.0, None), "linf": (math.inf, None), "top10": (math.inf, 10)}


def interleaved(shape: tuple[int, ...], dtype: torch.dtype, rounds: int = 25) -> dict[str, float]:
    """Median fwd+bwd seconds of torch's BatchNorm2d and each fused norm, timed round-robin
    (one call of each per round), so that every implementation sees the same machine state and
    none runs on caches its own previous call left warm. CPU only."""
    from normbench.nn import LpBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).requires_grad_()
    gy = torch.randn(shape).to(dtype)
    layers = {"torch": torch.nn.BatchNorm2d(shape[1]).to(dtype)}
    layers.update({n: LpBatchNorm2d(shape[1], p=p, k=k, impl="fused").to(dtype) for n, (p, k) in NORMS.items()})
    times: dict[str, list[float]] = {name: [] for name in layers}
    inputs = {name: [x, *layer.parameters()] for name, layer in layers.items()}
    for r in range(rounds + 2):  # two warm-up rounds: compilation and allocation
        for name, layer in layers.items():
            t0 = time.perf_counter()
            torch.autograd.grad(layer(x), inputs[name], gy)  # as normbench profile times fwd+bwd
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_target(record: dict) -> tuple[str, bool] | None:
    if record["impl"] != "fused" or record.get("speedup_vs_torch") is None:
        return None
    need = 1.0 if record["norm"] == "l2" or record["dtype"] == "bf16" else 1.5
    return f">= {need:.1f}x torch", record["speedup_vs_torch"] >= need


def cuda_target(record: dict) -> tuple[str, bool] | None:
    if record["impl"] != "fused" or record.get("sol_fraction") is None:
        return None
    need = 0.85 if record["pass"] == "fwd" else 0.70
    ok = record["sol_fraction"] >= need and (record.get("speedup_vs_torch") or 0) > 1.0
    return f">= {need:.0%} of copy BW and > 1x torch", ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-format", default="contiguous")
    parser.add_argument("--shape", default=SHAPES)
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    spec = make_spec(norm="l2,l1,linf,top10", impl="torch,fused", dtype="fp32,bf16" + (",fp16" if cuda else ""),
                     shape=args.shape, pass_="fwd,bwd" if cuda else "fwd+bwd", mode="train",
                     memory_format=args.memory_format, device=device, threads=args.threads, measure_memory=False)
    records = runner.run(spec)
    judge = cuda_target if cuda else cpu_target
    print(f"{'shape':<16}{'format':<15}{'dtype':<6}{'pass':<9}{'norm':<7}{'ms':>8}{'vs torch':>10}{'of copy BW':>12}  target")
    passed = failed = 0
    for r in records:
        verdict = judge(r) if r["status"] == "ok" else None
        if verdict is None:
            if r["status"] != "ok":
                print(f"{r['shape']:<16}{r['memory_format']:<15}{r['dtype']:<6}{r['pass']:<9}{r['norm']:<7} {r['status']}: {r['reason']}")
            continue
        text, ok = verdict
        passed, failed = passed + ok, failed + (not ok)
        print(f"{r['shape']:<16}{r['memory_format']:<15}{r['dtype']:<6}{r['pass']:<9}{r['norm']:<7}"
              f"{r['time_median_s'] * 1e3:8.2f}{r['speedup_vs_torch']:9.2f}x{r['sol_fraction']:11.0%}  "
              f"{text}: {'PASS' if ok else 'FAIL'}")
    print(f"{passed} targets met, {failed} missed ({device}, {records[0]['threads'] if records else '?'} threads)")
    if cuda:
        return
    print("\nInterleaved (round-robin, fwd+bwd, contiguous): speedup of fused over torch's BatchNorm2d")
    for shape in args.shape.split(","):
        dims = tuple(int(v) for v in shape.split("x"))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            t = interleaved(dims, dtype)
            ratios = "  ".join(f"{n} {t['torch'] / t[n]:.2f}x" for n in NORMS)
            print(f"{shape:<16}{name:<6}torch {t['torch'] * 1e3:6.2f} ms  {ratios}")


if __name__ == "__main__":
    main()
