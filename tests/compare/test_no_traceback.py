"""`normbench compare` and `normbench plot compare` never end in a traceback: a property test
(hypothesis, derandomized) over pairs of good, odd and broken files and option values. Every run
exits 0, 1 (--fail-on tripped) or 2 with one line on stderr starting with "Error:"."""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compare.synthetic import equivalence_record, profile_record, stability_record, times, write
from normbench.cli import main

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
THRESHOLDS = ["5%", "10", "0.5%", "99%", "0", "-1", "abc", "", "inf", "nan", "100%", "5%%"]
FAIL_ON = [None, "slower", "unstable", "any", "faster", ""]
LIMITS = ["0", "1", "40", "-1", "x"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Good files of every kind and format, odd records (strings for times, NaN and negative
    times, missing fields, non-dict records, an empty final), and broken or foreign files."""
    d: Path = tmp_path_factory.mktemp("compare_files")
    prof = [profile_record("l2", "eager", times(1)), profile_record("l1", "eager", times(2, n=2))]
    slower = [profile_record("l2", "eager", [2 * t for t in times(3)]), profile_record("l1", "eager", times(4, n=2))]
    odd = [profile_record("l2", "eager", times(1), times_s=["x", -1.0, math.inf, None, True]),
           profile_record("l1", "eager", times(2), time_median_s=None, raw=False),
           {"norm": "l2", "status": "weird"}, {"status": None}]
    out = [
        write(d / "p.json", "profile", prof), write(d / "p.csv", "profile", slower),
        write(d / "p_odd.jsonl", "profile", odd),
        write(d / "s.json", "stability", [stability_record(), stability_record(scale=10.0, safe=None, err_ulps="x")]),
        write(d / "e.json", "equivalence", [equivalence_record("wd_on", s, 0.9) for s in range(2)]
              + [{"regime": "wd_on", "seed": 5, "final": None}, {"regime": "wd_off", "final": {"test_acc": "x"}}]),
        write(d / "h.json", "halfprec", [{"norm": "l2", "seed": 0, "scale": 1, "storage": "fp16", "final": {}}]),
    ]
    (d / "empty.json").write_text("")
    (d / "broken.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "nondict.json").write_text(json.dumps({"schema": "normbench.profile/1", "records": [1, "a"]}))
    (d / "other.json").write_text(json.dumps({"schema": "normbench.other/1", "records": []}))
    (d / "nothing.csv").write_text("a,b\n1,2\n")
    (d / "notes.txt").write_text("x")
    out += [str(d / n) for n in ("empty.json", "broken.json", "list.json", "nondict.json", "other.json",
                                 "nothing.csv", "notes.txt", "missing.json")] + [str(d)]
    return out


def check(result, args) -> None:
    where = f"normbench {' '.join(args)}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{where} raised:\n" + "".join(traceback.format_exception(*result.exc_info)))
    assert "Traceback" not in result.output, f"{where}:\n{result.output}"
    assert result.exit_code in (0, 1, 2), f"{where}: exit code {result.exit_code}\n{result.output}"
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), f"{where}: not a one-line error:\n{result.stderr}"


@given(data=st.data())
@settings(max_examples=40, **SETTINGS)
def test_compare_never_ends_in_a_traceback(data, files, tmp_path_factory):
    names = data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=3), label="files")
    args = ["compare", *names]
    threshold = data.draw(st.sampled_from([None, *THRESHOLDS]), label="threshold")
    if threshold is not None:
        args += ["--threshold", threshold]
    fail_on = data.draw(st.sampled_from(FAIL_ON), label="fail-on")
    if fail_on is not None:
        args += ["--fail-on", fail_on]
    if data.draw(st.booleans(), label="output"):
        suffix = data.draw(st.sampled_from([".json", ".csv", ".jsonl", ".txt"]), label="suffix")
        args += ["--output", str(tmp_path_factory.mktemp("out") / f"c{suffix}")]
    if data.draw(st.booleans(), label="limit"):
        args += ["--limit", data.draw(st.sampled_from(LIMITS))]
    if data.draw(st.booleans(), label="vs-torch"):
        args.append("--vs-torch")
    check(CliRunner().invoke(main, args, prog_name="normbench"), args)


@given(data=st.data())
@settings(max_examples=15, **SETTINGS)
def test_plot_compare_never_ends_in_a_traceback(data, files, tmp_path_factory):
    names = data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=2), label="files")
    out = str(tmp_path_factory.mktemp("fig"))
    args = ["plot", "compare", *names, "--output-dir", out,
            "--format", data.draw(st.sampled_from(["png", "svg", "png,svg", "bmp", ""]), label="format")]
    if data.draw(st.booleans(), label="threshold"):
        args += ["--threshold", data.draw(st.sampled_from(THRESHOLDS))]
    check(CliRunner().invoke(main, args, prog_name="normbench"), args)
