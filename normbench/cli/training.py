"""What the plot commands that train networks share (``plot equivalence``, ``plot halfprec``): the
training options, their parsing into an :class:`~normbench.experiments.runner.ExperimentConfig`,
comma lists, figure formats, and the progress bars."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

FIGURE_FORMATS = ("png", "svg", "pdf")
TRAINING_FIELDS = ("epochs", "dataset", "data_dir", "model", "width", "train_size", "label_noise", "lr", "wd",
                   "momentum", "batch_size")


def _numbers(text: str, name: str, convert: Callable[[str], Any], kind: str) -> list[Any]:
    try:
        values = [convert(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {kind}, got {text!r}", param_hint=name) from None
    if not values:
        raise click.BadParameter("no value given", param_hint=name)
    return values


def ints(text: str, name: str) -> list[int]:
    """A comma list of integers (``--seeds 0,1,2``), or a click error naming the option."""
    return _numbers(text, name, int, "integers")


def floats(text: str, name: str) -> list[float]:
    """A comma list of numbers (``--scales 1,1e2,1e4``), or a click error naming the option."""
    return _numbers(text, name, float, "numbers")


def figure_formats(text: str) -> list[str]:
    """``--format png,svg`` as a list, or a click error."""
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    if not fmts or any(f not in FIGURE_FORMATS for f in fmts):
        raise click.BadParameter(f"use {', '.join(FIGURE_FORMATS)}, got {text!r}", param_hint="--format")
    return fmts


def training_options(defaults: dict[str, Any]) -> Callable:
    """The options every training command takes, their help showing this command's ``defaults``
    (keys: ``epochs``, ``lr``, ``wd``, ``momentum``, ``batch_size``, ``model``)."""
    options = [
        click.option("--seeds", default=None, help=f"Comma list of seeds. [default: {defaults['seeds']}]"),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help=f"Training epochs. [default: {defaults['epochs']}]"),
        click.option("--dataset", type=click.Choice(["digits", "mnist", "cifar10"]), default=None,
                     help="digits ships with scikit-learn; mnist (IDX files) and cifar10 (binary version) are read "
                          "from --data-dir."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder with the MNIST or CIFAR-10 files."),
        click.option("--model", type=click.Choice(["small", "vgg11"]), default=None,
                     help=f"Network. [default: {defaults['model']}]"),
        click.option("--width", type=click.IntRange(min=1), default=None, help="Channel multiplier of the model."),
        click.option("--train-size", type=click.IntRange(min=1), default=None, help="Use this many training images."),
        click.option("--label-noise", type=click.FloatRange(0, 1), default=None,
                     help="Fraction of training labels randomized."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help=f"Initial learning rate. [default: {defaults['lr']}]"),
        click.option("--wd", type=click.FloatRange(min=0), default=None,
                     help=f"Weight decay. [default: {defaults['wd']}]"),
        click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help=f"SGD momentum. [default: {defaults['momentum']}]"),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help=f"Minibatch size. [default: {defaults['batch_size']}]"),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="CPU threads for training (the default model is too small to gain from more)."),
        click.option("--output-dir", type=click.Path(file_okay=False), default="normbench-out", show_default=True),
        click.option("--format", "formats", default="png", show_default=True, help="Comma list of png, svg, pdf."),
        click.option("--retrain", is_flag=True, help="Ignore cached runs and train again."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def training_changes(options: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~normbench.experiments.runner.ExperimentConfig` fields the user set (None: keep
    the default), with ``--seeds`` parsed and ``--device`` resolved."""
    from normbench.axes import resolve_device

    changes = {k: options[k] for k in TRAINING_FIELDS}
    changes["seeds"] = ints(options["seeds"], "--seeds") if options["seeds"] is not None else None
    changes["device"] = resolve_device(options["device"])
    return changes


def run_with_progress(total_runs: int, quiet: bool, work: Callable[[Any], Any]) -> Any:
    """``work(progress)`` with rich bars on stderr when it is a terminal (and not ``quiet``), else
    ``work(None)``."""
    if quiet or not sys.stderr.isatty():
        return work(None)
    with RunProgress(total_runs) as bars:
        return work(bars)


class RunProgress:
    """An overall bar (runs) and a bar for the run in progress, on stderr (the
    :class:`~normbench.experiments.runner.Progress` of the training commands)."""

    def __init__(self, total_runs: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.overall = self.bars.add_task("all runs", total=total_runs)
        self.current = None

    def __enter__(self) -> "RunProgress":
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
