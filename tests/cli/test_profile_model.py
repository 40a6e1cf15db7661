"""`normbench profile --model`: the model's own norm-layer shapes profiled, and its training step
timed as it is and converted to each p (records of kind model_step), through CliRunner and the
library; bad options as one line with exit code 2."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from normbench.axes import parse_norms
from normbench.bench.model_step import KIND, convert_impl, model_step_records, step_verdicts
from normbench.bench.timing import CpuTimer, TimingSpec
from normbench.cli import main
from normbench.models import builtins
from normbench.results import read_results, schema_name

FAST_TIMING = TimingSpec(warmup_calls=1, min_repeats=3, max_repeats=3, min_time_s=0.0, max_time_s=10.0,
                         min_block_s=0.0, floor_repeats=1)


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False, prog_name="normbench")


def test_profile_model_end_to_end(tmp_path):
    out = tmp_path / "p.json"
    res = invoke(["profile", "--model", "builtin:resnet", "--input-shape", "2x3x8x8", "--quick", "--quiet",
                  "--dtype", "fp32", "--no-memory", "--impl", "torch,eager", "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    records = read_results(out, schema=schema_name("profile")).records
    layers = [r for r in records if r.get("kind") != KIND]
    steps = [r for r in records if r.get("kind") == KIND]
    # the resnet's batch-norm inputs at 8x8: the stem and layer1 at 16 channels, layer2 at 32 x 4x4
    assert {r["shape"] for r in layers} == {"2x16x8x8", "2x32x4x4"}
    assert {r["group"] for r in layers} == {"builtin:resnet batchnorm"}
    assert {r["norm"] for r in layers} == {"l2", "l1", "linf"}
    assert [r["norm"] for r in steps] == ["original", "l2", "l1", "linf"]
    for r in steps:
        assert r["status"] == "ok", r
        assert r["model"] == "builtin:resnet" and r["shape"] == "2x3x8x8" and r["dtype"] == "fp32"
        assert r["layer_impl"] == "eager" and len(r["times_s"]) == r["repeats"] > 0
        assert r["speedup_vs_original"] == pytest.approx(steps[0]["time_median_s"] / r["time_median_s"])
    assert steps[0]["converted_layers"] == 0 and steps[1]["converted_layers"] == 8
    assert "the model's training step" in res.stdout and "converting builtin:resnet to l1 batch-norm" in res.stdout


def test_a_model_without_batch_norm_has_nothing_to_convert():
    model = builtins.build("transformer")
    recs = model_step_records(model, torch.randn(2, 4, 64), "builtin:transformer", parse_norms("l1,linf,layernorm"),
                              "cpu", FAST_TIMING, CpuTimer())
    assert [r["norm"] for r in recs] == ["original", "l1", "linf"]  # layernorm is no batch-norm conversion
    assert recs[0]["status"] == "ok" and recs[0]["time_median_s"] > 0
    assert all(r["status"] == "skipped" and "no torch or normbench batch-norm" in r["reason"] for r in recs[1:])
    assert step_verdicts(recs) == []


class BreaksWhenConverted(nn.Module):
    """Trains as it is; converted (an LpBatchNorm2d inside), its second step raises."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if type(self.bn).__name__ != "BatchNorm2d" and self.calls > 1:
            raise RuntimeError("converted step broke")
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_a_variant_that_fails_later_is_an_error_and_the_others_are_timed():
    recs = model_step_records(BreaksWhenConverted(), torch.randn(2, 3, 6, 6), "test", parse_norms("l1"), "cpu",
                              FAST_TIMING, CpuTimer(), impl="eager")
    assert recs[0]["status"] == "ok" and recs[0]["repeats"] == 3
    assert recs[1]["status"] == "error" and "converted step broke" in recs[1]["reason"]


def test_convert_impl_takes_the_first_layer_implementation():
    assert convert_impl(None) == "auto" and convert_impl(["torch", "paper"]) == "auto"
    assert convert_impl(["torch", "analytic", "eager"]) == "analytic"


@pytest.mark.parametrize("args, words", [
    (["--model", "builtin:cnn", "--shape", "2x4x8x8"], "leave out --shape and --preset"),
    (["--model", "builtin:cnn", "--max-elements", "10"], "--max-elements applies to stability"),
    (["--input-shape", "2x3x8x8"], "--input-shape needs --model"),
    (["--model", "builtin:none"], "unknown built-in model"),
])
def test_bad_profile_model_options_are_one_line(args, words):
    res = invoke(["profile", *args, "--quick", "--quiet", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], res.stderr
