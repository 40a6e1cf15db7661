"""The rules of --output, --resume and --force, the same for every command that writes a results
file (normbench.results.open_results), and the message of an interrupted run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from normbench.cli import main
from normbench.results import read_results

PROFILE = ["profile", "--shape", "4x3x2x2", "--impl", "torch", "--norm", "l2", "--dtype", "fp32", "--pass", "fwd",
           "--device", "cpu", "--no-memory", "--quiet", "--threads", "1"]
STABILITY = ["stability", "--quick", "--norm", "l2", "--dtype", "fp16", "--compute", "framework", "--case", "gauss",
             "--device", "cpu", "--quiet"]


def invoke(args):
    return CliRunner().invoke(main, args, prog_name="normbench")


def one_line_error(res, *parts):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [PROFILE, STABILITY], ids=["profile", "stability"])
def test_an_existing_file_is_refused_without_resume_or_force_and_force_overwrites(tmp_path, command):
    out = tmp_path / "r.jsonl"
    out.write_text('{"schema": "precious"}\n')
    one_line_error(invoke([*command, "--output", str(out)]), str(out), "--resume", "--force")
    assert out.read_text() == '{"schema": "precious"}\n'  # untouched
    res = invoke([*command, "--output", str(out), "--force"])
    assert res.exit_code in (0, 1), res.output  # 1: stability's cells may fail, still written
    assert read_results(out).records and "precious" not in out.read_text()
    one_line_error(invoke([*command, "--output", str(out), "--resume", "--force"]), "not both")
    one_line_error(invoke([*command, "--force"]), "--force needs --output")


def test_an_empty_existing_file_is_written_without_flags(tmp_path):
    out = tmp_path / "e.json"
    out.write_text("")
    assert invoke([*PROFILE, "--output", str(out)]).exit_code == 0
    assert len(read_results(out).records) == 1


def _edit_environment(path, **changes):
    doc = json.loads(path.read_text())
    doc["environment"].update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("field, value", [("device", "cuda"), ("torch_version", "1.0.0"), ("threads", 7),
                                          ("cache", "warm")])
def test_resume_refuses_a_file_from_another_environment(tmp_path, field, value):
    out = tmp_path / "p.json"
    assert invoke([*PROFILE, "--output", str(out)]).exit_code == 0
    _edit_environment(out, **{field: value})
    before = out.read_text()
    line = one_line_error(invoke([*PROFILE, "--output", str(out), "--resume"]), str(out), "cannot resume",
                          f"{field} {value} -> ", "--force")
    assert line.count("->") == 1  # only the field that differs is named
    assert out.read_text() == before
    assert invoke([*PROFILE, "--output", str(out), "--resume", "--threads", "1"]).exit_code == 2


def test_resume_with_another_thread_count_is_refused_for_a_csv_file_too(tmp_path):
    out = tmp_path / "p.csv"  # no environment in CSV: the records' own threads field is checked
    assert invoke([*PROFILE, "--output", str(out)]).exit_code == 0
    args = [a for a in PROFILE if a not in ("--threads", "1")] + ["--threads", "2"]
    one_line_error(invoke([*args, "--output", str(out), "--resume"]), "threads 1 -> 2")
    assert invoke([*PROFILE, "--output", str(out), "--resume"]).exit_code == 0  # same threads: fine


def test_resume_refuses_a_stability_file_from_another_torch(tmp_path):
    out = tmp_path / "s.json"
    assert invoke([*STABILITY, "--output", str(out)]).exit_code in (0, 1)
    _edit_environment(out, torch_version="1.0.0")
    one_line_error(invoke([*STABILITY, "--output", str(out), "--resume"]), "torch_version 1.0.0 -> ")


def test_warm_cache_is_recorded_in_the_environment_and_every_record(tmp_path):
    cold, warm = tmp_path / "c.json", tmp_path / "w.json"
    assert invoke([*PROFILE, "--output", str(cold)]).exit_code == 0
    assert invoke([*PROFILE, "--warm-cache", "--output", str(warm)]).exit_code == 0
    c, w = read_results(cold), read_results(warm)
    assert c.environment["cache"] == "cold" and c.environment["last_level_cache_bytes"] > 0
    assert w.environment["cache"] == "warm"
    assert [r["cache"] for r in c.records] == ["cold"] and c.records[0]["input_copies"] >= 2
    assert [r["cache"] for r in w.records] == ["warm"] and w.records[0]["input_copies"] == 1


@pytest.mark.parametrize("with_output", [True, False])
def test_the_abort_message_names_the_output_file_only_when_there_is_one(tmp_path, monkeypatch, with_output):
    import normbench.bench.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build_timed_pass", interrupted)
    out = tmp_path / "a.json"
    res = invoke([*PROFILE, *(["--output", str(out)] if with_output else [])])
    assert res.exit_code == 130
    last = res.output.strip().splitlines()[-1]
    assert last == (f"Aborted: every finished cell is in the output file {out}." if with_output else "Aborted.")
