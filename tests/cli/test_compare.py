"""`normbench compare` on real `normbench profile --quick` results, through click's CliRunner and
a subprocess: a run compared with itself is never slower or faster, in every file format."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from normbench.cli import main
from normbench.compare import read_comparison

# profile --quick narrowed to one shape group, two norms, one dtype, no memory measurement: ~3 s
QUICK = ["profile", "--quick", "--norm", "l2,l1", "--impl", "torch,eager", "--dtype", "fp32", "--threads", "1",
         "--no-memory", "--quiet", "--device", "cpu"]


def invoke(args):
    return CliRunner().invoke(main, args, prog_name="normbench")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real quick profile run, written as .json and read back as .csv of the same records."""
    d = tmp_path_factory.mktemp("profile")
    out = d / "a.json"
    res = invoke([*QUICK, "--output", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_a_real_run_compared_with_itself(measured, tmp_path):
    out = tmp_path / "self.json"
    res = invoke(["compare", str(measured), str(measured), "--fail-on", "any", "--output", str(out)])
    assert res.exit_code == 0, res.output
    rows = read_comparison(out)
    assert len(rows) == 3 and {r["cell"] for r in rows} == {"l2 torch", "l2 eager", "l1 eager"}
    # the documented false-positive rate of a file against itself is 0: identical samples give an
    # interval symmetric about 1, so only same or unsure
    assert {r["verdict"] for r in rows} <= {"same", "unsure"}
    for r in rows:
        assert r["ratio"] == 1.0 and r["base_repeats"] >= 5
        if r["ci_low"] is not None:
            assert r["ci_low"] <= 1.0 <= r["ci_high"]
    assert "0 slower, 0 faster" in res.output and "NEW/BASE" in res.output


def test_csv_against_json_and_a_subprocess(measured, tmp_path):
    from normbench.results import ResultsWriter, read_results, schema_name

    res = read_results(measured)
    csv = tmp_path / "a.csv"
    writer = ResultsWriter(csv, schema_name("profile"), res.environment, ("norm", "impl"))
    for r in res.records:
        writer.write(r)
    proc = subprocess.run([sys.executable, "-m", "normbench", "compare", str(measured), str(csv), "--fail-on", "slower"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "0 slower, 0 faster" in proc.stdout
    assert "records no environment (CSV)" in proc.stdout
