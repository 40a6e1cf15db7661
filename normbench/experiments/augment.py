"""Training-set augmentation for the equivalence experiments: a task that keeps the weights busy.

On plain digits the network fits the training set within a few epochs, the gradients vanish and
weight decay has little to act on (docs/equivalence.md). Augmentation as a CIFAR pipeline does it
keeps the training loss from collapsing: every step sees images the network has not fitted yet.

An augmentation is given as a spec string of comma-separated ``key=value`` items:

- ``scale=F``: every image (train and test) is upscaled by the integer factor F (nearest
  neighbour), which gives a translation room in finer steps;
- ``shift=K``: every image is placed on a canvas K pixels larger on each side (filled with the
  background, the standardized value of a 0 pixel); a training image lands at a random offset in
  ``[0, 2K]`` per axis (a random translation by up to K pixels), a test image in the centre;
- ``noise=S``: Gaussian noise of standard deviation S (in standardized units) added to each
  training image.

Digits are never flipped (a mirrored 2 is no digit, a mirrored 6 is no 6). The random draws come
from a :class:`torch.Generator` that the caller seeds from the run seed, never from the global
RNG: the same seed gives the same augmented batches, in one process or on every rank of a
torchrun (each rank augments the whole global batch the same way, then takes its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normbench.errors import UserError

AUGMENT_KEYS = ("scale", "shift", "noise")


@dataclass(frozen=True)
class Augment:
    """A parsed augmentation spec (see the module doc)."""

    scale: int = 1
    shift: int = 0
    noise: float = 0.0

    def spec(self) -> str:
        """The canonical spec string (what the cache key holds): keys in a fixed order, defaults left out."""
        parts = []
        if self.scale != 1:
            parts.append(f"scale={self.scale}")
        if self.shift:
            parts.append(f"shift={self.shift}")
        if self.noise:
            parts.append(f"noise={self.noise:g}")
        return ",".join(parts)

    def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(C, H, W)`` of an augmented image whose original is ``shape``."""
        c, h, w = shape
        return c, h * self.scale + 2 * self.shift, w * self.scale + 2 * self.shift

    def _canvas(self, x: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
        """``x`` upscaled and centred on an empty canvas of :meth:`output_shape`."""
        if self.scale != 1:
            x = x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)
        n, c, h, w = x.shape
        k = self.shift
        canvas = torch.empty(n, c, h + 2 * k, w + 2 * k, dtype=x.dtype, device=x.device)
        canvas[:] = _background(background, c, x)
        canvas[:, :, k : k + h, k : k + w] = x
        return canvas

    def test_view(self, x: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
        """The test images: upscaled and centred on the canvas, no randomness."""
        if self == Augment():
            return x
        return self._canvas(x, background)

    def train_batch(
        self, x: torch.Tensor, generator: torch.Generator, background: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One augmented training batch: each image at its own random offset on the canvas, plus
        noise; vectorized over the batch. Draws from ``generator`` only (on the CPU, so that the
        draws do not depend on the device)."""
        if self == Augment():
            return x
        canvas = self._canvas(x, background)
        n, c, _, _ = canvas.shape
        h, w = x.shape[2] * self.scale, x.shape[3] * self.scale
        if self.shift:
            k = self.shift
            # a translation by (dy, dx) in [-k, k]: the crop of the padded canvas starting at (k+dy, k+dx)
            offsets = torch.randint(0, 2 * k + 1, (2, n), generator=generator)
            padded = torch.empty(n, c, h + 4 * k, w + 4 * k, dtype=x.dtype, device=x.device)
            padded[:] = _background(background, c, x)
            padded[:, :, k : k + h + 2 * k, k : k + w + 2 * k] = canvas
            rows = (offsets[0].view(n, 1) + torch.arange(h + 2 * k).view(1, -1)).to(x.device)
            cols = (offsets[1].view(n, 1) + torch.arange(w + 2 * k).view(1, -1)).to(x.device)
            batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
            canvas = padded[batch, chan, rows.view(n, 1, -1, 1), cols.view(n, 1, 1, -1)]
        if self.noise:
            noise = torch.randn(canvas.shape, generator=generator).to(device=x.device, dtype=x.dtype)
            canvas = canvas + self.noise * noise
        return canvas


def _background(background: torch.Tensor | None, channels: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel fill value, shaped to broadcast over ``(N, C, H, W)``."""
    if background is None:
        return torch.zeros(1, channels, 1, 1, dtype=like.dtype, device=like.device)
    return background.to(dtype=like.dtype, device=like.device).view(1, channels, 1, 1)


def parse_augment(text: str | None) -> Augment:
    """An :class:`Augment` from a spec such as ``"shift=2,noise=0.2"``; None or ``""`` or
    ``"none"`` is no augmentation. Bad specs raise a one-line :class:`UserError`."""
    if text is None or text.strip().lower() in ("", "none"):
        return Augment()
    values: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in AUGMENT_KEYS:
            raise UserError(f"augmentation {item!r}: use key=value with key one of {', '.join(AUGMENT_KEYS)}")
        try:
            values[key] = float(value)
        except ValueError:
            raise UserError(f"augmentation {item!r}: {value.strip()!r} is not a number") from None
    scale, shift, noise = values.get("scale", 1), values.get("shift", 0), values.get("noise", 0.0)
    if scale != int(scale) or not 1 <= scale <= 8:
        raise UserError(f"augmentation scale must be an integer in 1..8, got {scale:g}")
    if shift != int(shift) or not 0 <= shift <= 64:
        raise UserError(f"augmentation shift must be an integer in 0..64, got {shift:g}")
    if not (0 <= noise < float("inf")):
        raise UserError(f"augmentation noise must be a finite number >= 0, got {noise:g}")
    return Augment(int(scale), int(shift), float(noise))


def canonical_augment(text: str | None) -> str | None:
    """The canonical spec of ``text`` (None when it augments nothing), for configs and cache keys."""
    spec = parse_augment(text).spec()
    return spec or None
