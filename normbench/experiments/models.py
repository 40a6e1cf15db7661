"""Small VGG-style convolutional networks for the equivalence experiments.

Every convolution has no bias and is followed by a normalization, then ReLU; max-pooling halves
the image where the configuration says so (and the image is still at least 2 pixels wide); a
global average pool and one linear layer (the *last layer*, ``classifier``) give the logits.

Normalizations (``norm``):

- ``"bn"``: :class:`normbench.nn.LpBatchNorm2d` with dispersion ``p`` (p=2 is torch's batch-norm).
  The convolution weight before it is scale invariant: only its direction changes the output.
- ``"wn"``: weight normalization ``w = g * v / ||v||`` on each convolution, followed by mean-only
  batch-norm (subtract the batch mean, add a bias), as in the paper's weight-norm experiments.
- ``"bwn"``: bounded weight normalization ``w = rho * v / ||v||`` (``rho`` fixed at the initial
  per-channel norm) followed by mean-only batch-norm.

Batch-norm models keep torch's default initialization; weight-normalized ones start from He
initialization, which they need since nothing divides by the batch's spread.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from normbench.errors import UserError
from normbench.nn import LpBatchNorm2d, bounded_weight_norm, weight_norm

ARCHS: dict[str, list[int | str]] = {
    # widths are multiples of --width: "small" at width 16 is 16-16-M-32-32-M (about 15k weights)
    "small": [1, 1, "M", 2, 2, "M"],
    # VGG11's layout (64-M-128-M-256-256-M-512-512-M-512-512-M at width 64)
    "vgg11": [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
}
DEFAULT_WIDTH = {"small": 16, "vgg11": 64}
NORMS = ("bn", "wn", "bwn")


class MeanOnlyBatchNorm2d(nn.Module):
    """Batch-norm without the division: ``y = x - mean(x) + bias`` per channel (running mean in
    eval mode). Paired with weight normalization, as in Salimans & Kingma and the paper."""

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        else:
            mean = self.running_mean
        return x - mean.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def build_model(
    arch: str = "small",
    norm: str = "bn",
    p: float = 2.0,
    input_shape: tuple[int, int, int] = (1, 8, 8),
    num_classes: int = 10,
    width: int | None = None,
) -> nn.Sequential:
    """A VGG-style network; convolutions are named ``conv1, conv2, ...``, the last layer ``classifier``."""
    if arch not in ARCHS:
        raise UserError(f"unknown model {arch!r}: use one of {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise UserError(f"unknown normalization {norm!r}: use one of {', '.join(NORMS)}")
    width = DEFAULT_WIDTH[arch] if width is None else width
    if width < 1:
        raise UserError(f"width must be positive, got {width}")
    channels, size = input_shape[0], min(input_shape[1], input_shape[2])
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    index = 0
    for item in ARCHS[arch]:
        if item == "M":
            if size >= 2:
                layers[f"pool{index}"] = nn.MaxPool2d(2)
                size //= 2
            continue
        index += 1
        out = int(item) * width
        conv = nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False)
        if norm == "bn":
            normalization: nn.Module = LpBatchNorm2d(out, p=p)
        else:
            # without a division by the batch's spread the signal must keep its scale through
            # the layers: He initialization (the default init shrinks it about 6x per layer)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            normalization = MeanOnlyBatchNorm2d(out)
            if norm == "wn":
                weight_norm(conv)
            else:
                bounded_weight_norm(conv)
        layers[f"conv{index}"] = conv
        layers[f"norm{index}"] = normalization
        layers[f"relu{index}"] = nn.ReLU()
        channels = out
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["classifier"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The normalization-preceded convolutions, in order: the layers whose weight norm the
    experiments record (and, with batch-norm, the scale-invariant ones)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def is_last_layer_param(name: str) -> bool:
    """Whether a parameter name belongs to the last (classifier) layer."""
    return name.startswith("classifier.")
