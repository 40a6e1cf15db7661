import math

import pytest
import torch

from normbench.axes import (
    NormSpec,
    format_shape,
    parse_dtypes,
    parse_norm,
    parse_norms,
    parse_shapes,
    resolve_device,
)
from normbench.errors import UserError
from normbench.nn import LpBatchNorm1d, LpBatchNorm2d, LpGroupNorm, LpLayerNorm, LpRMSNorm


@pytest.mark.parametrize(
    "name,spec,canonical",
    [
        ("l2", NormSpec("batchnorm", 2.0), "l2"),
        ("L1", NormSpec("batchnorm", 1.0), "l1"),
        ("linf", NormSpec("batchnorm", math.inf), "linf"),
        ("top10", NormSpec("batchnorm", math.inf, 10), "top10"),
        ("top1", NormSpec("batchnorm", math.inf), "linf"),
        ("layernorm", NormSpec("layernorm", 2.0), "layernorm"),
        ("l1-rmsnorm", NormSpec("rmsnorm", 1.0), "l1-rmsnorm"),
        ("top4-groupnorm", NormSpec("groupnorm", math.inf, 4), "top4-groupnorm"),
        ("linf-ln", NormSpec("layernorm", math.inf), "linf-layernorm"),
    ],
)
def test_parse_norm(name, spec, canonical):
    assert parse_norm(name) == spec
    assert spec.name == canonical
    assert parse_norm(spec.name) == spec


@pytest.mark.parametrize("bad", ["l3", "top", "top0", "l1-foo", "", "l1-"])
def test_bad_norm(bad):
    with pytest.raises(UserError, match="unknown norm|top-k needs"):
        parse_norm(bad)


def test_lists_and_modules():
    assert [s.name for s in parse_norms("l2, l1,l2")] == ["l2", "l1"]
    assert parse_dtypes("fp16,bf16,float32") == [torch.float16, torch.bfloat16, torch.float32]
    assert parse_shapes("32x64x56x56,8x16") == [(32, 64, 56, 56), (8, 16)]
    assert format_shape((2, 3)) == "2x3"
    assert isinstance(parse_norm("l1").module((4, 8, 3, 3)), LpBatchNorm2d)
    assert isinstance(parse_norm("top2").module((4, 8)), LpBatchNorm1d)
    assert isinstance(parse_norm("layernorm").module((4, 8)), LpLayerNorm)
    assert isinstance(parse_norm("l1-rmsnorm").module((4, 8)), LpRMSNorm)
    gn = parse_norm("groupnorm").module((2, 48, 4, 4))
    assert isinstance(gn, LpGroupNorm) and gn.num_groups == 16
    assert isinstance(parse_norm("l1").torch_module((4, 8, 3, 3)), torch.nn.BatchNorm2d)
    assert parse_norm("l1").reduced_numel((4, 8, 3, 3)) == 36
    assert parse_norm("groupnorm").reduced_numel((2, 48, 4, 4)) == 48
    assert parse_norm("layernorm").reduced_numel((7, 5)) == 5


@pytest.mark.parametrize("fn,text,msg", [(parse_dtypes, "fp12", "unknown dtype"), (parse_shapes, "3xa", "bad shape"),
                                         (parse_shapes, "0x3", "bad shape"), (resolve_device, "tpu", "unknown device")])
def test_bad_axes(fn, text, msg):
    with pytest.raises(UserError, match=msg):
        fn(text)


def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
