"""The stability figure: drawn from records (and from a file through the CLI), PNG, SVG and PDF;
a file without a Gaussian sweep is a one-line user error."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from normbench.cli import main
from normbench.errors import UserError
from normbench.numerics import StabilitySpec, run
from normbench.plots.stability import plot_stability, plot_stability_file


@pytest.fixture(scope="module")
def records():
    return run(StabilitySpec(norms=("l2", "l1"), dtypes=("fp16", "fp8_e4m3"), cases=("gauss", "tiny"), quick=True))


def test_png_svg_pdf(records, tmp_path):
    png = plot_stability(records, tmp_path)
    assert png.name == "stability.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_stability(records, tmp_path, fmt="svg")
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "fp8_e4m3" in text and "squares &gt; fp16 max" in text
    pdf = plot_stability(records, tmp_path, fmt="pdf", compute="native")
    assert pdf.read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError):
        plot_stability(records, tmp_path, fmt="bmp")


def test_no_sweep_is_a_user_error(records, tmp_path):
    with pytest.raises(UserError, match="no Gaussian scale sweep"):
        plot_stability([r for r in records if r["case"]["name"] != "gauss"], tmp_path)


def test_cli_plot_stability(records, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"schema": "normbench.stability/1", "environment": {}, "records": records}))
    res = CliRunner().invoke(main, ["plot", "stability", str(path), "--output-dir", str(tmp_path / "o"),
                                    "--format", "svg"], prog_name="normbench")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "stability.svg").exists()
    res = CliRunner().invoke(main, ["plot", "stability", str(tmp_path / "none.json")], prog_name="normbench")
    assert res.exit_code == 2 and res.stderr.strip().startswith("Error:") and len(res.stderr.strip().splitlines()) == 1
    other = tmp_path / "p.json"
    other.write_text(json.dumps({"schema": "normbench.profile/1", "environment": {}, "records": []}))
    with pytest.raises(UserError, match="expected normbench.stability/1"):
        plot_stability_file(other, tmp_path)


@pytest.mark.parametrize("edit, words", [
    (lambda r: {"status": "ok", "case": r["case"]}, "lack norm, dtype, compute"),
    (lambda r: {**r, "case": {**r["case"], "shape": "2x3"}}, "lack case shape"),
    (lambda r: {**r, "case": {**r["case"], "scale": "big"}}, "lack case scale"),
    (lambda r: {**r, "dtype": "fp99"}, "dtype is 'fp99'"),
])
def test_a_hand_written_sweep_record_is_a_one_line_error_not_a_traceback(records, tmp_path, edit, words):
    """A results file whose Gaussian-sweep records lack what the figure reads (written by hand or
    by another tool): a UserError naming what is missing (it used to be a KeyError or TypeError)."""
    sweep = [r for r in records if r["case"]["name"] == "gauss"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"schema": "normbench.stability/1", "environment": {},
                                "records": [edit(sweep[0])] + sweep[1:4]}))
    res = CliRunner().invoke(main, ["plot", "stability", str(path), "--output-dir", str(tmp_path)], prog_name="normbench")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0]
