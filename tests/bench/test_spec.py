"""The grid: defaults, presets, option parsing and the cells it expands to."""

from __future__ import annotations

import pytest
import torch

from normbench.bench.spec import PRESETS, QUICK_TIMING, make_spec
from normbench.errors import UserError


def test_default_grid_pairs_families_with_their_shapes():
    spec = make_spec()
    cells = spec.cells("cpu")
    for c in cells:
        if c.norm.family == "batchnorm":
            assert len(c.shape) == 4
        else:
            assert c.norm.family in ("layernorm", "rmsnorm") and len(c.shape) == 2
    assert {c.impl for c in cells} == {"torch", "eager", "analytic", "paper", "fused"}


def test_quick_grid_leaves_out_compiling_impls_unless_named():
    assert "fused" not in {c.impl for c in make_spec(quick=True).cells("cpu")}
    assert "fused" in {c.impl for c in make_spec(quick=True, impl="torch,fused").cells("cpu")}


def test_torch_cells_carry_the_l2_norm_once_and_come_first():
    spec = make_spec(norm="l2,l1,linf", impl="eager,torch", dtype="fp32", shape="8x4x5x5", pass_="fwd")
    cells = spec.cells("cpu")
    assert [(c.norm.name, c.impl) for c in cells] == [
        ("l2", "torch"), ("l2", "eager"), ("l1", "eager"), ("linf", "eager")]


def test_explicit_norms_go_to_the_groups_of_their_family():
    spec = make_spec(norm="l1,l1-layernorm", dtype="fp32", pass_="fwd", impl="eager")
    by_group = {}
    for c in spec.cells("cpu"):
        by_group.setdefault(c.group, set()).add(c.norm.name)
    assert sorted(by_group.values(), key=sorted) == [{"l1"}, {"l1-layernorm"}]
    # a norm no group is made for runs on every group
    spec = make_spec(norm="groupnorm", preset="transformer", impl="torch", dtype="fp32", pass_="fwd")
    assert {c.norm.name for c in spec.cells("cpu")} == {"groupnorm"}


def test_presets():
    r50 = [g.name for g in PRESETS["resnet50"]]
    assert r50 == ["resnet50 b32", "resnet50 b256"]
    assert (32, 64, 112, 112) in PRESETS["resnet50"][0].shapes and (256, 2048, 7, 7) in PRESETS["resnet50"][1].shapes
    hidden = [s[1] for s in PRESETS["transformer"][0].shapes]
    assert hidden[0] == 1024 and hidden[-1] == 16384
    spec = make_spec(preset="transformer", impl="torch", dtype="bf16", pass_="fwd")
    assert {c.norm.family for c in spec.cells("cpu")} == {"layernorm", "rmsnorm"}


def test_options_parse_into_the_spec():
    spec = make_spec(norm="top10", impl="analytic", dtype="fp16,fp64", shape="2x3x4x4, 2x3x4x4", pass_="bwd",
                     mode="eval,train", memory_format="channels_last", device="cpu", quick=True, threads=1)
    assert spec.groups[0].shapes == ((2, 3, 4, 4),)
    assert spec.dtypes == ("fp16", "fp64") and spec.passes == ("bwd",) and spec.modes == ("eval", "train")
    assert spec.timing == QUICK_TIMING and spec.threads == 1 and spec.malloc == "steady"
    assert {c.dtype for c in spec.cells()} == {torch.float16, torch.float64}


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="l3"), "unknown norm"),
    (dict(impl="fastest"), "unknown impl"),
    (dict(dtype="fp7"), "unknown dtype"),
    (dict(shape="32xq"), "bad shape"),
    (dict(preset="vgg"), "unknown preset"),
    (dict(pass_="sideways"), "unknown pass"),
    (dict(mode="test"), "unknown mode"),
    (dict(memory_format="nhwc"), "unknown memory-format"),
    (dict(shape="8x4", preset="transformer"), "not both"),
    (dict(norm="l1", shape="5"), "2 to 5 dimensions"),
    (dict(threads=0), "--threads"),
    (dict(malloc="jemalloc"), "unknown malloc"),
    (dict(impl=","), "at least one"),
])
def test_bad_values_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_spec(**kwargs)


def test_a_registered_implementation_joins_the_default_grid():
    from normbench.bench.impls import IMPLS, Impl, register

    register(Impl("extra_test", "test", build=IMPLS["eager"].build))
    try:
        assert "extra_test" in make_spec().impls
        assert "extra_test" in {c.impl for c in make_spec(quick=True).cells("cpu")}
    finally:
        IMPLS.pop("extra_test")
    assert "extra_test" not in make_spec().impls
