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
