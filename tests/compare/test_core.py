"""Matching two results files, added and removed cells, refusing files of different commands,
--fail-on exit codes, --threshold and --output, through the library and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from compare.synthetic import profile_record, stability_record, times, write
from normbench.cli import main
from normbench.compare import SCHEMA, compare_files, parse_threshold, read_comparison, run
from normbench.errors import UserError
from normbench.results import read_results

SAME = dict(n=30, sigma=0.02)


def invoke(args):
    return CliRunner().invoke(main, args, prog_name="normbench")


def one_line_error(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


@pytest.fixture
def profile_pair(tmp_path):
    """BASE and NEW profile files: l2 eager 10 % slower, l1 eager the same, l2 torch 2x faster,
    linf eager only in BASE (removed), top10 eager only in NEW (added), in another order."""
    base = [profile_record("l2", "eager", times(1, **SAME)), profile_record("l1", "eager", times(2, **SAME)),
            profile_record("l2", "torch", times(3, **SAME)), profile_record("linf", "eager", times(4, **SAME))]
    new = [profile_record("top10", "eager", times(5, **SAME)),
           profile_record("l2", "torch", [0.5 * t for t in times(13, **SAME)]),
           profile_record("l1", "eager", times(12, **SAME)),
           profile_record("l2", "eager", [1.1 * t for t in times(11, **SAME)])]
    return write(tmp_path / "base.json", "profile", base), write(tmp_path / "new.json", "profile", new)


def test_matching_added_removed_and_the_summary(profile_pair):
    cmp = compare_files(*profile_pair)
    verdicts = {(r["norm"], r["impl"]): r["verdict"] for r in cmp.rows}
    assert verdicts == {("l2", "eager"): "slower", ("l1", "eager"): "same", ("l2", "torch"): "faster"}
    assert [r["norm"] for r in cmp.added] == ["top10"] and [r["norm"] for r in cmp.removed] == ["linf"]
    assert [r["cell"] for r in cmp.rows] == ["l2 torch", "l2 eager", "l1 eager"]  # most moved first
    assert cmp.summary() == "1 slower, 1 faster, 1 same, 0 unsure, 1 added, 1 removed"
    assert cmp.environment_differences == [] and cmp.notes == []


def test_a_file_compared_with_itself_is_never_slower_or_faster(profile_pair):
    base, _ = profile_pair
    cmp = compare_files(base, base)
    assert {r["verdict"] for r in cmp.rows} <= {"same", "unsure"} and not cmp.added and not cmp.removed


def test_matching_is_by_key_fields_across_formats(tmp_path):
    recs = [profile_record("l2", "eager", times(1, **SAME), dtype=d) for d in ("fp32", "bf16")]
    base = write(tmp_path / "b.csv", "profile", recs)  # CSV: no schema, told apart by its fields
    new = write(tmp_path / "n.jsonl", "profile", list(reversed(recs)))
    cmp = compare_files(base, new)
    assert cmp.kind.name == "profile" and len(cmp.rows) == 2 and not cmp.added and not cmp.removed
    assert {r["cell"] for r in cmp.rows} == {"fp32", "bf16"}  # labels: only the fields that vary
    assert any("no environment (CSV)" in note for note in cmp.notes)


def test_status_changes_are_failed_or_skipped(tmp_path):
    ok = profile_record("l2", "eager", times(1, **SAME))
    error = {**ok, "status": "error", "reason": "RuntimeError: boom", "times_s": None}
    skipped = {**profile_record("l1", "eager", times(1, **SAME)), "status": "skipped", "reason": "no fp8 here"}
    cmp = compare_files(write(tmp_path / "a.json", "profile", [ok, skipped]),
                        write(tmp_path / "b.json", "profile", [error, profile_record("l1", "eager", times(2, **SAME))]))
    rows = {r["norm"]: r for r in cmp.rows}
    assert rows["l2"]["verdict"] == "failed" and "boom" in rows["l2"]["note"]
    assert rows["l1"]["verdict"] == "skipped" and "skipped in BASE" in rows["l1"]["note"]
    assert cmp.fails("any") == [rows["l2"]] and cmp.fails("slower") == []


def test_old_files_without_raw_times_get_a_note(tmp_path):
    old = write(tmp_path / "old.json", "profile", [profile_record("l2", "eager", times(1, **SAME), raw=False)])
    new = write(tmp_path / "new.json", "profile", [profile_record("l2", "eager", times(2, **SAME))])
    cmp = compare_files(old, new)
    assert cmp.rows[0]["verdict"] == "unsure" and any("no raw times" in n for n in cmp.notes)
    res = invoke(["compare", old, new])
    assert res.exit_code == 0 and "no raw times" in res.output and "0 slower, 0 faster, 0 same, 1 unsure" in res.output


def test_environment_differences_are_printed_first(tmp_path):
    rec = [profile_record("l2", "eager", times(1, **SAME))]
    base = write(tmp_path / "a.json", "profile", rec)
    other = {"device": "cpu", "threads": 2, "torch_version": "2.13.0", "normbench_version": "0.1.0",
             "cpu_model": "other cpu", "device_name": "other cpu", "malloc": "system"}
    new = write(tmp_path / "b.json", "profile", rec, environment=other)
    cmp = compare_files(base, new)
    assert cmp.environment_differences == ["cpu_model test cpu -> other cpu", "threads 1 -> 2"]
    res = invoke(["compare", base, new])
    assert res.exit_code == 0
    assert res.output.index("Environment differs") < res.output.index("NEW/BASE")
    assert "threads 1 -> 2" in res.output


def test_files_of_different_commands_are_refused_with_one_line(tmp_path, profile_pair):
    stab = write(tmp_path / "s.json", "stability", [stability_record()])
    with pytest.raises(UserError, match="compare files of the same command"):
        compare_files(profile_pair[0], stab)
    line = one_line_error(invoke(["compare", profile_pair[0], stab]))
    assert "holds stability results" in line and "profile results" in line
    line = one_line_error(invoke(["compare", profile_pair[0], profile_pair[1], stab]))  # any NEW
    assert "compare files of the same command" in line


@pytest.mark.parametrize("content, message", [
    (None, "cannot read results file"),
    ("{not json", "not a readable .json results file"),
    (json.dumps({"schema": "normbench.other/1", "environment": {}, "records": []}), "holds normbench.other/1"),
    (json.dumps({"schema": SCHEMA, "environment": {}, "records": []}), "holds normbench.compare/1"),
])
def test_unreadable_or_foreign_files_are_one_line_errors(tmp_path, profile_pair, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    assert message in one_line_error(invoke(["compare", profile_pair[0], str(path)]))


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("5", 0.05), ("12.5 %", 0.125), (2, 0.02)])
def test_threshold(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-5%", "100%", "five", "", "nan"])
def test_bad_threshold_is_one_line(text, profile_pair):
    with pytest.raises(UserError):
        parse_threshold(text)
    assert "--threshold" in one_line_error(invoke(["compare", *profile_pair, "--threshold", text]))


def test_threshold_changes_the_verdict(profile_pair):
    wide = run(profile_pair[0], [profile_pair[1]], threshold=0.25)[0]
    assert {(r["norm"], r["impl"]): r["verdict"] for r in wide.rows}[("l2", "eager")] == "same"


@pytest.fixture
def stability_pair(tmp_path):
    """BASE and NEW stability files: scale 1 stays safe, scale 100 turns unsafe with an overflow,
    scale 10 gets its error 4x worse."""
    base = [stability_record(scale=1.0), stability_record(scale=100.0), stability_record(scale=10.0, err_ulps=1.0)]
    new = [stability_record(scale=1.0), stability_record(scale=100.0, safe=False, overflow=True),
           stability_record(scale=10.0, err_ulps=4.0)]
    return write(tmp_path / "sa.json", "stability", base), write(tmp_path / "sb.json", "stability", new)


def test_stability_verdict_flip_through_the_files(stability_pair):
    cmp = compare_files(*stability_pair)
    assert [r["verdict"] for r in cmp.rows] == ["unstable", "worse", "same"]
    assert cmp.rows[0]["case"]["scale"] == 100.0 and cmp.rows[0]["cell"] == "gauss(scale=100)"
    assert cmp.summary() == "1 unstable, 1 worse, 0 stabler, 0 better, 1 same"
    back = compare_files(stability_pair[1], stability_pair[0])
    assert sorted(r["verdict"] for r in back.rows) == ["better", "same", "stabler"]


@pytest.mark.parametrize("which, fail_on, code", [
    ("profile", None, 0), ("profile", "slower", 1), ("profile", "unstable", 0), ("profile", "any", 1),
    ("stability", None, 0), ("stability", "slower", 0), ("stability", "unstable", 1), ("stability", "any", 1),
    ("same", "slower", 0), ("same", "unstable", 0), ("same", "any", 0),
])
def test_every_fail_on_exit_code(which, fail_on, code, profile_pair, stability_pair):
    files = {"profile": profile_pair, "stability": stability_pair, "same": (profile_pair[0], profile_pair[0])}[which]
    res = invoke(["compare", *files, *(["--fail-on", fail_on] if fail_on else [])])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == code, res.output
    if code == 1:
        assert f"fail-on {fail_on}:" in res.stderr and "exit code 1" in res.stderr


def test_fail_on_any_counts_worse_alone(tmp_path):
    base = write(tmp_path / "a.json", "stability", [stability_record(err_ulps=1.0)])
    new = write(tmp_path / "b.json", "stability", [stability_record(err_ulps=5.0)])
    assert invoke(["compare", base, new, "--fail-on", "unstable"]).exit_code == 0
    assert invoke(["compare", base, new, "--fail-on", "any"]).exit_code == 1
    assert "Invalid value for '--fail-on'" in one_line_error(invoke(["compare", base, new, "--fail-on", "faster"]))


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_output_writes_the_comparison(tmp_path, profile_pair, suffix):
    out = tmp_path / f"cmp{suffix}"
    res = invoke(["compare", *profile_pair, "--output", str(out)])
    assert res.exit_code == 0, res.output
    rows = read_comparison(out)
    assert {r["verdict"] for r in rows} == {"slower", "faster", "same", "added", "removed"}
    assert all(r["new"] == profile_pair[1] and r["base"] == profile_pair[0] and r["kind"] == "profile" for r in rows)
    slower = next(r for r in rows if r["verdict"] == "slower")
    assert slower["ci_low"] > 1.05 and slower["threshold"] == 0.05
    if suffix == ".json":
        doc = read_results(out)
        assert doc.schema == SCHEMA == "normbench.compare/1"
        assert doc.environment["base"] == profile_pair[0] and doc.environment["new"] == [profile_pair[1]]
        json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert "exists" in one_line_error(invoke(["compare", *profile_pair, "--output", str(out)]))
    assert invoke(["compare", *profile_pair, "--output", str(out), "--force"]).exit_code == 0


def test_several_new_files_and_the_table(profile_pair):
    res = invoke(["compare", profile_pair[0], profile_pair[1], profile_pair[0], "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count("->") >= 2 and "more rows (--limit 0 shows all)" in res.output
    assert "1 slower, 1 faster, 1 same, 0 unsure, 1 added, 1 removed" in res.output
    assert "0 slower, 0 faster" in res.output  # BASE against itself
    assert one_line_error(invoke(["compare", profile_pair[0]])).startswith("Error: Missing argument")


def test_vs_torch_through_the_cli(tmp_path, stability_pair):
    rec = profile_record("l2", "eager", times(1, **SAME), torch_times_s=times(2, **SAME, scale=5e-4))
    torch_rec = profile_record("l2", "torch", times(2, **SAME, scale=5e-4))
    base = write(tmp_path / "a.json", "profile", [torch_rec, rec])
    res = invoke(["compare", base, base, "--vs-torch"])
    assert res.exit_code == 0, res.output
    assert "x torch" in res.output and "0 slower, 0 faster, 1 same, 0 unsure, 1 skipped" in res.output
    assert "--vs-torch" in one_line_error(invoke(["compare", *stability_pair, "--vs-torch"]))


def test_unbounded_intervals_and_infinite_error_ratios_write_strict_json(tmp_path):
    prof = write(tmp_path / "p.json", "profile", [profile_record("l2", "eager", times(1, n=3))])
    stab_a = write(tmp_path / "a.json", "stability", [stability_record(err_ulps=0.0)])
    stab_b = write(tmp_path / "b.json", "stability", [stability_record(err_ulps=3.0)])
    for files, out in (((prof, prof), tmp_path / "p_out.json"), ((stab_a, stab_b), tmp_path / "s_out.json")):
        assert invoke(["compare", *files, "--output", str(out)]).exit_code == 0
        doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
        assert doc["records"][0]["verdict"] in ("unsure", "worse")


def test_a_change_of_world_size_is_an_environment_difference(tmp_path):
    """A profile under torchrun against one on another number of ranks: said first, not silent."""
    rec = [profile_record("l2", "eager", times(1, **SAME))]
    base_env = {"device": "cpu", "threads": 1, "torch_version": "2.13.0", "world_size": 2, "backend": "gloo"}
    base = write(tmp_path / "a.json", "profile", rec, environment=base_env)
    new = write(tmp_path / "b.json", "profile", rec, environment=dict(base_env, world_size=4))
    assert compare_files(base, new).environment_differences == ["world_size 2 -> 4"]
