"""`normbench stability --model` end to end through click's CliRunner: a built-in model, a model
defined in a test file (a layer scaling by 1000 before a batch-norm: L2 native fp16 must fail,
L1 not), the records' layer fields, resume, the headroom figure, and every bad option as one
line with exit code 2."""

from __future__ import annotations

import sys

import pytest
import torch
from click.testing import CliRunner

from normbench.cli import main
from normbench.results import read_results, schema_name

FAST = ["--dtype", "fp16", "--quick", "--quiet", "--device", "cpu"]

SCALED = """
import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def scaled():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Scale(1000.0), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def plain():
    return nn.Sequential(nn.Linear(3, 2))
"""


class Payload:
    """An object only an unpickler that runs code could rebuild."""


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False, prog_name="normbench")


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "usermodels.py"
    path.write_text(SCALED)
    return path


def test_builtin_model_end_to_end(tmp_path):
    out = tmp_path / "m.json"
    args = ["stability", "--model", "builtin:cnn", "--input-shape", "2x3x8x8", "--norm", "l2,l1", *FAST,
            "--compute", "native", "--output", str(out)]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    text = res.stdout
    for token in ("normbench stability --model", "norm1", "norm4", "LpBatchNorm2d", "headroom", "native pairwise fp16"):
        assert token in text, token
    assert text.index("norm1") < text.index("norm2") < text.index("norm4")  # network order
    records = read_results(out, schema=schema_name("stability")).records
    assert len(records) == 4 * 2  # four layers, two norms
    assert [r["layer"] for r in records[::2]] == ["norm1", "norm2", "norm3", "norm4"]
    for r in records:
        assert r["status"] == "ok" and r["layer_kind"] == "LpBatchNorm2d" and r["case"]["name"] == "layer"
        assert r["norm"] in ("l2", "l1") and r["kept"]["kept"] >= 1 and "powers of 2" in r["headroom_search"]
        assert r["headroom"] >= 1 if r["safe"] else r["headroom"] < 1
    again = invoke(args[:-2] + ["--output", str(out), "--resume"])
    assert again.exit_code == 0
    assert len(read_results(out).records) == len(records)  # nothing measured twice
    fig = invoke(["plot", "stability", str(out), "--output-dir", str(tmp_path / "fig")])
    assert fig.exit_code == 0, fig.output
    assert (tmp_path / "fig" / "stability_headroom.png").stat().st_size > 0


def test_transformer_layers_are_tested_in_their_own_family(tmp_path):
    out = tmp_path / "t.json"
    res = invoke(["stability", "--model", "builtin:transformer", "--input-shape", "2x4x64", "--norm", "l2,linf",
                  *FAST, "--compute", "framework", "--output", str(out)])
    assert res.exit_code == 0, res.output
    norms = {(r["layer"], r["norm"]) for r in read_results(out).records}
    assert norms == {("ln1", "layernorm"), ("ln1", "linf-layernorm"), ("rms", "rmsnorm"), ("rms", "linf-rmsnorm"),
                     ("ln_f", "layernorm"), ("ln_f", "linf-layernorm")}
    eps = {r["layer"]: r["eps"] for r in read_results(out).records}
    assert eps == {"ln1": 1e-5, "rms": 1e-6, "ln_f": 1e-5}  # each layer's own


def test_scaled_activations_fail_l2_native_fp16_but_not_l1(user_file, tmp_path):
    out = tmp_path / "s.json"
    res = invoke(["stability", "--model", f"{user_file}:scaled", "--input-shape", "4x3x8x8", "--norm", "l2,l1",
                  *FAST, "--compute", "native", "--output", str(out), "--fail-on", "overflow"])
    assert res.exit_code == 1, res.output  # --fail-on overflow trips on the L2 layer
    recs = {r["norm"]: r for r in read_results(out).records}
    assert recs["l2"]["overflow"] and recs["l2"]["headroom"] < 1
    assert recs["l1"]["safe"] and recs["l1"]["headroom"] >= 8
    assert "2: l2 overflows (statistic) in native pairwise fp16 at the current scale; l1 has" in res.stdout


def test_model_input_file_and_train_eval(tmp_path):
    x = tmp_path / "x.pt"
    torch.save(torch.randn(2, 3, 8, 8), x)
    out = tmp_path / "e.json"
    res = invoke(["stability", "--model", "builtin:resnet", "--model-input", str(x), "--eval", "--norm", "l1",
                  *FAST, "--compute", "framework", "--max-elements", "256", "--output", str(out)])
    assert res.exit_code == 0, res.output
    recs = read_results(out).records
    assert len(recs) == 8 and all(r["layer_statistics"] == "running" for r in recs)
    assert recs[0]["kept"] == {"unit": "channels", "kept": 2, "of": 16, "elements": 256, "of_elements": 2048,
                               "how": "half the largest, half the smallest spread"}


@pytest.mark.parametrize("args, words", [
    (["--model", "builtin:nope"], "unknown built-in model"),
    (["--model", "nocolon"], "name a model as"),
    (["--weights", "w.pt"], "--weights needs --model"),
    (["--model", "builtin:cnn", "--input-shape", "2x3x8x8", "--model-input", "x.pt"], "not both"),
    (["--model", "builtin:cnn", "--input-shape", "2x5x8x8"], "the forward or backward pass"),
    (["--model", "builtin:cnn", "--max-elements", "0"], "--max-elements must be positive"),
    (["--model", "builtin:cnn", "--input-shape", "big"], "bad shape"),
    (["--model", "builtin:cnn", "--model-input", "x.txt"], "--model-input x.txt: takes .pt, .pth, .npy, .npz"),
])
def test_bad_model_options_are_one_line(args, words):
    assert words in one_line_error(invoke(["stability", *args, *FAST]))


def test_user_file_errors_are_one_line(user_file, tmp_path, monkeypatch):
    assert "no normalization layer" in one_line_error(invoke(["stability", "--model", f"{user_file}:plain",
                                                              "--input-shape", "2x3", *FAST]))
    assert "no such file" in one_line_error(invoke(["stability", "--model", f"{tmp_path}/none.py:f", *FAST]))
    assert "give the input" in one_line_error(invoke(["stability", "--model", f"{user_file}:scaled", *FAST]))
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil)  # only code could rebuild it
    line = one_line_error(invoke(["stability", "--model", "builtin:cnn", "--weights", str(evil), *FAST]))
    assert "refused" in line
    monkeypatch.setitem(sys.modules, "torchvision", None)
    line = one_line_error(invoke(["stability", "--model", "torchvision:resnet18", *FAST]))
    assert "needs the torchvision package" in line
