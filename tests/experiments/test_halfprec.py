"""The half-precision experiment's grid, configuration, and verdict (on synthetic records with a
known answer), and a real training run of one cell."""

from __future__ import annotations

import math

import pytest

from normbench.errors import UserError
from normbench.experiments import halfprec as hp
from normbench.experiments.data import load_dataset
from normbench.experiments.runner import config_hash


def _config(**changes) -> hp.HalfprecConfig:
    cfg = hp.quick_config()
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_grid_has_every_cell_once_and_fp32_runs_have_no_dtype():
    cfg = hp.default_config()
    runs = hp.grid(cfg)
    # per seed, norm and scale: fp32 + framework + native x 2 orders; natural: fp32 + native x 2 at scale 1
    assert len(runs) == 3 * 3 * 5 * 4 + 3 * 3 * 3
    keys = [tuple(r.fields().items()) for r in runs]
    assert len(set(keys)) == len(keys)
    fp32 = [r for r in runs if r.compute == "fp32"]
    assert all(r.dtype == "fp32" and r.reduction is None and r.storage == "fp32" for r in fp32)
    assert all(r.reduction is None for r in runs if r.compute == "framework")
    assert {r.regime for r in runs} == {"wd_on", "wd_off"}
    assert all(r.scale == 1.0 for r in runs if r.regime == "wd_off")
    hashes = {config_hash(hp.run_config(cfg, r)) for r in runs}
    assert len(hashes) == len(runs)


def test_fp8_runs_compute_in_fp16():
    cfg = _config(dtypes=["fp8_e4m3"])
    native = [r for r in hp.grid(cfg) if r.compute == "native"]
    assert native and all(r.fields()["compute_dtype"] == "fp16" for r in native)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"norms": ["l3"]}, "norm"),
        ({"norms": ["layernorm"]}, "batch-norm"),
        ({"dtypes": ["fp64"]}, "dtype"),
        ({"computes": ["exact"]}, "compute"),
        ({"reductions": ["tree"]}, "reduction"),
        ({"scales": [0.0]}, "scale"),
        ({"scales": [-10.0]}, "scale"),
        ({"scales": [math.inf]}, "scale"),
        ({"storage": "fp8_e4m3"}, "storage"),
        ({"norms": []}, "no norm"),
    ],
)
def test_bad_configuration_is_a_user_error(changes, match):
    with pytest.raises(UserError, match=match):
        _config(**changes).validate()


def test_top_k_larger_than_the_smallest_channel_is_refused():
    cfg = _config(norms=["top100000"])
    data = load_dataset("digits", train_size=400)
    smallest = hp.smallest_channel(cfg.training, data)
    assert smallest == 32 * 4 * 4  # batch 32 at the 4x4 stage of the small model on 8x8 digits
    with pytest.raises(UserError, match="larger than the smallest batch-norm channel"):
        cfg.check_fits(data)
    _config(norms=[f"top{smallest}"]).check_fits(data)


def _rec(norm, compute, scale, seed, acc, diverged=False, reduction=None, dtype=None, event=None, regime="wd_on"):
    dtype = dtype or ("fp32" if compute == "fp32" else "fp16")
    if compute == "native" and reduction is None:
        reduction = "pairwise"
    return {"regime": regime, "norm": norm, "k": None, "compute": compute, "dtype": dtype, "reduction": reduction,
            "storage": "fp32", "scale": scale, "seed": seed, "status": "ok", "diverged": diverged,
            "first_nonfinite": event, "final": {"test_acc": None if diverged else acc}, "epochs": []}


def _grid_records(native_acc):
    """fp32 runs at 0.95 +- 0.01 over seeds; native accuracy from ``native_acc(norm, scale, seed)``
    (None: diverged)."""
    out = []
    for seed, jitter in zip((0, 1, 2), (-0.01, 0.0, 0.01)):
        for norm in ("l2", "l1"):
            for scale in (1.0, 100.0, 1e4):
                out.append(_rec(norm, "fp32", scale, seed, 0.95 + jitter))
                acc = native_acc(norm, scale, seed)
                event = {"step": 0, "layer": "norm1", "quantity": "statistic"} if acc is None or acc < 0.2 else None
                out.append(_rec(norm, "native", scale, seed, acc, diverged=acc is None, event=event))
    return out


def test_verdict_l2_fails_and_l1_trains_there():
    def acc(norm, scale, seed):
        if norm == "l2" and scale >= 100:
            return 0.1  # dead, not diverged: an overflowed D turns the layer off
        if norm == "l1" and scale >= 1e4:
            return None
        return 0.95 + (seed - 1) * 0.01 - 0.002
    (v,) = hp.verdicts(_grid_records(acc))
    assert v["first_failing_scale"] == {"l2": 100.0, "l1": 1e4}
    assert v["status"]["l1"]["100"] == "trains"
    assert "L2 fails from scale 100" in v["text"] and "first non-finite: statistic of norm1 at step 0" in v["text"]
    assert "at 100 L1 trains within seed noise of fp32" in v["text"]
    assert "L1 fails from 10000 (diverged on 3 of 3 seeds" in v["text"]


def test_verdict_says_when_l2_never_fails():
    (v,) = hp.verdicts(_grid_records(lambda norm, scale, seed: 0.95 + (seed - 1) * 0.01))
    assert v["first_failing_scale"] == {"l2": None, "l1": None}
    assert "L2 does not fail at any scale tried (up to 10000)" in v["text"]
    assert "L1 does not fail up to 10000" in v["text"]


def test_verdict_says_when_l1_fails_with_l2():
    (v,) = hp.verdicts(_grid_records(lambda norm, scale, seed: None if scale >= 100 else 0.95))
    assert "at 100 L1 fails too (diverged on 3 of 3 seeds" in v["text"]


def test_a_small_loss_within_noise_trains_a_large_one_fails():
    noise_recs = _grid_records(lambda norm, scale, seed: 0.95 + (seed - 1) * 0.01 - (0.05 if scale == 1e4 else 0.005))
    (v,) = hp.verdicts(noise_recs)
    assert v["status"]["l1"] == {"1": "trains", "100": "trains", "10000": "fails"}
    assert hp.seed_noise(noise_recs) == pytest.approx(0.01)


def test_noise_with_one_seed_comes_from_the_scales():
    recs = [_rec("l2", "fp32", s, 0, a) for s, a in ((1.0, 0.90), (10.0, 0.92), (100.0, 0.94))]
    assert hp.seed_noise(recs) == pytest.approx(0.02)
    assert hp.seed_noise(recs, one_seed=False) is None
    assert hp.seed_noise(recs, test_size=10) == pytest.approx(0.1)  # at least one test image


def test_control_reports_the_spread_over_scales():
    recs = [_rec("l1", "fp32", s, seed, a) for seed in (0, 1) for s, a in ((1.0, 0.90 + seed / 100), (1e3, 0.93))]
    control = hp.fp32_control(recs)
    assert control["spread"]["l1"] == pytest.approx(0.03)


def test_one_native_run_trains_and_records_what_it_saw(tmp_path):
    cfg = _config(norms=["l2"], scales=[1000.0], computes=["native"], reductions=["pairwise"], natural=False)
    cfg.training.epochs = 1
    cfg.training.train_size = 100
    (record,) = hp.run(cfg, cache_dir=tmp_path)
    assert record["compute"] == "native" and record["scale"] == 1000.0
    # deviations near 1000 square past 65504: D overflows on the first step and the layer outputs its bias
    assert record["first_nonfinite"] == {"step": 0, "layer": "norm1", "quantity": "statistic"}
    entry = record["epochs"][0]
    assert set(entry["norm_layers"]) == {"norm1", "norm2", "norm3", "norm4"}
    assert entry["norm_layers"]["norm1"]["max_deviation"] > 256
    (again,) = hp.run(cfg, cache_dir=tmp_path)
    assert again["cached"] and again["epochs"] == record["epochs"]


def test_worker_processes_give_the_same_records(tmp_path):
    import torch

    cfg = _config(norms=["l1"], scales=[1.0, 100.0], computes=["native", "fp32"], reductions=["pairwise"],
                  natural=False)
    cfg.training.epochs = 1
    cfg.training.train_size = 100
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = hp.run(cfg, jobs=1)
        two = hp.run(cfg, cache_dir=tmp_path, jobs=2)
    finally:
        torch.set_num_threads(threads)
    drop = ("train_seconds", "cached")
    assert [{k: v for k, v in r.items() if k not in drop} for r in one] == \
        [{k: v for k, v in r.items() if k not in drop} for r in two]
    assert len(list(tmp_path.glob("*.json"))) == 4  # the workers filled the cache
