"""The user's tensors as cases: .pt (weights_only), .npy, .npz; files that need unpickling of
code are refused."""

import numpy as np
import pytest
import torch

from normbench.errors import UserError
from normbench.numerics.inputs import load_inputs


def test_pt_tensor_and_dict(tmp_path):
    t = torch.randn(4, 3, 5)
    torch.save(t, tmp_path / "one.pt")
    (case,) = load_inputs(tmp_path / "one.pt")
    assert case.name == "file" and case.shape == (4, 3, 5)
    assert torch.equal(case.generate(), t.double())
    assert case.describe() == {"name": "file", "file": "one.pt", "shape": [4, 3, 5]}

    torch.save({"conv1": torch.randn(2, 3, 4, 4), "fc": torch.randn(8, 16), "flat": torch.randn(10)},
               tmp_path / "acts.pt")
    cases = load_inputs(tmp_path / "acts.pt")
    assert [c.param_dict["key"] for c in cases] == ["conv1", "fc", "flat"]
    assert cases[2].shape == (1, 1, 10)  # 1-D: one channel


def test_npy_and_npz(tmp_path):
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", a)
    (case,) = load_inputs(tmp_path / "a.npy")
    assert torch.equal(case.generate(), torch.from_numpy(a.astype(np.float64)))
    np.savez(tmp_path / "b.npz", x=a, y=np.ones((3, 3), dtype=np.int32))
    cases = load_inputs(tmp_path / "b.npz")
    assert [c.param_dict["key"] for c in cases] == ["x", "y"]


class Recording:
    """A user class: loading it needs unpickling of code."""

    def __init__(self) -> None:
        self.x = torch.ones(2, 2)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"rec": Recording(), "x": torch.ones(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="refused"):
        load_inputs(tmp_path / "bad.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="refused"):
        load_inputs(tmp_path / "obj.npy")


def test_bad_files(tmp_path):
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(UserError, match="takes"):
        load_inputs(tmp_path / "x.txt")
    with pytest.raises(UserError, match="no such file"):
        load_inputs(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError):
        load_inputs(tmp_path / "junk.pt")
    torch.save(torch.ones(2, 2, dtype=torch.bool), tmp_path / "bool.pt")
    with pytest.raises(UserError, match="real numbers"):
        load_inputs(tmp_path / "bool.pt")
