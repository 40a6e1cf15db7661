"""Small models that ship with normbench (``--model builtin:NAME``), so that ``stability --model``
and ``profile --model`` run offline with no extra package. Each is built from a fixed seed (the
same weights on every run) and has a default input shape.

``cnn``
    the equivalence experiments' VGG-style network (:func:`normbench.experiments.models.build_model`,
    ``small``, normbench's ``LpBatchNorm2d`` with p=2) on 3x32x32 images;
``resnet``
    a small residual network with torch's ``BatchNorm2d``: a stem and three basic blocks (one
    with a strided 1x1 shortcut), in-place ReLUs as torchvision writes them;
``transformer``
    one pre-norm transformer block on ``(batch, tokens, 64)`` embeddings: ``LayerNorm`` before
    attention, ``RMSNorm`` before the MLP, a final ``LayerNorm``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from normbench.errors import UserError

SEED = 0


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (a strided 1x1 conv and BN when the shape
    changes), then ReLU: torchvision's ResNet block."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A stem (conv-BN-ReLU), three basic blocks (16, 16, 32 channels), average pool, linear."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, ``x + mlp(rms(x))``, ``ln_f``."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 256) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.rms = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.rms(x))
        return self.ln_f(x)


def _cnn() -> nn.Module:
    from normbench.experiments.models import build_model

    return build_model("small", "bn", p=2.0, input_shape=(3, 32, 32))


BUILTINS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "cnn": (_cnn, (8, 3, 32, 32), "the experiments' VGG-style CNN, normbench LpBatchNorm2d (p=2)"),
    "resnet": (SmallResNet, (8, 3, 32, 32), "a small ResNet, torch BatchNorm2d"),
    "transformer": (TransformerBlock, (4, 16, 64), "a pre-norm transformer block, LayerNorm and RMSNorm"),
}


def _check(name: str) -> None:
    if name not in BUILTINS:
        raise UserError(f"--model builtin:{name}: unknown built-in model; use one of "
                        f"{', '.join('builtin:' + n for n in BUILTINS)}")


def build(name: str) -> nn.Module:
    """The built-in model ``name``, its weights drawn from a fixed seed (the global RNG is left
    as it was)."""
    _check(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return BUILTINS[name][0]()


def input_shape(name: str) -> tuple[int, ...]:
    """The default input shape of the built-in model ``name``."""
    _check(name)
    return BUILTINS[name][1]
