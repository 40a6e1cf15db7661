"""The cost of a layer's first call in a fresh process (numba compiling), against ``analytic``'s.

    python benchmarks/first_call.py [--layer bn2d-l1,layernorm-l1,...] [--empty-cache] [--threads N]

Each measurement runs in a new interpreter: import, build the layer, then one forward and backward
pass timed alone (the first call), then calls every 0.25 s until the kernels are ready (in
``background`` compile mode, the default: ``analytic`` runs meanwhile), printing how long that took
and what a call cost while compiling. ``--empty-cache`` points ``NUMBA_CACHE_DIR`` at a new empty
folder for every process: what a fresh install pays. The target (issue 16): the first call of any
layer at most 2 s more than ``analytic``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

LAYERS = {
    "bn2d-l1": ("LpBatchNorm2d(64, p=1, impl=IMPL)", (16, 64, 28, 28)),
    "bn2d-top10": ("LpBatchNorm2d(64, p=float('inf'), k=10, impl=IMPL)", (16, 64, 28, 28)),
    "layernorm-l2": ("LpLayerNorm(1024, impl=IMPL)", (512, 1024)),
    "layernorm-l1": ("LpLayerNorm(1024, p=1, impl=IMPL)", (512, 1024)),
    "rmsnorm-l2": ("LpRMSNorm(1024, impl=IMPL)", (512, 1024)),
}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
t1 = time.perf_counter()
import normbench.nn
from normbench.nn import *
from normbench.kernels import background
t2 = time.perf_counter()
IMPL = {impl!r}
layer = {expr}
x = torch.randn({shape}).requires_grad_()
def call():
    t = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - t
first = call()
second = call()
during, start = [], time.perf_counter()
while background.compiling() and time.perf_counter() - start < 300:
    time.sleep(0.25)
    during.append(call())
ready_after = time.perf_counter() - t2
after = min(call() for _ in range(3))
print(json.dumps(dict(import_torch_s=t1 - t0, import_nn_s=t2 - t1, first_s=first, second_s=second,
                      during_median_s=sorted(during)[len(during) // 2] if during else None,
                      ready_after_s=ready_after if during else None, steady_s=after,
                      jobs={{str(k): v for k, v in background.status().items()}})))
"""


def run_child(layer: str, impl: str, threads: int, empty_cache: bool) -> dict:
    expr, shape = LAYERS[layer]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if empty_cache:
            env["NUMBA_CACHE_DIR"] = cache
        code = CHILD.format(threads=threads, impl=impl, expr=expr.replace("IMPL", repr(impl)), shape=shape)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="bn2d-l1,layernorm-l1")
    parser.add_argument("--impl", default="auto", help="the implementation measured beside analytic")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--empty-cache", action="store_true")
    args = parser.parse_args()
    print(f"{'layer':<14}{'impl':<10}{'import nn':>10}{'first':>9}{'second':>9}{'while comp.':>12}"
          f"{'ready at':>10}{'steady':>9}  first - analytic's first")
    for layer in args.layer.split(","):
        base = run_child(layer, "analytic", args.threads, args.empty_cache)
        got = run_child(layer, args.impl, args.threads, args.empty_cache)
        for impl, r in (("analytic", base), (args.impl, got)):
            during = "-" if r["during_median_s"] is None else f"{r['during_median_s'] * 1e3:.1f} ms"
            ready = "-" if r["ready_after_s"] is None else f"{r['ready_after_s']:.1f} s"
            extra = "" if impl == "analytic" else f"  {r['first_s'] - base['first_s']:+.2f} s (target <= +2 s)"
            print(f"{layer:<14}{impl:<10}{r['import_nn_s']:9.2f}s{r['first_s'] * 1e3:7.0f}ms{r['second_s'] * 1e3:7.0f}ms"
                  f"{during:>12}{ready:>10}{r['steady_s'] * 1e3:7.1f}ms{extra}")


if __name__ == "__main__":
    main()
