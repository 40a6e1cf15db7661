"""The honesty check of ``normbench profile``: does its time for a cell agree with an independent
timing of the very same call by ``torch.utils.benchmark.Timer``?

Both time the callable the runner builds for the cell (:func:`normbench.bench.runner.build_timed_pass`):
in the default cold-cache mode that is the rotation over copies of the inputs, so both timers
read each repeat's inputs from memory, not from the cache, and compare like with like;
``--warm-cache`` builds the runner's hot-cache call (one copy) for both instead. (Where a cell's
inputs are too small for enough copies, the runner also reads an eviction buffer before each of
its samples, which ``torch.utils.benchmark`` cannot do; such a cell is marked ``*``.) They run in
alternation, ``rounds`` times each, so that a slow phase of a shared machine hits both alike; the
report gives each one's median over its rounds and their ratio. On an idle machine the ratio is
within a few percent of 1; on a shared one the spread between rounds shows the noise the ratio
must be read against.

Run it as a script (a benchmark, never a timed unit test)::

    python -m normbench.bench.honesty --threads 1
    python -m normbench.bench.honesty --warm-cache
    python -m normbench.bench.honesty --cell l2,torch,fp32,32x64x56x56,fwd
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

from normbench.axes import parse_dtype, parse_norm, parse_shape
from normbench.bench.runner import RunContext, build_timed_pass, default_timer
from normbench.bench.spec import Cell
from normbench.bench.timing import TimingSpec, measure

DEFAULT_CELLS = (
    "l2,torch,fp32,32x64x56x56,fwd",
    "l2,torch,fp32,32x64x56x56,fwd+bwd",
    "l2,torch,bf16,32x256x14x14,fwd+bwd",
    "layernorm,torch,fp32,4096x1024,fwd+bwd",
    "l1,analytic,fp32,32x64x56x56,fwd+bwd",
)


@dataclass(frozen=True)
class Agreement:
    """Medians of normbench's engine and of torch.utils.benchmark for one cell, per round."""

    cell: str
    ours_s: tuple[float, ...]
    torch_timer_s: tuple[float, ...]
    cache: str = "cold"
    copies: int = 1  # copies of the inputs the timed call rotates through
    evicts: bool = False  # normbench also evicts before each sample (utils.benchmark cannot)

    @property
    def ratio(self) -> float:
        """normbench's median over torch.utils.benchmark's (1.0: perfect agreement)."""
        return statistics.median(self.ours_s) / statistics.median(self.torch_timer_s)


def parse_cell(text: str, device: str = "cpu", mode: str = "train") -> Cell:
    """``norm,impl,dtype,shape,pass`` -> a :class:`Cell`."""
    norm, impl, dtype, shape, pass_ = (t.strip() for t in text.split(","))
    return Cell(parse_norm(norm), impl, parse_dtype(dtype), parse_shape(shape), "honesty", pass_, mode,
                "contiguous", device)


def compare(cell: Cell, rounds: int = 3, timing: TimingSpec = TimingSpec(), min_run_time: float = 0.2,
            cache: str = "cold") -> Agreement:
    """Time the cell's call, as the runner builds it for ``cache``, ``rounds`` times with each
    timer, alternating."""
    from torch.utils.benchmark import Timer

    from normbench.kernels.machine import last_level_cache_total

    timer = default_timer(cell.device, cache)
    ctx = RunContext(cell.device, timing, timer, None, cache, last_level_cache_total())
    tp = build_timed_pass(cell, ctx)
    fn = tp.fn
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(measure(fn, timing, timer).median)
        t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        theirs.append(t.blocked_autorange(min_run_time=min_run_time).median)
    a = cell.axes()
    label = f"{a['norm']} {a['impl']} {a['dtype']} {a['shape']} {a['pass']}"
    return Agreement(label, tuple(ours), tuple(theirs), cache, tp.copies, fn.evict is not None)


def main(argv: list[str] | None = None) -> None:
    """Print, per cell, both timers' medians per round and the ratio of their medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", action="append", help="norm,impl,dtype,shape,pass (repeatable)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's setting)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-cache", action="store_true",
                        help="time the runner's hot-cache call (default: its cold-cache rotation of input copies)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = "warm" if args.warm_cache else "cold"
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {cache} cache")
    print(f"{'cell':44s} {'copies':>6s} {'normbench ms (rounds)':>28s} {'utils.benchmark ms':>28s} {'ratio':>6s}")
    evicted = False
    for text in args.cell or DEFAULT_CELLS:
        r = compare(parse_cell(text, args.device), rounds=args.rounds, cache=cache)
        evicted |= r.evicts
        ours = " ".join(f"{t * 1e3:.2f}" for t in r.ours_s)
        theirs = " ".join(f"{t * 1e3:.2f}" for t in r.torch_timer_s)
        copies = f"{r.copies}{'*' if r.evicts else ''}"
        print(f"{r.cell:44s} {copies:>6s} {ours:>28s} {theirs:>28s} {r.ratio:6.3f}", flush=True)
    if evicted:
        print("* too small for enough copies: normbench also reads an eviction buffer before each sample, "
              "utils.benchmark does not (not like with like)")


if __name__ == "__main__":
    main()
