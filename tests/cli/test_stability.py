"""`normbench stability` through click's CliRunner and a subprocess: --quick, --input (pt, npy,
a refused pickle), every output format and --resume, --fail-on, bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from normbench.cli import main
from normbench.results import read_results, schema_name

SMALL = ["--norm", "l2,l1", "--dtype", "fp16", "--case", "deviation,tiny", "--quick", "--quiet", "--device", "cpu"]


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False, prog_name="normbench")


def one_line_error(res):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def test_quick_default_grid_prints_the_table_and_streams_json(tmp_path):
    out = tmp_path / "s.json"
    res = invoke(["stability", "--quick", "--quiet", "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "normbench stability" in text and "safe sigma" in text
    for token in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32", "native", "framework", "ovf@statistic"):
        assert token in text, token
    assert "arithmetic runs in fp16" in text  # says how fp8 is computed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "normbench.stability/1" and doc["environment"]["device"] == "cpu"
    recs = doc["records"]
    assert len(recs) > 500 and all(r["status"] == "ok" for r in recs)
    dev = [r for r in recs if r["case"]["name"] == "deviation" and r["case"]["value"] == 260.0
           and r["dtype"] == "fp16" and r["compute"] == "native"]
    verdict = {r["norm"]: r["overflow_stage"] for r in dev}
    assert verdict == {"l2": "statistic", "l1": None, "linf": None}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_other_formats_and_resume(tmp_path, suffix):
    out = tmp_path / f"s{suffix}"
    res = invoke(["stability", *SMALL, "--output", str(out)])
    assert res.exit_code == 0, res.output
    first = read_results(out, schema=schema_name("stability")).records
    assert len(first) == 2 * 2 * 3  # norms x computes x (deviation 250, 260, tiny)
    res = invoke(["stability", *SMALL, "--norm", "l2,l1,linf", "--output", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    again = read_results(out, schema=schema_name("stability")).records
    assert len(again) == 3 * 2 * 3  # only the linf cells were added
    keys = [(r["norm"], r["compute"], json.dumps(r["case"], sort_keys=True)) for r in again]
    assert len(set(keys)) == len(keys)


def test_input_pt_and_npy(tmp_path):
    g = torch.Generator().manual_seed(3)
    torch.save({"block1": torch.randn(8, 4, 16, generator=g) * 400, "head": torch.randn(16, 32, generator=g)},
               tmp_path / "acts.pt")
    res = invoke(["stability", "--input", str(tmp_path / "acts.pt"), "--dtype", "fp16", "--compute", "native",
                  "--quiet", "--output", str(tmp_path / "u.json")])
    assert res.exit_code == 0, res.output
    recs = json.loads((tmp_path / "u.json").read_text())["records"]
    assert {r["case"]["key"] for r in recs} == {"block1", "head"}  # --input alone: only the user's tensors
    block1 = {r["norm"]: r for r in recs if r["case"]["key"] == "block1"}
    assert block1["l2"]["overflow"] and not block1["l1"]["overflow"]  # deviations of ~1000 in fp16
    assert "your tensors" in res.stdout and "acts.pt[block1]" in res.stdout and "overflow@statistic" in res.stdout

    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32))
    res = invoke(["stability", "--input", str(tmp_path / "a.npy"), "--case", "tiny", "--dtype", "bf16",
                  "--norm", "linf", "--quiet"])
    assert res.exit_code == 0, res.output
    recs_text = res.stdout
    assert "your tensors" in recs_text and "a.npy" in recs_text and "tiny" in recs_text  # --case adds to --input


class Pickled:
    def __init__(self) -> None:
        self.t = torch.ones(2)


def test_refused_pickle_is_one_line_and_nonzero(tmp_path):
    torch.save(Pickled(), tmp_path / "model.pt")
    line = one_line_error(invoke(["stability", "--input", str(tmp_path / "model.pt"), "--quiet"]))
    assert "refused" in line and "unpickling" in line


@pytest.mark.parametrize("args, words", [
    (["--dtype", "fp99"], "unknown dtype"),
    (["--dtype", "fp64"], "stability measures"),
    (["--norm", "l3"], "unknown norm"),
    (["--compute", "gpu"], "compute"),
    (["--reduction", "random"], "reduction"),
    (["--case", "nope"], "unknown case"),
    (["--fail-on", "sometimes"], "--fail-on"),
    (["--fail-on", "error:-3"], "positive"),
    (["--resume"], "--resume needs --output"),
    (["--output", "x.txt"], "results files end in"),
    (["--eps", "nan"], "eps"),
    (["--device", "tpu"], "unknown device"),
    (["--input", "missing.pt"], "no such file"),
    (["--shape", "8"], "2 to 5 dimensions"),
    (["--shape", "8xq"], "bad shape"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, words):
    if "--output" in args:
        args = [a if a != "x.txt" else str(tmp_path / "x.txt") for a in args]
    line = one_line_error(invoke(["stability", "--quick", "--quiet", *args]))
    assert words in line


def test_fail_on(tmp_path):
    res = invoke(["stability", *SMALL, "--compute", "native", "--fail-on", "overflow"])
    assert res.exit_code == 1 and "fail-on overflow" in res.stderr  # L2 overflows at deviation 260
    res = invoke(["stability", *SMALL, "--norm", "l1", "--case", "tiny", "--fail-on", "overflow,error:64"])
    assert res.exit_code == 0, res.output
    res = invoke(["stability", *SMALL, "--norm", "l1", "--case", "tiny", "--fail-on", "error:0.01"])
    assert res.exit_code == 1


def test_subprocess_quick_and_plot(tmp_path):
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "-m", "normbench", "stability", "--norm", "l2,linf", "--dtype", "fp16,bf16", "--case",
           "gauss", "--quick", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "safe sigma" in proc.stdout and "\x1b[" not in proc.stderr  # no progress bar without a TTY
    proc = subprocess.run([sys.executable, "-m", "normbench", "plot", "stability", str(out), "--output-dir",
                           str(tmp_path / "fig")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fig" / "stability.png").stat().st_size > 10_000


def test_fail_on_error_counts_cells_whose_output_is_not_finite():
    """Constant channels with eps=1e-12 in fp16: eps rounds to 0 and 0/0 gives NaN (framework: in
    the gradient, native: everywhere). Such a cell has no error in ulps; error:N fails it whatever N."""
    res = invoke(["stability", "--norm", "l2", "--dtype", "fp16", "--case", "constant", "--eps", "1e-12", "--quick",
                  "--quiet", "--fail-on", "error:1e30"])
    assert res.exit_code == 1, res.output
    assert "fail-on error:1e30: 2 of 2 cells fail" in res.stderr


def _error_on_l1(monkeypatch):
    """Make every l1 cell raise an exception that is no reason to skip (a status "error" record)."""
    import normbench.numerics.runner as runner

    real = runner._measure

    def measure(cell, group, spec):
        if cell.norm.name == "l1":
            raise RuntimeError("boom")
        return real(cell, group, spec)

    monkeypatch.setattr(runner, "_measure", measure)


ERROR_LINE = '6 cells ended in an error (status "error" in the results); exit code 1.'


def test_an_error_cell_exits_1_after_writing_everything(tmp_path, monkeypatch):
    _error_on_l1(monkeypatch)
    out = tmp_path / "s.json"
    res = invoke(["stability", *SMALL, "--output", str(out)])
    assert res.exit_code == 1, res.output
    recs = read_results(out, schema=schema_name("stability")).records
    assert len(recs) == 12 and sum(r["status"] == "error" for r in recs) == 6  # every cell is in the file
    assert "normbench stability" in res.stdout and "cells failed with an error" in res.stdout  # and the table
    assert res.stderr.strip().splitlines()[-1] == ERROR_LINE
    # --fail-on counts them as failing cells too; the error line stays the last one
    res = invoke(["stability", *SMALL, "--fail-on", "error:1e30"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-2].startswith("fail-on error:1e30: 6 of 12 cells fail") and lines[-1] == ERROR_LINE


def test_plot_stability_of_a_file_with_an_error_cell_draws_it_and_exits_1(tmp_path, monkeypatch):
    _error_on_l1(monkeypatch)
    out = tmp_path / "s.jsonl"
    assert invoke(["stability", *SMALL, "--case", "gauss", "--output", str(out)]).exit_code == 1
    res = invoke(["plot", "stability", str(out), "--output-dir", str(tmp_path / "fig")])
    assert res.exit_code == 1, res.output
    assert (tmp_path / "fig" / "stability.png").stat().st_size > 10_000
    n_errors = sum(r["status"] == "error" for r in read_results(out).records)
    assert res.stderr.strip().splitlines()[-1].startswith(f'{n_errors} cells ended in an error')


@pytest.mark.parametrize("args", [
    ["--shape", "2x3", "--case", "gauss", "--norm", "top10"],
    ["--norm", "top5-layernorm", "--shape", "4x3x2", "--case", "gauss,constant"],
])
def test_top_k_larger_than_its_statistic_is_skipped_not_a_traceback(args):
    """top-k with fewer than k values per statistic: every cell skipped with its reason, the table
    printed, exit 0 (the summary's analytic bounds used to raise a ValueError: a traceback)."""
    res = invoke(["stability", "--quick", "--quiet", "--dtype", "fp16", *args])
    assert res.exit_code == 0, res.output
    assert "cells skipped: top-" in res.stdout and "needs at least" in res.stdout
