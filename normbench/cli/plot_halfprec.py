"""``normbench plot halfprec``: train the equivalence experiments' network with its batch-norms
computed in native low precision, swept over the scale of their input, write halfprec.json and the
figures, and print the table and verdict. Parses and renders only; the work is in
:func:`normbench.experiments.halfprec.run_halfprec`."""

from __future__ import annotations

import os
from typing import Any

import click

from normbench.cli.training import (
    figure_formats,
    floats,
    run_with_progress,
    training_changes,
    training_options,
)


def _list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from normbench.axes import split_list

    values = split_list(text)
    if not values:
        raise click.BadParameter("no value given")
    return values


@click.command("halfprec")
@click.option("--quick", is_flag=True, help="A reduced run (seconds): 1 seed, L2 and L1, scales 1 and 1000, "
                                            "3 epochs, 400 images, narrow model.")
@click.option("--norm", "norms", default=None, help="Comma list of batch-norms: l2, l1, linf, top<k>. "
                                                    "[default: l2,l1,linf]")
@click.option("--dtype", "dtypes", default=None, help="Comma list of fp16, bf16, fp8_e4m3, fp8_e5m2 (fp8 is storage; "
                                                      "its arithmetic is fp16). [default: fp16]")
@click.option("--compute", "computes", default=None, help="Comma list of native, framework, fp32. [default: all]")
@click.option("--reduction", "reductions", default=None,
              help="Comma list of native reduction orders: pairwise, sequential, sum. [default: pairwise,sum]")
@click.option("--scales", default=None, help="Comma list of factors on the activations entering batch-norm. "
                                             "[default: 1,10,100,1000,1e4]")
@click.option("--storage", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Dtype of the activations between the other layers (fp32: only batch-norm is low precision). "
                   "[default: fp32]")
@click.option("--natural/--no-natural", default=None,
              help="Also train WD off at scale 1, where the weights' norms grow on their own. [default: on]")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Runs trained at a time, each in a process of its own with --threads threads. "
                   "[default: the CPU cores this process may use, divided by --threads]")
@training_options({"seeds": "0,1,2", "epochs": 10, "model": "small", "lr": 0.1, "wd": "2e-3", "momentum": 0.9,
                   "batch_size": 32})
def halfprec(quick: bool, norms: str | None, dtypes: str | None, computes: str | None, reductions: str | None,
             scales: str | None, storage: str | None, natural: bool | None, jobs: int | None,
             **options: Any) -> int:
    """Do L1 and L-inf batch-norm train in half precision where L2 fails? Each batch-norm runs in
    native fp16 (or bf16, fp8 storage) forward and backward, every operation rounded and every
    reduction done in the dtype, with its input multiplied by a fixed scale: invisible in exact
    arithmetic, decisive in fp16. Framework (fp32 statistics) and fp32 runs on the same seeds are
    the references. Runs are cached in OUTPUT_DIR/cache, so drawing again does not retrain."""
    from dataclasses import replace

    import torch

    from normbench.experiments.halfprec import count_runs, default_config, quick_config, run_halfprec, with_training

    from normbench import distributed

    fmt_list = figure_formats(options["formats"])
    config = quick_config() if quick else default_config()
    changes = {"norms": _list(norms), "dtypes": _list(dtypes), "computes": _list(computes),
               "reductions": _list(reductions), "scales": floats(scales, "--scales") if scales is not None else None,
               "storage": storage, "natural": natural}
    config = replace(config, **{k: v for k, v in changes.items() if v is not None})
    config = with_training(config, **training_changes(options))
    config.validate()
    torch.set_num_threads(options["threads"])
    if jobs is None:  # under torchrun every rank is one of the processes already
        jobs = 1 if distributed.launched() > 1 else max(1, len(os.sched_getaffinity(0)) // options["threads"]) \
            if hasattr(os, "sched_getaffinity") else 1
    if distributed.init_from_env(config.training.device) > 1 and not distributed.is_main():
        # under torchrun the runs are spread over the ranks; rank 0 records and draws
        from normbench.experiments.halfprec import run

        run(config, cache_dir=None, retrain=options["retrain"], jobs=jobs)
        distributed.finish()
        return 0
    outcome = run_with_progress(
        count_runs(config), options["quiet"],
        lambda bars: run_halfprec(config, options["output_dir"], fmt_list, bars, options["retrain"], jobs=jobs),
    )
    distributed.finish()
    _render(outcome)
    from normbench.cli.outcome import finish

    return finish(outcome.records, noun="run")


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if entry["runs"] == 0:
        return "skipped" if entry["skipped"] else "-"
    if entry["test_acc"] is None:
        return f"div {entry['diverged']}/{entry['runs']}"
    return f"{100 * entry['test_acc']:.1f}" + ("*" if entry["diverged"] else "")


def _run_name(row: dict[str, Any]) -> str:
    if row["compute"] == "fp32":
        return "fp32"
    return " ".join(filter(None, (row["compute"], row["dtype"], row["reduction"])))


def _render(outcome: Any) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    scales = sorted({s for row in outcome.table for s in row["scales"]})
    table = Table(title="Batch-norm in low precision: final test accuracy %, mean over seeds",
                  caption="div d/n: d of n seeds diverged; *: some diverged, mean of the others",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("WD", "computed in", "norm"):
        table.add_column(col, no_wrap=True)
    for s in scales:
        table.add_column(f"x{s:g}", justify="right", no_wrap=True)
    for row in outcome.table:
        table.add_row("on" if row["regime"] == "wd_on" else "off", _run_name(row), row["norm"],
                      *(_cell(row["scales"].get(s)) for s in scales))
    console.print(table)
    for v in outcome.verdicts:
        console.print(Text("verdict ", style="bold") + Text(v["text"]), highlight=False)
    control = outcome.control
    if control["spread"]:
        spread = ", ".join(f"{k} {100 * v:.1f}" for k, v in control["spread"].items())
        noise = "-" if control["noise"] is None else f"{100 * control['noise']:.1f}"
        console.print(f"control: fp32 final accuracy across scales varies by at most {spread} points per seed "
                      f"(seed-to-seed std {noise} points)", highlight=False)
    console.print(f"{len(outcome.records)} runs, {outcome.trained} of them trained now (the rest from the cache); "
                  f"results {outcome.results_path}; {len(outcome.figures)} figures in {outcome.results_path.parent}",
                  highlight=False)
