"""`normbench profile` and `normbench plot profile` through click's CliRunner and a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from normbench.cli import main
from normbench.results import read_results, schema_name

# --warm-cache: these tests are about the command's flow, not the timing; cold-cache timing of a tiny
# tensor reads an eviction buffer of twice the last-level cache before every sample, which on a
# machine reporting a large shared L3 (480 MiB here) costs seconds per cell
TINY = ["--shape", "4x3x2x2", "--impl", "torch,eager", "--norm", "l2,l1", "--dtype", "fp32", "--pass", "fwd",
        "--device", "cpu", "--warm-cache", "--no-memory", "--quiet"]


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False, prog_name="normbench")


def test_quick_run_writes_an_honest_results_file(tmp_path):
    out = tmp_path / "p.json"
    res = invoke(["profile", "--quick", "--device", "cpu", "--threads", "1", "--quiet", "--output", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "normbench.profile/1"
    env = doc["environment"]
    assert env["device"] == "cpu" and env["threads"] == 1 and "load_average_1m" in env
    assert env["malloc"].startswith(("steady", "system"))
    ok = [r for r in doc["records"] if r["status"] == "ok"]
    skipped = [r for r in doc["records"] if r["status"] == "skipped"]
    assert len(ok) >= 10
    assert all(r["reason"] for r in skipped)
    assert {(r["impl"], r["norm"]) for r in skipped} >= {("paper", "layernorm"), ("paper", "rmsnorm")}
    for r in ok:
        assert r["time_median_s"] > 0 and r["repeats"] >= 5 and r["time_iqr_s"] >= 0
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_median_s"] / 1e9)
        assert r["peak_gbps"] > 0 and r["sol_fraction"] == pytest.approx(r["gbps"] / r["peak_gbps"])
        assert r["saved_bytes"] > 0 and r["peak_memory_bytes"] is not None and r["peak_memory_bytes"] > 0
        assert r["speedup_vs_torch"] > 0 and r["threads"] == 1
    # the table: one per shape group, the fastest of each block marked
    assert "resnet50 b32 layer3" in res.output and "transformer 1024 rows" in res.output
    assert "▶" in res.output and "of copy bandwidth" in res.output
    assert "the paper's code has batch-norm layers only" in res.output


def test_tiny_grid_table_and_every_output_format(tmp_path):
    for suffix in (".json", ".jsonl", ".csv"):
        out = tmp_path / f"t{suffix}"
        res = invoke(["profile", *TINY, "--output", str(out)])
        assert res.exit_code == 0, res.output
        recs = read_results(out).records
        assert len(recs) == 3  # torch l2, eager l2, eager l1
        assert {r["impl"] for r in recs} == {"torch", "eager"}
    assert "custom" in res.output and "l1 eager" in res.output


def test_resume_keeps_finished_cells(tmp_path):
    out = tmp_path / "r.jsonl"
    assert invoke(["profile", *TINY, "--output", str(out)]).exit_code == 0
    first = read_results(out, schema=schema_name("profile")).records
    res = invoke(["profile", *TINY[:-2], "--norm", "l2,l1,linf", "--quiet", "--output", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    again = read_results(out).records
    assert again[:3] == first  # untouched
    assert [r["norm"] for r in again[3:]] == ["linf"]
    assert "1 cells measured, 4 in" in res.output


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp7"], "unknown dtype 'fp7'"),
    (["--norm", "l3"], "unknown norm 'l3'"),
    (["--impl", "fastest"], "unknown impl 'fastest'"),
    (["--pass", "sideways"], "unknown pass 'sideways'"),
    (["--shape", "32xq"], "bad shape '32xq'"),
    (["--preset", "vgg"], "unknown preset 'vgg'"),
    (["--shape", "4x3", "--preset", "transformer"], "not both"),
    (["--resume"], "--resume needs --output"),
    (["--output", "p.txt", "--shape", "4x3x2x2"], "results files end in"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--frobnicate"], "No such option"),
])
def test_bad_options_exit_2_with_one_line(args, message):
    res = CliRunner().invoke(main, ["profile", *args], prog_name="normbench")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.output


def test_plot_profile_subcommand(tmp_path):
    out = tmp_path / "p.json"
    assert invoke(["profile", *TINY, "--output", str(out)]).exit_code == 0
    res = invoke(["plot", "profile", str(out), "--output-dir", str(tmp_path / "figs"), "--format", "png,svg"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["profile-custom.png", "profile-custom.svg"]
    bad = CliRunner().invoke(main, ["plot", "profile", str(out), "--format", "gif"], prog_name="normbench")
    assert bad.exit_code == 2 and bad.output.startswith("Error: --format")


def test_subprocess_entry_point(tmp_path):
    out = tmp_path / "s.csv"
    run = subprocess.run([sys.executable, "-m", "normbench", "profile", *TINY, "--output", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(read_results(out).records) == 3
    bad = subprocess.run([sys.executable, "-m", "normbench", "profile", "--dtype", "fp7"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_ctrl_c_keeps_every_finished_cell(tmp_path, monkeypatch):
    import normbench.bench.runner as runner

    real = runner.build_timed_pass
    calls = []

    def interrupted_on_the_third(*args, **kwargs):  # torch l2, eager l2 (timed together), then eager l1
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "build_timed_pass", interrupted_on_the_third)
    out = tmp_path / "i.json"
    res = CliRunner().invoke(main, ["profile", *TINY, "--norm", "l2,l1,linf", "--output", str(out)],
                             prog_name="normbench")
    assert res.exit_code == 130
    assert res.output.strip().splitlines()[-1] == f"Aborted: every finished cell is in the output file {out}."
    kept = read_results(out, schema=schema_name("profile")).records
    assert [r["norm"] for r in kept] == ["l2", "l2"] and all(r["status"] == "ok" for r in kept)
    monkeypatch.setattr(runner, "build_timed_pass", real)
    res = invoke(["profile", *TINY[:-2], "--norm", "l2,l1,linf", "--quiet", "--output", str(out), "--resume"])
    assert res.exit_code == 0 and len(read_results(out).records) == 4


def test_table_shows_compile_time_only_for_implementations_that_compile():
    from rich.console import Console

    from normbench.cli.profile import render

    base = {"norm": "l1", "dtype": "fp32", "shape": "4x3x2x2", "group": "g", "pass": "fwd", "mode": "train",
            "memory_format": "contiguous", "device": "cpu", "status": "ok", "time_median_s": 1e-3,
            "time_iqr_s": 1e-4, "gbps": 1.0, "sol_fraction": 0.1, "peak_gbps": 10.0, "saved_bytes": 0,
            "peak_memory_bytes": 0, "speedup_vs_torch": 1.0, "threads": 1}
    console = Console(width=200, record=True)
    render([{**base, "impl": "eager", "compile_time_s": None}], console)
    assert "compile s" not in console.export_text()
    console = Console(width=200, record=True)
    render([{**base, "impl": "eager", "compile_time_s": None},
            {**base, "impl": "compiled", "compile_time_s": 12.5, "time_median_s": 5e-4}], console)
    text = console.export_text()
    assert "compile s" in text and "12.5" in text
    assert text.index("▶ l1 compiled") < text.index("l1 eager")  # fastest first, marked


def _error_on_l1(monkeypatch):
    """Turn every l1 cell's record into an error (as the runner records an unexpected exception),
    on its way from the runner to the results file."""
    import normbench.bench as bench

    real = bench.run

    def run(spec, on_record=None, **kwargs):
        def mark(record):
            if record["norm"] == "l1":
                record.update(status="error", reason="RuntimeError: boom")
            if on_record is not None:
                on_record(record)

        return real(spec, on_record=mark, **kwargs)

    monkeypatch.setattr(bench, "run", run)


def test_an_error_cell_exits_1_after_writing_everything(tmp_path, monkeypatch):
    _error_on_l1(monkeypatch)
    out = tmp_path / "p.json"
    res = invoke(["profile", *TINY, "--output", str(out)])
    assert res.exit_code == 1, res.output
    recs = read_results(out, schema=schema_name("profile")).records
    assert [r["status"] for r in recs].count("error") == 1 and len(recs) == 3  # every cell is in the file
    assert "l2 torch" in res.stdout and "boom" in res.stdout  # the table, with the error's reason
    assert res.stderr.strip().splitlines()[-1] == '1 cell ended in an error (status "error" in the results); exit code 1.'
    # drawing the file: the figures are written, and the exit says the file holds an error
    monkeypatch.undo()
    res = invoke(["plot", "profile", str(out), "--output-dir", str(tmp_path / "fig")])
    assert res.exit_code == 1, res.output
    assert list((tmp_path / "fig").glob("*.png"))
    assert res.stderr.strip().splitlines()[-1].startswith("1 cell ended in an error")
