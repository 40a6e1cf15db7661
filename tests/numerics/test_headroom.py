"""The headroom of a model layer's case (normbench.numerics.runner.headroom) on inputs with a
known answer: fp16 squares overflow at |x - mu| = 256 and the fp16 input itself at 65520."""

from __future__ import annotations

import torch

from normbench.numerics.cases import Case
from normbench.numerics.runner import KEY_FIELDS, LAYER_CASE, StabilitySpec, run
from normbench.results import ResultsWriter, schema_name


def _layer(max_dev: float) -> Case:
    """(8, 2, 16) per channel: one value at +max_dev, one at -max_dev, the rest +-1 in pairs, so
    the mean is exactly 0 and the largest deviation is max_dev."""
    x = torch.ones(8, 2, 16, dtype=torch.float64)
    x[:, :, 1::2] = -1.0
    x[0, :, 0], x[0, :, 1] = max_dev, -max_dev
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return Case(LAYER_CASE, (("layer", "features.7"), ("kind", "BatchNorm1d")), tuple(x.shape), 0, x, grad,
                "batchnorm", 1e-5, (("layer", "features.7"), ("layer_kind", "BatchNorm1d"), ("layer_index", 0)))


def _records(case: Case) -> dict[tuple[str, str], dict]:
    spec = StabilitySpec(norms=("l2", "l1"), dtypes=("fp16",), computes=("native", "framework"), cases=(),
                         layers=(case,))
    return {(r["norm"], r["compute"]): r for r in run(spec)}


def test_headroom_of_a_layer_with_max_deviation_16():
    recs = _records(_layer(16.0))
    l2 = recs[("l2", "native")]
    assert l2["layer"] == "features.7" and l2["layer_kind"] == "BatchNorm1d" and l2["safe"]
    # x8: deviations 128, squares 16384; x16: 256^2 = 65536 > the fp16 max 65504
    assert (l2["headroom"], l2["headroom_fails_at"], l2["headroom_exp"]) == (8.0, 16.0, 3)
    assert not l2["headroom_open"] and "powers of 2" in l2["headroom_search"]
    # no squares in L1, and framework statistics are float32: the fp16 input is the limit,
    # 16 x 2048 = 32768 fits, 16 x 4096 = 65536 rounds to inf
    for key in (("l1", "native"), ("l1", "framework"), ("l2", "framework")):
        assert (recs[key]["headroom"], recs[key]["headroom_fails_at"]) == (2048.0, 4096.0), key


def test_headroom_below_one_when_the_layer_fails_at_its_scale():
    recs = _records(_layer(512.0))
    l2 = recs[("l2", "native")]
    assert not l2["safe"] and l2["overflow_stage"] == "statistic"
    # it must shrink: 512 x 0.25 = 128 is safe, 512 x 0.5 = 256 overflows
    assert (l2["headroom"], l2["headroom_fails_at"]) == (0.25, 0.5)
    assert recs[("l1", "native")]["safe"] and recs[("l1", "native")]["headroom"] == 64.0


def test_layer_in_the_key_keeps_old_files_resumable(tmp_path):
    """A record written before ``layer`` joined the key fields (it has none) still matches."""
    old = {"norm": "l2", "impl": "normbench", "dtype": "fp16", "compute": "native", "compute_dtype": "fp16",
           "reduction": "pairwise", "eps": 1e-5, "case": {"name": "tiny", "shape": [2, 4, 2], "seed": 0},
           "status": "ok"}
    path = tmp_path / "old.json"
    ResultsWriter(path, schema_name("stability"), {"device": "cpu"}, KEY_FIELDS[:-1]).write(old)
    again = ResultsWriter(path, schema_name("stability"), {"device": "cpu"}, KEY_FIELDS, resume=True)
    assert again.has({k: v for k, v in old.items() if k != "status"})
    assert again.has({**old, "layer": None})  # what a generated case's record now carries
    assert not again.has({**old, "layer": "features.7"})
