"""Datasets for the equivalence experiments, as in-memory float tensors.

- ``digits``: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), shipped inside
  the scikit-learn package, so the default experiment runs offline with no download.
- ``mnist``: the IDX files of MNIST (``train-images-idx3-ubyte`` etc., optionally ``.gz``) in a
  local ``data_dir``.
- ``cifar10``: the binary version of CIFAR-10 (``data_batch_1.bin`` ... ``test_batch.bin``, as in
  ``cifar-10-batches-bin/``) in a local ``data_dir``.

MNIST and CIFAR-10 are read byte by byte from their documented raw formats: nothing is
unpickled and nothing is downloaded. Images are standardized with the training set's mean and
standard deviation (per colour channel). Label noise and a smaller training set are applied
with a data seed of their own, so every regime and every run seed sees the same data.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch

from normbench.errors import UserError

DATASETS = ("digits", "mnist", "cifar10")


@dataclass
class Dataset:
    """A classification dataset in memory: images ``(N, C, H, W)`` float32, labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    # per colour channel, the standardized value of a 0 pixel (what an augmentation's canvas is filled with)
    background: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _digits(test_fraction: float, data_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise UserError("the digits dataset needs scikit-learn (pip install scikit-learn)") from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # digits has no official split: a fixed random one, stratification left to chance (180 per class).
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _open_maybe_gz(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.decompress(gz.read_bytes())
    raise UserError(f"{path}: not found (nor {gz.name})")


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (MNIST's format: magic 0x00 0x00 type ndim, big-endian int32 dims, data)."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(raw) != header + count:
        raise UserError(f"{path}: IDX header says {dims} ({count} bytes), file has {len(raw) - header}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.view(*dims).clone()


def _mnist(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    for sub in (data_dir, data_dir / "MNIST" / "raw", data_dir / "mnist"):
        if (sub / "train-images-idx3-ubyte").exists() or (sub / "train-images-idx3-ubyte.gz").exists():
            data_dir = sub
            break
    xtr = read_idx(data_dir / "train-images-idx3-ubyte").float().unsqueeze(1) / 255.0
    ytr = read_idx(data_dir / "train-labels-idx1-ubyte").long()
    xte = read_idx(data_dir / "t10k-images-idx3-ubyte").float().unsqueeze(1) / 255.0
    yte = read_idx(data_dir / "t10k-labels-idx1-ubyte").long()
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise UserError(f"{data_dir}: MNIST images and labels differ in count")
    return xtr, ytr, xte, yte


CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar_bin(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 binary batch: records of 1 label byte then 3x32x32 pixel bytes."""
    raw = _open_maybe_gz(path)
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise UserError(f"{path}: size {len(raw)} is not a multiple of the {CIFAR_RECORD}-byte CIFAR-10 record")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, CIFAR_RECORD)
    labels = data[:, 0].long()
    if int(labels.max()) > 9:
        raise UserError(f"{path}: labels above 9: not CIFAR-10")
    images = data[:, 1:].reshape(-1, 3, 32, 32).float() / 255.0
    return images, labels


def _cifar10(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if (data_dir / "cifar-10-batches-bin").is_dir():
        data_dir = data_dir / "cifar-10-batches-bin"
    train_files = sorted(data_dir.glob("data_batch_*.bin"))
    if not train_files:
        raise UserError(f"{data_dir}: no data_batch_*.bin (CIFAR-10 binary version) found")
    parts = [read_cifar_bin(f) for f in train_files]
    xtr = torch.cat([p[0] for p in parts])
    ytr = torch.cat([p[1] for p in parts])
    xte, yte = read_cifar_bin(data_dir / "test_batch.bin")
    return xtr, ytr, xte, yte


def load_dataset(
    name: str = "digits",
    data_dir: str | Path | None = None,
    train_size: int | None = None,
    label_noise: float = 0.0,
    data_seed: int = 0,
    test_fraction: float = 0.3,
) -> Dataset:
    """Load a dataset, standardize it, and optionally shrink the training set and randomize a
    fraction of its labels (``label_noise``: each chosen label replaced by a uniformly random class,
    so about 1/10 of them keep their class). ``data_seed`` fixes the split, subset and noise."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if not 0.0 <= label_noise <= 1.0:
        raise UserError(f"label noise must be in [0, 1], got {label_noise}")
    if name == "digits":
        xtr, ytr, xte, yte = _digits(test_fraction, data_seed)
    else:
        if data_dir is None:
            raise UserError(f"dataset {name} is read from a local --data-dir (nothing is downloaded)")
        path = Path(data_dir)
        if not path.is_dir():
            raise UserError(f"--data-dir {path}: not a directory")
        xtr, ytr, xte, yte = _mnist(path) if name == "mnist" else _cifar10(path)
    gen = torch.Generator().manual_seed(data_seed + 1)
    if train_size is not None:
        if not 0 < train_size <= len(ytr):
            raise UserError(f"train size must be in 1..{len(ytr)} for {name}, got {train_size}")
        keep = torch.randperm(len(ytr), generator=gen)[:train_size]
        xtr, ytr = xtr[keep], ytr[keep]
    num_classes = 10
    if label_noise > 0:
        ytr = ytr.clone()
        chosen = torch.rand(len(ytr), generator=gen) < label_noise
        ytr[chosen] = torch.randint(0, num_classes, (int(chosen.sum()),), generator=gen)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    background = (-mean / std).flatten()
    return Dataset(name, (xtr - mean) / std, ytr, (xte - mean) / std, yte, num_classes, background)
