"""``normbench plot equivalence`` (also plain ``normbench plot``): run what the cache lacks of the
weight-norm / learning-rate equivalence experiments, write equivalence.json and the figures,
and print the summary. Parses and renders only; the work is in
:func:`normbench.experiments.equivalence.run_equivalence`."""

from __future__ import annotations

from typing import Any

import click

from normbench.cli.training import figure_formats, run_with_progress, training_changes, training_options


def _fmt(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    """``mean±std`` over seeds, compact enough for an 80-column terminal."""
    if stat["mean"] is None:
        return "-"
    if scale != 1.0:  # accuracy in percent
        text = f"{stat['mean'] * scale:.1f}"
        return text if stat["std"] is None else f"{text}±{stat['std'] * scale:.1f}"
    text = f"{stat['mean']:.{digits}g}"
    return text if stat["std"] is None else f"{text}±{stat['std']:.1g}"


@click.command("equivalence")
@click.option("--quick", is_flag=True, help="A reduced run (seconds): isolated protocol, 2 seeds, 4 epochs, 400 images, narrow model.")
@click.option("--regimes", default=None, help="Comma list of regimes, or all, wd, norms, lp. [default: all]")
@click.option("--protocol", type=click.Choice(["isolated", "paper", "both"]), default=None,
              help="Who else gets WD: isolated (same WD outside the conv weights in every regime), "
                   "paper (WD-on decays everything), or both. [default: both]")
@click.option("--augment", default=None,
              help="Training-set augmentation, comma list of key=value: shift=K (random translation by up to K "
                   "pixels on a canvas K larger each side), scale=F (upscale), noise=S (Gaussian); none for none. "
                   "[default: shift=2,noise=0.3]")
@training_options({"seeds": "0,1,2", "epochs": 30, "model": "small", "lr": 0.1, "wd": "1e-2", "momentum": 0.9,
                   "batch_size": 32})
def equivalence(quick: bool, regimes: str | None, protocol: str | None, augment: str | None, **options: Any) -> int:
    """Run the weight-decay / learning-rate equivalence experiments (the paper's first claim) and
    draw them: WD on, WD off, WD off with the per-channel lr correction, norm schedule; BN vs WN vs
    bounded WN; L1 and L-inf batch-norm. Runs are cached in OUTPUT_DIR/cache, so drawing again
    does not retrain."""
    import torch

    from normbench.experiments.equivalence import PRIMARY_METRIC, default_config, quick_config, run_equivalence
    from normbench.experiments.regimes import parse_regimes
    from normbench.experiments.runner import count_runs, with_overrides

    fmt_list = figure_formats(options["formats"])
    config = quick_config() if quick else default_config()
    config = with_overrides(
        config,
        regimes=parse_regimes(regimes) if regimes is not None else None,
        protocols=(["isolated", "paper"] if protocol == "both" else [protocol]) if protocol else None,
        augment=augment,
        **training_changes(options),
    )
    torch.set_num_threads(options["threads"])
    from normbench import distributed

    if distributed.init_from_env(config.device) > 1 and not distributed.is_main():
        # under torchrun the other ranks train alongside rank 0, which records and draws
        from normbench.experiments.runner import run

        run(config, cache_dir=None, retrain=options["retrain"])
        distributed.finish()
        return 0
    outcome = run_with_progress(
        count_runs(config), options["quiet"],
        lambda bars: run_equivalence(config, options["output_dir"], fmt_list, bars, options["retrain"]),
    )
    distributed.finish()
    _render(outcome, PRIMARY_METRIC)
    from normbench.cli.outcome import finish

    return finish(outcome.records, noun="run")


def _render(outcome, primary: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title="Equivalence experiments: final epoch, mean ± std over seeds")
    for col in ("protocol", "regime", "n", "test acc %", "test loss", "train loss", "div"):
        table.add_column(col, justify="left" if col in ("protocol", "regime") else "right",
                         no_wrap=col != "regime")
    for row in outcome.table:
        table.add_row(
            row["protocol"], row["regime"], str(row["seeds"]), _fmt(row["test_acc"], 100.0),
            _fmt(row["test_loss"]), _fmt(row["train_loss"]),
            " ".join(filter(None, [str(row["diverged"]) if row["diverged"] else "",
                                   f"{row['skipped']} skipped" if row["skipped"] else ""])),
        )
    console.print(table)
    for metric in [primary] + [m for m in outcome.verdicts if m != primary]:
        for v in outcome.verdicts[metric]:
            line = Text("verdict ", style="bold") if metric == primary else Text("        ")
            console.print(line + Text(v["text"]), highlight=False)
    for e in outcome.equilibrium:
        console.print(e["text"], highlight=False, markup=False)
    bn = [c for c in outcome.checks if c["kind"] == "bn-preceded"]
    control = [c for c in outcome.checks if c["kind"] == "control"]
    worst_loss = max(c["loss_rel_change"] for c in bn)
    worst_grad = max(c["grad_rel_err"] for c in bn)
    ctrl = min(c["loss_rel_change"] for c in control) if control else float("nan")
    console.print(
        f"scale invariance ({'holds' if outcome.check_passed else 'FAILS'}): BN-preceded weights scaled by "
        f"alpha in {sorted({c['alpha'] for c in bn})}: loss change <= {worst_loss:.1e}, gradient off 1/alpha by "
        f"<= {worst_grad:.1e}; last layer (control) loss change >= {ctrl:.1e}",
        highlight=False,
    )
    console.print(
        f"{len(outcome.records)} runs, {outcome.trained} of them trained now (the rest from the cache or shared); "
        f"results {outcome.results_path}; {len(outcome.figures)} figures in {outcome.results_path.parent}",
        highlight=False,
    )
