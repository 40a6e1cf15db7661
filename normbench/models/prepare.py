"""From the command line's ``--model`` options to a built model, its input and its capture: the
one place ``stability --model`` and ``profile --model`` share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from normbench.errors import UserError
from normbench.models.capture import Capture, capture, gaussian_input, load_model_input, prepare_input
from normbench.models.spec import LoadedModel, load_model, load_weights


@dataclass
class PreparedModel:
    """A model ready to run: the module on its device, its input there, where the input came
    from (``input_from``), and notes worth showing (weights that did not all match ...)."""

    loaded: LoadedModel
    inputs: Any
    input_from: str
    notes: list[str] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        return self.loaded.module


def prepare_model(
    spec: str,
    weights: str | None = None,
    model_input: str | None = None,
    input_shape: Sequence[int] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> PreparedModel:
    """Build the model ``spec`` names, load ``weights`` (a state_dict file), move it to
    ``device``, and make its input: the tensors of ``model_input``, else input of ``input_shape``
    (else of the model's default shape: built-in and hub models have one): images of the built-in
    dataset where the shape fits (:func:`dataset_images`), Gaussian otherwise."""
    if model_input is not None and input_shape is not None:
        raise UserError("give --model-input or --input-shape, not both")
    loaded = load_model(spec)
    notes = load_weights(loaded.module, weights) if weights is not None else []
    loaded.module.to(device)
    if model_input is not None:
        raw, where = load_model_input(model_input), f"tensors of {model_input}"
    else:
        shape = tuple(input_shape) if input_shape is not None else loaded.input_shape
        if shape is None:
            raise UserError(f"--model {spec}: give the input: --input-shape (e.g. 8x3x224x224) or --model-input FILE")
        from normbench.axes import format_shape

        images = dataset_images(shape)
        if images is not None:
            raw, where = images, f"{shape[0]} images of the built-in digits dataset"
        else:
            raw, where = gaussian_input(shape, seed=seed), f"N(0, 1) of shape {format_shape(shape)}"
    return PreparedModel(loaded, prepare_input(raw, loaded.module, device), where, notes)


def dataset_images(shape: Sequence[int]) -> Any:
    """Real images where the shape is theirs: the first N standardized training images of the
    built-in digits dataset for ``N x 1 x 8 x 8`` (N up to its 1,258), else None (Gaussian input).
    Real images give the activations a trained or converted CNN meets, not those of noise."""
    if len(shape) != 4 or tuple(shape[1:]) != (1, 8, 8):
        return None
    from normbench.experiments.data import load_dataset

    x = load_dataset("digits").x_train
    return x[: shape[0]].clone() if shape[0] <= len(x) else None


def capture_model(prepared: PreparedModel, train: bool = True, max_elements: int | None = None,
                  seed: int = 0) -> Capture:
    """One hooked forward and backward pass of a prepared model; a failure of the user's model
    (a shape mismatch, say) is a one-line UserError."""
    try:
        return capture(prepared.module, prepared.inputs, train=train, max_elements=max_elements, seed=seed)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model: one line
        text = str(exc).strip().splitlines()
        raise UserError(f"--model {prepared.loaded.spec}: the forward or backward pass on {prepared.input_from} "
                        f"raised {type(exc).__name__}: {text[0][:200] if text else ''}") from None
