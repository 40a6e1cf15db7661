"""No command ends in a traceback, whatever the options: a property test with hypothesis.

Each test drives one command through click's CliRunner with generated combinations of valid and
invalid option values (norm names such as top0, top5-layernorm, l3 or empty; shapes such as 2x3,
4x3x2, 0x3, ax2 or 3; negative or non-finite eps; unknown dtypes; odd input and results files) on
tiny shapes, and asserts what every run must give:

- no traceback: ``result.exception`` is None or a SystemExit, and no "Traceback" in the output;
- an exit code of 0 (done), 1 (done, but ``--fail-on`` tripped, or a file drawn holds an error
  cell) or 2;
- for exit code 2, one line on stderr, starting with "Error:";
- no cell of ``profile`` or ``stability`` ends in an error: a cell that cannot run is skipped.

Examples are derandomized (the same ones on every run: CI stays deterministic) and few enough,
on shapes small enough, that the file runs in 20-40 s on a 2-core machine. To search further,
raise ``max_examples`` and set ``derandomize=False`` locally.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from normbench.cli import main
from normbench.results import ResultsWriter, schema_name

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

# Each option's values: (valid, invalid). An example draws from the valid ones alone (half of the
# examples, so that many run to the end of the grid) or from both (to reach the error paths).
NORMS = (["l2", "l1", "linf", "top2", "top10", "top1", "layernorm", "rmsnorm", "groupnorm", "l1-layernorm",
          "top5-layernorm", "linf-groupnorm", "l1-rmsnorm", "top3-rmsnorm", "top2-groupnorm", "bn", "ln", "LINF"],
         ["top0", "l3", "l2-", "-layernorm", "l1-foo", "top-1", " ", ""])
SHAPES = (["2x3", "4x3x2", "2x2x2x2", "1x1", "2x1", "1x2x2x2x2", "3x5", "2x4x3", "2X3"],
          ["0x3", "ax2", "3", "", "x", "2x", "-1x3", "2x3x4x5x6x7", "1.5x2"])
DEVICES = (["cpu", "auto"], ["tpu", "cuda:x"])


def pick(values: tuple[list[str], list[str]], valid_only: bool) -> st.SearchStrategy[str]:
    """One of an option's values: a valid one, or with ``valid_only`` False valid or invalid."""
    return st.sampled_from(values[0] if valid_only else values[0] + values[1])


def listed(values: tuple[list[str], list[str]], valid_only: bool, min_size: int = 0,
           max_size: int = 2) -> st.SearchStrategy[str]:
    """Comma-joined lists of an option's values (an empty list is the empty string: invalid)."""
    return st.lists(pick(values, valid_only), min_size=max(min_size, 1) if valid_only else min_size,
                    max_size=max_size).map(",".join)


def command_line(options: dict[str, object]) -> list[str]:
    """``{"--norm": "l1", "--quick": True}`` -> ``["--norm", "l1", "--quick"]`` (False flags left out)."""
    args: list[str] = []
    for name, value in options.items():
        if value is True:
            args.append(name)
        elif value is not False:
            args += [name, str(value)]
    return args


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args, prog_name="normbench")


def assert_no_traceback(result: Result, args: list[str], error_cells: bool = False) -> None:
    """What every run must give: no traceback, exit code 0, 1 or 2, and for 2 a one-line error.
    Unless ``error_cells`` (drawing a file that holds some), no cell may end in an error either: a
    cell that cannot run is skipped with its reason, an error is a bug."""
    where = f"normbench {' '.join(repr(a) if not a or ' ' in a else a for a in args)}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{where} raised:\n" + "".join(traceback.format_exception(*result.exc_info)))
    assert "Traceback" not in result.output, f"{where}:\n{result.output}"
    assert result.exit_code in (0, 1, 2), f"{where}: exit code {result.exit_code}\n{result.output}"
    event(f"exit code {result.exit_code}")  # --hypothesis-show-statistics: how many examples ran to the end
    if result.exit_code == 2:
        # (profile's "Note: this machine is busy" may come first: a remark, not part of the error)
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Note: ")]
        assert len(lines) == 1 and lines[0].startswith("Error: "), f"{where}: not a one-line error:\n{result.stderr}"
    if not error_cells:
        assert "ended in an error" not in result.stderr, f"{where}:\n{result.output}"


# What the --output file holds before a run (for --resume and --force): nothing, an empty file,
# a broken one, or a results file of another command.
PREFILLS = [None, "", "{not json", "other"]


def prefill(path: Path, content: str | None) -> str:
    """Put ``content`` at ``path`` (None: leave no file there); returns the path as a string."""
    if content == "other":
        content = json.dumps({"schema": "normbench.other/1", "environment": {}, "records": [{"status": "ok"}]})
    if content is not None:
        path.write_text(content)
    return str(path)


class Pickled:
    """A pickled object: loading it needs unpickling of code, which --input refuses."""

    def __init__(self) -> None:
        self.t = torch.ones(2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[list[str], list[str]]:
    """--input files, (valid, invalid): every shape rule and loader refusal is in here."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    np.save(d / "rows.npy", rng.standard_normal((2, 3)).astype(np.float32))
    np.save(d / "vector.npy", rng.standard_normal(5))
    np.save(d / "with_nan.npy", np.array([[1.0, np.nan, 3.0], [np.inf, 0.0, -1.0]]))
    np.savez(d / "mixed.npz", ints=np.arange(6).reshape(2, 3), big=rng.standard_normal((2, 2, 3)) * 1e6)
    torch.save([torch.randn(3, 2, 2), torch.randn(2, 2, dtype=torch.float16)], d / "list.pt")
    valid = [str(d / n) for n in ("rows.npy", "vector.npy", "with_nan.npy", "mixed.npz", "list.pt")]
    np.save(d / "scalar.npy", np.float32(3.0))
    np.save(d / "empty.npy", np.zeros((0, 3)))
    np.save(d / "six_dims.npy", np.ones((1, 1, 1, 1, 1, 2)))
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.savez(d / "nothing.npz")
    torch.save({"a": torch.randn(2, 4), "flag": torch.ones(2, 2, dtype=torch.bool)}, d / "dict.pt")
    torch.save(Pickled(), d / "object.pt")
    (d / "garbage.pt").write_bytes(b"not a torch file")
    (d / "notes.txt").write_text("hello")
    invalid = [str(d / n) for n in ("scalar.npy", "empty.npy", "six_dims.npy", "strings.npy", "nothing.npz",
                                    "dict.pt", "object.pt", "garbage.pt", "notes.txt", "missing.npy")] + [str(d)]
    return valid, invalid


CASES = (["gauss", "constant", "tiny", "deviation", "beyond_range", "offset", "outliers", "heavy_tail",
          "mixed_scale", "large"], ["nope", ""])


@given(data=st.data())
@settings(max_examples=120, **SETTINGS)
def test_stability_never_ends_in_a_traceback(data, inputs, tmp_path_factory):
    ok = data.draw(st.booleans(), label="valid values only")
    options = data.draw(st.fixed_dictionaries(
        {"--case": listed(CASES, ok)},  # always: the quick default grid of every case takes seconds
        optional={
            "--norm": listed(NORMS, ok),
            "--dtype": listed((["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32"], ["fp64", "fp7", ""]), ok),
            "--compute": listed((["framework", "native"], ["gpu"]), ok),
            "--reduction": listed((["pairwise", "sequential", "sum"], ["random"]), ok),
            "--impl": listed((["normbench", "torch"], ["numpy"]), ok),
            "--eps": pick((["1e-5", "0", "1e-12", "1e300", "-0", "1e-45", "0.5"], ["-1", "nan", "inf", "abc"]), ok),
            "--shape": pick(SHAPES, ok),
            "--input": pick(inputs, ok),
            "--fp8-compute": pick((["fp16", "bf16", "fp32"], ["fp8"]), ok),
            "--fail-on": pick((["overflow", "error:64", "overflow,error:1", "error:1e-3"],
                               ["error:-3", "error:abc", "error:", "sometimes", "", "error:inf", "error:nan"]), ok),
            "--device": pick(DEVICES, ok),
            "--output": pick((["s.json", "s.jsonl", "s.csv"], ["s.txt", "s"]), ok),
            "--resume": st.booleans(),
            "--force": st.booleans(),
        },
    ))
    before = data.draw(st.sampled_from(PREFILLS), label="--output file before the run")
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as out:
        if "--output" in options:
            options["--output"] = prefill(Path(out) / str(options["--output"]), before)
        args = ["stability", "--quick", "--quiet", *command_line(options)]
        assert_no_traceback(invoke(args), args, error_cells=args[0] == "plot")


@given(data=st.data())
@settings(max_examples=25, **SETTINGS)
def test_profile_never_ends_in_a_traceback(data, tmp_path_factory):
    ok = data.draw(st.sampled_from([False, True, True]), label="valid values only")  # most run cells
    options = data.draw(st.fixed_dictionaries(
        # always a shape (the quick grid's own shapes take tens of seconds), at most one impl
        {"--shape": st.one_of(pick(SHAPES, ok), listed((["2x3", "4x3x2", "2x2x2x2"], []), ok, 1, 2)),
         "--norm": listed(NORMS, ok, 1, 2),
         "--impl": listed((["torch", "eager", "analytic", "paper"], ["nope", ""]), ok, 0, 1)},
        optional={
            "--dtype": listed((["fp32", "bf16", "fp16", "fp64", "fp8_e4m3", "fp8_e5m2"], ["fp7", ""]), ok, 0, 1),
            "--preset": pick(([], ["resnet50", "transformer", "nope", ""]), False),  # with --shape: always an error
            "--pass": listed((["fwd", "bwd", "fwd+bwd"], ["back"]), ok, 0, 1),
            "--mode": listed((["train", "eval"], ["test"]), ok, 0, 1),
            "--memory-format": listed((["contiguous", "channels_last"], ["nhwc"]), ok, 0, 1),
            "--threads": pick((["1", "2"], ["0", "-1", "x"]), ok),
            "--malloc": pick((["steady", "system"], ["jemalloc"]), ok),
            "--device": pick(DEVICES, ok),
            "--no-memory": st.booleans(),
            "--output": pick((["p.json", "p.jsonl", "p.csv"], ["p.txt"]), ok),
            "--resume": st.booleans(),
            "--force": st.booleans(),
            "--warm-cache": st.booleans(),
        },
    ))
    if ok:
        options.pop("--preset", None)
    before = data.draw(st.sampled_from(PREFILLS), label="--output file before the run")
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as out:
        if "--output" in options:
            options["--output"] = prefill(Path(out) / str(options["--output"]), before)
        args = ["profile", "--quick", "--quiet", *command_line(options)]
        assert_no_traceback(invoke(args), args, error_cells=args[0] == "plot")


def _files(d: Path, schema: str, good: list[dict], foreign: list[dict]) -> tuple[list[str], list[str]]:
    """Results files to draw, (valid, invalid): good ones in two formats and one with an error
    cell; one of another command, an empty one, broken ones, hand-written records, a missing path
    and a directory."""
    written = {}
    for name, records, sch in (("good.json", good, schema), ("good.csv", good, schema),
                               ("error.jsonl", good[:-1] + [{**good[-1], "status": "error", "reason": "boom"}],
                                schema),
                               ("other.json", good, "normbench.other/1"), ("foreign.json", foreign, schema)):
        w = ResultsWriter(d / name, sch, {}, ("norm",))
        for r in records:
            w.write(r)
        written[name] = str(d / name)
    (d / "empty.json").write_text("")
    (d / "broken.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "notes.txt").write_text("x")
    valid = [written["good.json"], written["good.csv"], written["error.jsonl"]]
    invalid = [written["other.json"], written["foreign.json"]] + [
        str(d / n) for n in ("empty.json", "broken.json", "list.json", "notes.txt", "missing.json")] + [str(d)]
    return valid, invalid


@pytest.fixture(scope="module")
def stability_files(tmp_path_factory) -> tuple[list[str], list[str]]:
    from normbench.numerics import StabilitySpec, run

    good = run(StabilitySpec(norms=("l2", "top10"), dtypes=("fp16",), cases=("gauss", "tiny"), shape=(2, 3),
                             quick=True))
    foreign = [{"status": "ok", "case": {"name": "gauss", "scale": 1.0}}, {"status": "ok"}, {"norm": "l2"}]
    return _files(tmp_path_factory.mktemp("stability_files"), schema_name("stability"), good, foreign)


@pytest.fixture(scope="module")
def profile_files(tmp_path_factory) -> tuple[list[str], list[str]]:
    from normbench.bench import make_spec, run

    good = run(make_spec(norm="l2,top10", impl="torch,eager", dtype="fp32", shape="4x3x2", pass_="fwd",
                         device="cpu", quick=True, measure_memory=False))
    foreign = [{"status": "ok", "norm": "l2"}, {"status": "skipped"}, {"group": "g", "status": "ok", "norm": "l2",
               "impl": "eager", "dtype": "fp32", "shape": "2x3", "pass": "fwd"}]
    return _files(tmp_path_factory.mktemp("profile_files"), schema_name("profile"), good, foreign)


@given(data=st.data())
@settings(max_examples=12, **SETTINGS)
def test_plot_stability_never_ends_in_a_traceback(data, stability_files, tmp_path_factory):
    ok = data.draw(st.booleans(), label="valid values only")
    file = data.draw(pick(stability_files, ok))
    options = data.draw(st.fixed_dictionaries({}, optional={
        "--compute": pick((["native", "framework", "both"], ["torch"]), ok),
        "--format": pick((["png", "svg", "pdf"], ["gif"]), ok),
    }))
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as out:
        args = ["plot", "stability", file, "--output-dir", out, *command_line(options)]
        assert_no_traceback(invoke(args), args, error_cells=args[0] == "plot")


@given(data=st.data())
@settings(max_examples=12, **SETTINGS)
def test_plot_profile_never_ends_in_a_traceback(data, profile_files, tmp_path_factory):
    ok = data.draw(st.booleans(), label="valid values only")
    file = data.draw(pick(profile_files, ok))
    options = data.draw(st.fixed_dictionaries({}, optional={
        "--format": listed((["png", "svg"], ["pdf", "gif"]), ok, 0, 2),
        "--metric": pick((["gbps", "time"], ["flops"]), ok),
    }))
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as out:
        args = ["plot", "profile", file, "--output-dir", out, *command_line(options)]
        assert_no_traceback(invoke(args), args, error_cells=args[0] == "plot")
