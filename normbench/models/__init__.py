"""A user's model as the input of ``stability`` and ``profile`` (``--model``): naming and building
it (:mod:`~normbench.models.spec`), the built-in models (:mod:`~normbench.models.builtins`) and
one hooked forward and backward pass recording every normalization layer
(:mod:`~normbench.models.capture`)."""

from normbench.models.capture import Capture, CapturedLayer, capture, layer_cases
from normbench.models.spec import LoadedModel, load_model, load_weights

__all__ = ["Capture", "CapturedLayer", "capture", "layer_cases", "LoadedModel", "load_model", "load_weights"]
