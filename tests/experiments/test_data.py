"""Datasets: digits from scikit-learn, and the raw MNIST / CIFAR-10 readers on files made here."""

import gzip

import pytest
import torch

from normbench.errors import UserError
from normbench.experiments.data import CIFAR_RECORD, load_dataset, read_cifar_bin, read_idx


def test_digits_default_split_and_standardization():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(float(d.x_train.mean())) < 1e-4
    assert set(d.y_train.tolist()) == set(range(10))


def test_train_size_and_label_noise_are_fixed_by_the_data_seed():
    clean = load_dataset("digits", train_size=300)
    noisy = load_dataset("digits", train_size=300, label_noise=0.5)
    again = load_dataset("digits", train_size=300, label_noise=0.5)
    assert len(noisy.y_train) == 300
    assert torch.equal(noisy.y_train, again.y_train)
    changed = float((noisy.y_train != clean.y_train).float().mean())
    assert 0.3 < changed < 0.6  # half randomized, a tenth of those keep their class
    assert torch.equal(noisy.y_test, clean.y_test)


def _idx(path, array: torch.Tensor, compress: bool) -> None:
    header = bytes([0, 0, 8, array.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + bytes(array.flatten().tolist())
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(20, dtype=torch.uint8) % 10
    _idx(tmp_path / "train-images-idx3-ubyte", images, compress)
    _idx(tmp_path / "train-labels-idx1-ubyte", labels, compress)
    _idx(tmp_path / "t10k-images-idx3-ubyte", images[:5], compress)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:5], compress)
    assert torch.equal(read_idx(tmp_path / "train-images-idx3-ubyte"), images)
    d = load_dataset("mnist", data_dir=tmp_path)
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(d.y_train, labels.long())


def test_cifar10_binary_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    def batch(n):
        labels = torch.randint(0, 10, (n, 1), generator=g, dtype=torch.uint8)
        pixels = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
        return labels, pixels, bytes(torch.cat([labels, pixels], 1).flatten().tolist())
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    l1, p1, raw1 = batch(6)
    _, _, raw2 = batch(4)
    _, _, raw_test = batch(3)
    (folder / "data_batch_1.bin").write_bytes(raw1)
    (folder / "data_batch_2.bin").write_bytes(raw2)
    (folder / "test_batch.bin").write_bytes(raw_test)
    images, labels = read_cifar_bin(folder / "data_batch_1.bin")
    assert torch.equal(labels, l1.flatten().long())
    assert torch.allclose(images[2, 1, 3, 4], p1[2, 1024 + 3 * 32 + 4].float() / 255)
    d = load_dataset("cifar10", data_dir=tmp_path)
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    (folder / "test_batch.bin").write_bytes(raw_test[:-1])
    with pytest.raises(UserError, match="multiple"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="data-dir"):
        load_dataset("mnist")
    with pytest.raises(UserError, match="not found"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(UserError, match="train size"):
        load_dataset("digits", train_size=10**6)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(UserError, match="IDX"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    assert CIFAR_RECORD == 3073
