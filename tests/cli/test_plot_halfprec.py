"""``normbench plot halfprec`` through click's CliRunner: --quick end to end (files, schema,
figures, verdict), the cache on a second call, and bad options (exit code 2, one line)."""

import json
import re

import pytest
from click.testing import CliRunner

from normbench.cli import main
from normbench.experiments.halfprec import verdicts
from normbench.results import read_results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("halfprec")
    result = CliRunner().invoke(main, ["plot", "halfprec", "--quick", "--quiet", "--output-dir", str(out)])
    return out, result


def test_quick_writes_results_figures_and_a_verdict(quick_run):
    out, result = quick_run
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "halfprec.json").read_text())
    assert doc["schema"] == "normbench.halfprec/1"
    records = doc["records"]
    assert {r["compute"] for r in records} == {"native", "framework", "fp32"}
    assert {r["norm"] for r in records} == {"l2", "l1"} and {r["scale"] for r in records} == {1.0, 1000.0}
    for r in records:
        assert r["status"] == "ok"
        assert {"norm", "k", "dtype", "compute", "reduction", "scale", "seed", "config", "epochs", "diverged",
                "first_nonfinite", "final"} <= set(r)
        assert {"test_acc", "train_loss"} <= set(r["final"])
        if not r["diverged"]:
            assert {"train_loss", "test_acc", "norm_layers"} <= set(r["epochs"][0])
    l2 = [r for r in records if r["norm"] == "l2" and r["compute"] == "native" and r["scale"] == 1000.0]
    assert l2 and all(r["first_nonfinite"] is not None for r in l2)
    fp32 = [r for r in records if r["compute"] == "fp32"]
    assert all(r["first_nonfinite"] is None and not r["diverged"] for r in fp32)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["halfprec_accuracy_fp16.png", "halfprec_curves_fp16.png", "halfprec_natural.png",
                    "halfprec_nonfinite_fp16.png"]
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    assert len(read_results(out / "halfprec.json", schema="normbench.halfprec/1").records) == len(records)
    # the claim under test: native fp16 L2 with pairwise sums fails at scale 1000 (9-10% accuracy on
    # every machine tried). At scale 1 its one-seed gap to fp32 sits near the 2x-noise line, and
    # which side it falls on moves with the CPU's rounding (AVX2 vs AVX-512 builds of torch's
    # kernels), so the verdict may name scale 1 or 1000
    pairwise = next(v for v in verdicts(records) if v["dtype"] == "fp16" and v["reduction"] == "pairwise")
    assert pairwise["status"]["l2"]["1000"] == "fails"
    assert re.search(r"verdict native fp16, pairwise: L2 fails from scale (1|1000) \(", " ".join(result.output.split()))
    assert "control: fp32" in result.output


def test_second_run_reuses_the_cache(quick_run):
    out, first = quick_run
    assert first.exit_code == 0
    result = CliRunner().invoke(main, ["plot", "halfprec", "--quick", "--quiet", "--output-dir", str(out),
                                       "--format", "svg"])
    assert result.exit_code == 0, result.output
    assert "0 of them trained now" in result.output
    assert (out / "halfprec_accuracy_fp16.svg").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--norm", "l3"], "l3"),
        (["--norm", "layernorm"], "batch-norm"),
        (["--dtype", "fp64"], "dtype"),
        (["--compute", "exact"], "compute"),
        (["--reduction", "tree"], "reduction"),
        (["--scales", "0"], "scale"),
        (["--scales", "-5,10"], "scale"),
        (["--scales", "ten"], "--scales"),
        (["--norm", "top100000"], "larger than the smallest batch-norm channel"),
        (["--storage", "fp8_e4m3"], "--storage"),
        (["--seeds", "a"], "--seeds"),
        (["--format", "gif"], "--format"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["plot", "halfprec", "--quick", "--quiet", "--output-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not (tmp_path / "halfprec.json").exists()


def test_two_ranks_train_the_runs_one_process_trains(tmp_path):
    """Under torchrun the runs are spread over the ranks, each trained whole by one of them:
    rank 0 writes exactly the records (and cache keys) of a one-process run, bit for bit."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", NORMBENCH_DIST_TIMEOUT_S="60")
    args = ["-m", "normbench", "plot", "halfprec", "--quick", "--quiet", "--jobs", "1", "--output-dir"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "halfprec.json").read_text())["records"]
    b = json.loads((tmp_path / "two" / "halfprec.json").read_text())["records"]
    assert len(a) == len(b) > 10 and sum(r["status"] == "ok" for r in b) > 10
    for ra, rb in zip(a, b):
        ra.pop("train_seconds"), rb.pop("train_seconds")
        assert ra == rb
    cached = sorted(p.name for p in (tmp_path / "two" / "cache" / "halfprec").iterdir())
    assert cached == sorted(p.name for p in (tmp_path / "one" / "cache" / "halfprec").iterdir())
    assert two.stdout.count("runs, ") == 1  # rank 0 alone prints the summary
