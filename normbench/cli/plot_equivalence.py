"""``normbench plot equivalence`` (also plain ``normbench plot``): run what the cache lacks of the
weight-norm / learning-rate equivalence experiments, write equivalence.json and the figures,
and print the summary. Parses and renders only; the work is in
:func:`normbench.experiments.equivalence.run_equivalence`."""

from __future__ import annotations

import sys

import click


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
    if not values:
        raise click.BadParameter("no value given", param_hint=name)
    return values


class _RichProgress:
    """An overall bar (runs) and a bar for the run in progress, on stderr."""

    def __init__(self, total_runs: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.overall = self.bars.add_task("all runs", total=total_runs)
        self.current = None

    def __enter__(self) -> "_RichProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def run_started(self, label: str, epochs: int) -> None:
        self.current = self.bars.add_task(f"  {label}", total=epochs)

    def epoch_done(self) -> None:
        if self.current is not None:
            self.bars.advance(self.current)

    def run_finished(self, cached: bool) -> None:
        if self.current is not None:
            self.bars.remove_task(self.current)
            self.current = None
        self.bars.advance(self.overall)


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
@click.option("--seeds", default=None, help="Comma list of seeds, e.g. 0,1,2. [default: 0,1,2]")
@click.option("--protocol", type=click.Choice(["isolated", "paper", "both"]), default=None,
              help="Who else gets WD: isolated (same WD outside the conv weights in every regime), "
                   "paper (WD-on decays everything), or both. [default: both]")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs. [default: 30]")
@click.option("--dataset", type=click.Choice(["digits", "mnist", "cifar10"]), default=None,
              help="digits ships with scikit-learn; mnist (IDX files) and cifar10 (binary version) are read from --data-dir.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the MNIST or CIFAR-10 files.")
@click.option("--model", type=click.Choice(["small", "vgg11"]), default=None, help="Network. [default: small]")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Channel multiplier of the model.")
@click.option("--train-size", type=click.IntRange(min=1), default=None, help="Use this many training images.")
@click.option("--label-noise", type=click.FloatRange(0, 1), default=None, help="Fraction of training labels randomized.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Initial learning rate. [default: 0.1]")
@click.option("--wd", type=click.FloatRange(min=0), default=None, help="Weight decay. [default: 2e-3]")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None, help="SGD momentum. [default: 0.9]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Minibatch size. [default: 32]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for training (the default model is too small to gain from more).")
@click.option("--output-dir", type=click.Path(file_okay=False), default="normbench-out", show_default=True)
@click.option("--format", "formats", default="png", show_default=True, help="Comma list of png, svg, pdf.")
@click.option("--retrain", is_flag=True, help="Ignore cached runs and train again.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def equivalence(
    quick: bool, regimes: str | None, seeds: str | None, protocol: str | None, epochs: int | None,
    dataset: str | None, data_dir: str | None, model: str | None, width: int | None,
    train_size: int | None, label_noise: float | None, lr: float | None, wd: float | None,
    momentum: float | None, batch_size: int | None, device: str, threads: int, output_dir: str,
    formats: str, retrain: bool, quiet: bool,
) -> int:
    """Run the weight-decay / learning-rate equivalence experiments (the paper's first claim) and
    draw them: WD on, WD off, WD off with the per-channel lr correction, norm schedule; BN vs WN vs
    bounded WN; L1 and L-inf batch-norm. Runs are cached in OUTPUT_DIR/cache, so drawing again
    does not retrain."""
    import torch

    from normbench.axes import resolve_device
    from normbench.experiments.equivalence import PRIMARY_METRIC, default_config, quick_config, run_equivalence
    from normbench.experiments.regimes import parse_regimes
    from normbench.experiments.runner import count_runs, with_overrides

    fmt_list = [f.strip().lower() for f in formats.split(",") if f.strip()]
    bad = [f for f in fmt_list if f not in ("png", "svg", "pdf")]
    if bad or not fmt_list:
        raise click.BadParameter(f"use png, svg or pdf, got {formats!r}", param_hint="--format")
    config = quick_config() if quick else default_config()
    config = with_overrides(
        config,
        regimes=parse_regimes(regimes) if regimes is not None else None,
        seeds=_ints(seeds, "--seeds") if seeds is not None else None,
        protocols=(["isolated", "paper"] if protocol == "both" else [protocol]) if protocol else None,
        epochs=epochs, dataset=dataset, data_dir=data_dir, model=model, width=width,
        train_size=train_size, label_noise=label_noise, lr=lr, wd=wd, momentum=momentum,
        batch_size=batch_size, device=resolve_device(device),
    )
    torch.set_num_threads(threads)
    show = not quiet and sys.stderr.isatty()
    if show:
        with _RichProgress(count_runs(config)) as bars:
            outcome = run_equivalence(config, output_dir, fmt_list, bars, retrain)
    else:
        outcome = run_equivalence(config, output_dir, fmt_list, None, retrain)
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
