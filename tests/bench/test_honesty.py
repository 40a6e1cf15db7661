"""The honesty-check script runs and reports both timers (its numbers are for docs, not asserted)."""

from __future__ import annotations

from normbench.bench.honesty import main, parse_cell


def test_parse_cell():
    cell = parse_cell("top10,analytic,bf16,32x64x56x56,fwd+bwd")
    assert (cell.norm.name, cell.impl, cell.shape, cell.pass_, cell.mode) == (
        "top10", "analytic", (32, 64, 56, 56), "fwd+bwd", "train")


def test_main_prints_both_timers_and_a_ratio(capsys):
    main(["--cell", "l2,torch,fp32,4x3x2x2,fwd", "--rounds", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("torch ") and "ratio" in lines[1]
    fields = lines[2].split()
    assert fields[:5] == ["l2", "torch", "fp32", "4x3x2x2", "fwd"]
    assert float(fields[-1]) > 0


def test_both_timers_time_the_runners_cold_rotation_or_its_warm_call(capsys):
    from normbench.bench.honesty import compare

    from normbench.kernels.machine import last_level_cache_total

    cell = parse_cell("l2,torch,fp32,64x64x16x16,fwd")  # 4 MiB: 16 copies hold twice a 32 MiB cache
    cold = compare(cell, rounds=1, min_run_time=0.01)
    assert cold.cache == "cold" and cold.copies >= 2
    assert cold.evicts or cold.copies * 4 * 2**20 >= 2 * last_level_cache_total()  # evicts: a larger cache
    warm = compare(cell, rounds=1, min_run_time=0.01, cache="warm")
    assert warm.cache == "warm" and warm.copies == 1 and not warm.evicts
    main(["--cell", "l2,torch,fp32,4x3x2x2,fwd", "--rounds", "1", "--warm-cache"])
    out = capsys.readouterr().out
    assert "warm cache" in out.splitlines()[0] and "*" not in out
