"""``normbench plot [equivalence]`` through click's CliRunner: --quick end to end, caching, and
bad options (exit code 2, one line starting with "Error:")."""

import json

import pytest
from click.testing import CliRunner

from normbench.cli import main
from normbench.results import read_results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plot")
    result = CliRunner().invoke(main, ["plot", "--quick", "--quiet", "--output-dir", str(out)])
    return out, result


def test_quick_writes_results_and_figures(quick_run):
    out, result = quick_run
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "equivalence.json").read_text())
    assert doc["schema"] == "normbench.equivalence/1"
    regimes = {r["regime"] for r in doc["records"]}
    assert {"wd_on", "wd_off", "wd_off_corrected", "norm_schedule", "weight_norm", "bounded_weight_norm",
            "batch_norm_l1", "batch_norm_linf"} <= regimes
    for r in doc["records"]:
        assert r["protocol"] == "isolated" and r["status"] == "ok"
        assert {"epoch", "lr", "train_loss", "test_loss", "test_acc", "layers"} <= set(r["epochs"][0])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "wd_regimes_isolated.png" in pngs and "scale_invariance.png" in pngs and len(pngs) >= 7
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    checks = read_results(out / "scale_invariance.json", schema="normbench.scale_invariance/1")
    assert checks.records and all(c["status"] == "ok" for c in checks.records)
    assert len(read_results(out / "equivalence.json", schema="normbench.equivalence/1").records) == len(doc["records"])
    assert "verdict" in result.output and "scale invariance (holds)" in result.output
    assert "wd_off_corrected" in result.output


def test_second_run_reuses_the_cache(quick_run):
    out, first = quick_run
    assert first.exit_code == 0
    result = CliRunner().invoke(main, ["plot", "equivalence", "--quick", "--quiet", "--output-dir", str(out),
                                       "--regimes", "wd", "--format", "png,svg"])
    assert result.exit_code == 0, result.output
    assert "0 of them trained now" in result.output
    assert (out / "wd_regimes_isolated.svg").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "gif"], "--format"),
        (["--regimes", "wd_on,bogus"], "unknown regime"),
        (["--seeds", "a,b"], "--seeds"),
        (["--epochs", "0"], "--epochs"),
        (["--dataset", "mnist"], "--data-dir"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--protocol", "nope"], "--protocol"),
        (["--device", "tpu"], "device"),
        (["--label-noise", "1.5"], "--label-noise"),
        (["--augment", "flip=1"], "augmentation"),
        (["--augment", "shift=x"], "not a number"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["plot", "--quick", "--quiet", "--output-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_subprocess_entry_point_reports_bad_options(tmp_path):
    """Through a real process: the one-line error and exit code 2, before any training."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "normbench", "plot", "equivalence", "--epochs", "0", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_run_that_ended_in_an_error_exits_1_after_writing_everything(quick_run, monkeypatch):
    """From the cache (no training): one run's record marked as an error on its way to the
    results file; the results, the figures and the table are written all the same, then exit 1."""
    import normbench.experiments.equivalence as equivalence

    out, first = quick_run
    assert first.exit_code == 0
    real = equivalence.run

    def run(config, on_record=None, **kwargs):
        def mark(record):
            if record["regime"] == "wd_off":
                record.update(status="error", reason="RuntimeError: boom")
            if on_record is not None:
                on_record(record)

        return real(config, on_record=mark, **kwargs)

    monkeypatch.setattr(equivalence, "run", run)
    for png in out.glob("*.png"):
        png.unlink()
    result = CliRunner().invoke(main, ["plot", "equivalence", "--quick", "--quiet", "--output-dir", str(out),
                                       "--regimes", "wd"])
    assert result.exit_code == 1, result.output
    records = read_results(out / "equivalence.json", schema="normbench.equivalence/1").records
    assert [r["status"] for r in records].count("error") == 2  # wd_off of both seeds
    assert list(out.glob("*.png")) and "verdict" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == '2 runs ended in an error (status "error" in the results); exit code 1.'
