"""Search for a default task of ``normbench plot`` on which weight decay matters (issue 18).

A grid over the task (augmentation, training-set size), weight decay, epochs and width; for each
cell it trains ``wd_on``, ``wd_off`` and ``wd_off_corrected_grad`` in the isolated protocol over
the seeds through the experiment's own :func:`normbench.experiments.runner.run` (cached, so a
re-run trains only new cells), and prints one row per cell:

- ``s``: training seconds of the cell's runs (sum over the runs trained or cached);
- ``eq``: the WD-on runs' fraction of steps at the rotational equilibrium (within 20% of
  ``sqrt(2 lr WD / (1 + momentum))``), per lr phase, mean over seeds and layers
  (:func:`normbench.experiments.summary.equilibrium_fraction`);
- ``err gap`` / ``loss gap``: WD off minus WD on in final test error (points) and test loss, with
  twice the seed noise (WD on's seed-to-seed std) and the verdict of
  :func:`normbench.experiments.summary.verdict`; ``corr``: whether the before-momentum correction
  closes it.

Usage (one thread, one process)::

    python benchmarks/equivalence_search.py --stage 1          # the pruning grid (30 epochs)
    python benchmarks/equivalence_search.py --stage 2          # the best task at larger WD, and plain digits
    python benchmarks/equivalence_search.py --stage 3 --seeds 0,1,2,3,4   # the chosen cell, five seeds
    python benchmarks/equivalence_search.py --stage 1 --dry    # list the cells only

The table is also written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from normbench.experiments.runner import ExperimentConfig, run
from normbench.experiments.summary import equilibrium_fraction, verdict

REGIMES = ["wd_on", "wd_off", "wd_off_corrected_grad"]
TASKS = {  # name: (augmentation spec, training-set size)
    "plain": (None, None),
    "shift1": ("shift=1", None),
    "shift2": ("shift=2", None),
    "shift2+noise": ("shift=2,noise=0.3", None),
    "shift3+noise": ("shift=3,noise=0.5", None),
}
STAGES = {
    1: {"task": ["plain", "shift1", "shift2", "shift2+noise", "shift3+noise"], "wd": [5e-4, 2e-3, 5e-3],
        "epochs": [30], "width": [16]},
    # the equilibrium after a decay forms on a time scale of about (1 - momentum) / (2 lr WD) steps:
    # larger WD to shorten it
    2: {"task": ["shift2+noise", "plain"], "wd": [1e-2, 2e-2, 5e-2], "epochs": [30], "width": [16]},
    # the two best augmented cells of stages 1-2 and plain digits at the same WD, run with --seeds 0,1,2,3,4
    3: {"task": ["shift2+noise", "plain"], "wd": [5e-3, 1e-2], "epochs": [30], "width": [16]},
    # the equilibrium in every lr phase: a decay by gamma drops the angular update by gamma at once
    # and its equilibrium by sqrt(gamma); the norms close the difference in about
    # (1 - momentum) / (2 lr WD) steps, so a milder decay keeps the later phases' time scales
    # within a phase (273 steps)
    4: {"task": ["shift2+noise"], "wd": [1e-2, 2e-2], "epochs": [30], "width": [16], "gamma": [0.5, 0.3]},
    # more steps per phase at the same epochs: smaller batches (the time scale is in steps)
    5: {"task": ["shift2+noise"], "wd": [1e-2], "epochs": [30], "width": [16], "gamma": [0.5, 0.1], "batch": [8, 16]},
}


def cells(stage: int) -> list[dict[str, Any]]:
    """The grid of one stage, one dict per cell."""
    grid = STAGES[stage]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def config_of(cell: dict[str, Any], seeds: list[int], protocol: str) -> ExperimentConfig:
    """The experiment configuration of a cell (the default's other settings)."""
    augment, train_size = TASKS[cell["task"]]
    return ExperimentConfig(regimes=list(REGIMES), seeds=seeds, protocols=[protocol], dataset="digits",
                            model="small", width=cell["width"], epochs=cell["epochs"],
                            batch_size=cell.get("batch", 32), lr=0.1, momentum=0.9, wd=cell["wd"],
                            gamma=cell.get("gamma", 0.1), augment=augment, train_size=train_size)


def _gap(v: dict[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """A verdict entry as numbers: the gap, twice the noise, departs, the correction's verdict."""
    corr = (v.get("corrections") or {}).get("wd_off_corrected_grad", {})
    noise = v.get("seed_noise")
    return {
        "gap": None if v.get("gap_wd_off") is None else v["gap_wd_off"] * scale,
        "two_noise": None if noise is None else 2 * noise * abs(scale),
        "departs": v.get("departs"),
        "correction": corr.get("verdict"),
        "correction_gap": None if corr.get("gap") is None else corr["gap"] * scale,
    }


def measure(cell: dict[str, Any], seeds: list[int], protocol: str, cache: Path) -> dict[str, Any]:
    """Train (or read) a cell and summarize it."""
    start = time.perf_counter()
    records = run(config_of(cell, seeds, protocol), cache_dir=cache)
    wall = time.perf_counter() - start
    on = [r for r in records if r["regime"] == "wd_on" and r["status"] == "ok" and not r["diverged"]]
    phases = [equilibrium_fraction(r) for r in on]
    eq = [statistics.fmean(p[k]["fraction"] for p in phases) for k in range(min(map(len, phases)))] if phases else []
    ratio = [statistics.fmean(p[k]["ratio"] for p in phases) for k in range(min(map(len, phases)))] if phases else []
    err = next(iter(verdict(records, "test_acc")), {})
    loss = next(iter(verdict(records, "test_loss")), {})
    train = next(iter(verdict(records, "train_loss")), {})
    return {
        **cell, "augment": TASKS[cell["task"]][0], "train_size": TASKS[cell["task"]][1], "protocol": protocol,
        "seeds": seeds, "train_seconds": sum(r.get("train_seconds", 0.0) for r in records), "wall_seconds": wall,
        "equilibrium_fraction": eq, "equilibrium_ratio": ratio,
        "wd_on_test_error": 100 * (1 - statistics.fmean(r["final"]["test_acc"] for r in on)) if on else None,
        "test_error": _gap(err, -100.0), "test_loss": _gap(loss), "train_loss": _gap(train),
        "diverged": sum(bool(r.get("diverged")) for r in records),
    }


def _fmt_gap(g: dict[str, Any], digits: str) -> str:
    if g["gap"] is None:
        return "-"
    mark = "D" if g["departs"] else " "
    corr = {"closes": "closes", "overshoots": "overshoots", "narrows": "narrows"}.get(g["correction"] or "", "no")
    return f"{g['gap']:+{digits}}/{g['two_noise']:{digits}}{mark} {corr if g['departs'] else ''}"


def row(m: dict[str, Any]) -> str:
    """One line of the table."""
    eq = "/".join(f"{f:.2f}" for f in m["equilibrium_fraction"])
    return (f"{m['task']:<14} wd={m['wd']:<6g} ep={m['epochs']:<3} w={m['width']:<3} "
            f"gamma={m.get('gamma', 0.1):<4g} b={m.get('batch', 32):<3} {m['train_seconds']:6.0f}s "
            f"eq={eq:<20} err%={m['wd_on_test_error']:5.2f} err={_fmt_gap(m['test_error'], '.2f'):<24} "
            f"loss={_fmt_gap(m['test_loss'], '.3f'):<26} train={_fmt_gap(m['train_loss'], '.3f')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), default=1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--protocol", default="isolated", choices=["isolated", "paper"])
    parser.add_argument("--cache", default="normbench-out/equivalence-search/cache")
    parser.add_argument("--output", default=None, help="JSON of the table [normbench-out/equivalence-search/stageN.json]")
    parser.add_argument("--dry", action="store_true", help="list the cells only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    output = Path(args.output or f"normbench-out/equivalence-search/stage{args.stage}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    print("columns: seconds; eq = WD-on fraction of steps within 20% of the equilibrium per lr phase; "
          "err/loss/train = gap WD off - WD on / 2x seed noise (D: departs) and the before-momentum correction")
    table = []
    for cell in cells(args.stage):
        if args.dry:
            print(cell)
            continue
        m = measure(cell, seeds, args.protocol, Path(args.cache))
        table.append(m)
        print(row(m), flush=True)
        output.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
