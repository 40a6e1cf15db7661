"""Figures of profile results, from hand-made records (plots never measure)."""

from __future__ import annotations

import json

import pytest

from normbench.errors import UserError
from normbench.plots.profile import plot_profile, plot_profile_file


def record(group, shape, norm, impl, dtype="fp32", pass_="fwd", t=1e-3, status="ok"):
    nbytes = 8_000_000
    return {
        "norm": norm, "impl": impl, "dtype": dtype, "shape": shape, "group": group, "pass": pass_,
        "mode": "train", "memory_format": "contiguous", "device": "cpu", "status": status,
        "reason": None if status == "ok" else "why", "time_median_s": t if status == "ok" else None,
        "time_iqr_s": t / 10 if status == "ok" else None, "repeats": 10, "bytes": nbytes,
        "gbps": nbytes / t / 1e9 if status == "ok" else None, "peak_gbps": 20.0,
    }


RECORDS = [
    record("resnet50 b32", "32x64x56x56", "l2", "torch"),
    record("resnet50 b32", "32x64x56x56", "l1", "eager", t=2e-3),
    record("resnet50 b32", "32x256x14x14", "l2", "torch", dtype="bf16", pass_="fwd+bwd"),
    record("resnet50 b32", "32x256x14x14", "l1", "paper", status="skipped"),
    record("transformer 4096 rows", "4096x1024", "layernorm", "torch"),
]


@pytest.mark.parametrize("metric", ["gbps", "time"])
def test_one_figure_per_shape_group_in_each_format(tmp_path, metric):
    paths = plot_profile(RECORDS, tmp_path, formats=("png", "svg"), metric=metric)
    assert sorted(p.name for p in paths) == [
        "profile-resnet50-b32.png", "profile-resnet50-b32.svg",
        "profile-transformer-4096-rows.png", "profile-transformer-4096-rows.svg"]
    for p in paths:
        assert p.stat().st_size > 1000
    assert (tmp_path / "profile-resnet50-b32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "profile-resnet50-b32.svg").read_text()
    assert "copy bandwidth" in svg or "speed of light" in svg
    assert "l1 eager" in svg and "l1 paper" not in svg  # skipped cells are not drawn


def test_bad_metric_or_format():
    with pytest.raises(ValueError):
        plot_profile(RECORDS, ".", metric="flops")
    with pytest.raises(ValueError):
        plot_profile(RECORDS, ".", formats=("gif",))


def test_files_of_other_commands_or_without_measurements_are_user_errors(tmp_path):
    other = tmp_path / "s.json"
    other.write_text(json.dumps({"schema": "normbench.stability/1", "environment": {}, "records": RECORDS}))
    with pytest.raises(UserError, match="expected normbench.profile/1"):
        plot_profile_file(other, tmp_path)
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"schema": "normbench.profile/1", "environment": {}, "records": [RECORDS[3]]}))
    with pytest.raises(UserError, match="no measured"):
        plot_profile_file(empty, tmp_path)
    good = tmp_path / "g.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert len(plot_profile_file(good, tmp_path / "out")) == 2
