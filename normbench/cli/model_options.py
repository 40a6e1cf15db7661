"""The ``--model`` options that ``stability`` and ``profile`` share, declared once."""

from __future__ import annotations

from typing import Any, Callable

import click

MODEL_HELP = ("A model whose normalization layers to analyse: path/file.py:factory, package.module:factory, "
              "torchvision:NAME, timm:NAME (when installed) or builtin:cnn|resnet|transformer.")


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --model, --weights, --model-input, --input-shape, --train/--eval and --max-elements."""
    options = [
        click.option("--model", "model", help=MODEL_HELP),
        click.option("--weights", type=click.Path(dir_okay=False),
                     help="A state_dict for --model (torch.load weights_only: no code is unpickled)."),
        click.option("--model-input", type=click.Path(dir_okay=False),
                     help="The model's input: a .pt/.pth tensor (or list/dict of them), .npy or .npz."),
        click.option("--input-shape", help="Gaussian model input of this shape, e.g. 8x3x224x224 (default: the "
                     "built-in or hub model's own)."),
        click.option("--train/--eval", "train", default=True, show_default=True,
                     help="Mode of the model's capture pass (train: batch statistics)."),
        click.option("--max-elements", type=int, help="Keep at most about this many elements of each layer's input, "
                     "by whole channels/rows (stability default 65536, quick 4096)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def check_model_options(model: str | None, **given: Any) -> None:
    """A UserError when a --model option is given without --model."""
    from normbench.errors import UserError

    used = [name for name, value in given.items() if value is not None]
    if model is None and used:
        raise UserError(f"--{used[0].replace('_', '-')} needs --model")
