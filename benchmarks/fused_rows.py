"""The fused Lp row norms' targets (issue 16), measured in one run by normbench's profile engine.

    python benchmarks/fused_rows.py [--device cpu|cuda] [--threads N] [--hidden 1024,4096,8192] [--rows 4096]

Runs torch's LayerNorm and RMSNorm and normbench's ``fused`` layer-norm and RMS-norm (L2, L1,
L-inf, top-10) on rows x hidden inputs in fp32 and bf16 (and fp16 on CUDA), forward and
fwd+bwd in training, each candidate timed in the same rounds as torch's layer of its family
(the profile engine's interleaving), and prints each ratio beside its target:

- CPU: fused LayerNorm and RMSNorm (p=2) fwd+bwd >= 1.0x torch's layer; the L1 variants >= 1.0x
  torch's p=2 layer (the ratio printed is against torch's layer of the family, which is its p=2
  layer). Forward and the L-inf and top-10 variants are printed without a target.
- CUDA: forward >= 85% and backward >= 70% of the copy bandwidth in bf16 at hidden >= 4k, and
  faster than torch's layer.

Then, on the CPU, a round-robin check: torch's LayerNorm and every fused layer-norm, one call of
each per round, so that all see the same machine state.
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

NORMS = "layernorm,l1-layernorm,linf-layernorm,top10-layernorm,rmsnorm,l1-rmsnorm,linf-rmsnorm,top10-rmsnorm"
TARGETED = {"layernorm", "rmsnorm", "l1-layernorm", "l1-rmsnorm"}


def cpu_target(record: dict) -> tuple[str, bool] | None:
    if record["impl"] != "fused" or record["pass"] != "fwd+bwd" or record["norm"] not in TARGETED:
        return None
    return ">= 1.0x torch", (record.get("speedup_vs_torch") or 0) >= 1.0


def cuda_target(record: dict) -> tuple[str, bool] | None:
    if record["impl"] != "fused" or record["dtype"] != "bf16" or int(record["shape"].split("x")[-1]) < 4096:
        return None
    need = 0.85 if record["pass"] == "fwd" else 0.70
    ok = (record.get("sol_fraction") or 0) >= need and (record.get("speedup_vs_torch") or 0) > 1.0
    return f">= {need:.0%} of copy BW and > 1x torch", ok


def interleaved(shape: tuple[int, ...], dtype: torch.dtype, rounds: int = 15) -> dict[str, float]:
    """Median fwd+bwd seconds of torch's LayerNorm and each fused layer-norm, round-robin."""
    from normbench.nn import LpLayerNorm

    torch.manual_seed(0)
    n = shape[-1]
    x = torch.randn(shape).to(dtype).requires_grad_()
    gy = torch.randn(shape).to(dtype)
    layers = {"torch": torch.nn.LayerNorm(n).to(dtype)}
    for name, (p, k) in {"l2": (2.0, None), "l1": (1.0, None), "linf": (math.inf, None), "top10": (math.inf, 10)}.items():
        layers[name] = LpLayerNorm(n, p=p, k=k, impl="fused").to(dtype)
    times: dict[str, list[float]] = {name: [] for name in layers}
    inputs = {name: [x, *layer.parameters()] for name, layer in layers.items()}
    for r in range(rounds + 2):  # two warm-up rounds: compilation and allocation
        for name, layer in layers.items():
            t0 = time.perf_counter()
            torch.autograd.grad(layer(x), inputs[name], gy)
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", default="1024,4096,8192")
    parser.add_argument("--norm", default=NORMS)
    parser.add_argument("--no-interleaved", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    shapes = ",".join(f"{args.rows}x{h}" for h in args.hidden.split(","))
    spec = make_spec(norm=args.norm, impl="torch,fused", dtype="fp32,bf16" + (",fp16" if cuda else ""),
                     shape=shapes, pass_="fwd,bwd" if cuda else "fwd,fwd+bwd", mode="train",
                     device=device, threads=args.threads, measure_memory=False)
    records = runner.run(spec)
    judge = cuda_target if cuda else cpu_target
    print(f"{'shape':<12}{'dtype':<6}{'pass':<9}{'norm':<17}{'ms':>8}{'torch ms':>10}{'vs torch':>10}{'of copy BW':>12}  target")
    passed = failed = 0
    torch_ms = {(r["shape"], r["dtype"], r["pass"], r["norm"]): r["time_median_s"] for r in records
                if r["impl"] == "torch" and r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            print(f"{r['shape']:<12}{r['dtype']:<6}{r['pass']:<9}{r['norm']:<17} {r['status']}: {r['reason']}")
            continue
        if r["impl"] != "fused":
            continue
        verdict = judge(r)
        family = r["norm"].rpartition("-")[2]
        ref = torch_ms.get((r["shape"], r["dtype"], r["pass"], family))
        text = "" if verdict is None else f"{verdict[0]}: {'PASS' if verdict[1] else 'FAIL'}"
        if verdict is not None:
            passed, failed = passed + verdict[1], failed + (not verdict[1])
        sol = "-" if r.get("sol_fraction") is None else f"{r['sol_fraction']:.0%}"
        print(f"{r['shape']:<12}{r['dtype']:<6}{r['pass']:<9}{r['norm']:<17}{r['time_median_s'] * 1e3:8.2f}"
              f"{'-' if ref is None else f'{ref * 1e3:.2f}':>10}{r['speedup_vs_torch']:9.2f}x{sol:>12}  {text}")
    print(f"{passed} targets met, {failed} missed ({device}, {records[0]['threads'] if records else '?'} threads)")
    if cuda or args.no_interleaved:
        return
    print("\nInterleaved (round-robin, fwd+bwd): speedup of fused layer-norm over torch's LayerNorm")
    for h in args.hidden.split(","):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            t = interleaved((args.rows, int(h)), dtype)
            ratios = "  ".join(f"{n} {t['torch'] / t[n]:.2f}x" for n in t if n != "torch")
            print(f"{args.rows}x{h:<8}{name:<6}torch {t['torch'] * 1e3:7.2f} ms  {ratios}")


if __name__ == "__main__":
    main()
