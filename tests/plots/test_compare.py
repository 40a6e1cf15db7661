"""The comparison figure: from a `compare --output` file or from BASE NEW results files, for
profile, stability and experiment comparisons; bad input is a one-line error."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from compare.synthetic import equivalence_record, profile_record, stability_record, times, write
from normbench.cli import main
from normbench.compare import compare_files
from normbench.errors import UserError
from normbench.plots.compare import plot_compare

PNG = b"\x89PNG\r\n\x1a\n"


def invoke(args):
    return CliRunner().invoke(main, args, prog_name="normbench")


@pytest.fixture
def profile_files(tmp_path):
    base = [profile_record("l2", "eager", times(1)), profile_record("l1", "eager", times(2, n=3)),
            profile_record("linf", "eager", times(3))]
    new = [profile_record("l2", "eager", [1.2 * t for t in times(11)]), profile_record("l1", "eager", times(12, n=3)),
           profile_record("linf", "eager", times(13))]
    return write(tmp_path / "a.json", "profile", base), write(tmp_path / "b.json", "profile", new)


def test_profile_ratios_with_intervals_svg(profile_files, tmp_path):
    rows = compare_files(*profile_files).records()
    paths = plot_compare(rows, tmp_path / "fig", ["png", "svg"])
    assert [p.name for p in paths] == ["compare-profile.png", "compare-profile.svg"]
    assert paths[0].read_bytes()[:8] == PNG
    svg = paths[1].read_text()
    assert "l2" in svg and "linf" in svg and "NEW / BASE median time" in svg and "slower" in svg
    one = plot_compare(rows, tmp_path / "one", ["png"], limit=1)
    assert "2 more not shown" in plot_compare(rows, tmp_path / "two", ["svg"], limit=1)[0].read_text()
    assert one[0].exists()


def test_cli_draws_a_comparison_file_and_results_files(profile_files, tmp_path):
    cmp = tmp_path / "cmp.csv"
    assert invoke(["compare", *profile_files, "--output", str(cmp)]).exit_code == 0
    res = invoke(["plot", "compare", str(cmp), "--output-dir", str(tmp_path / "f1")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f1" / "compare-profile.png").read_bytes()[:8] == PNG
    res = invoke(["plot", "compare", *profile_files, "--output-dir", str(tmp_path / "f2"), "--format", "svg",
                  "--threshold", "10%"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f2" / "compare-profile.svg").exists()


def test_stability_and_experiment_figures(tmp_path):
    sa = write(tmp_path / "sa.json", "stability", [stability_record(scale=1.0), stability_record(scale=10.0)])
    sb = write(tmp_path / "sb.json", "stability", [stability_record(scale=1.0, err_ulps=4.0),
                                                   stability_record(scale=10.0, safe=False, overflow=True,
                                                                    err_ulps=None, grad_err_ulps=None)])
    svg = plot_compare(compare_files(sa, sb).records(), tmp_path, ["svg"])[0].read_text()
    assert "gauss(scale=10)" in svg and "error in ulps" in svg
    ea = write(tmp_path / "ea.json", "equivalence", [equivalence_record("wd_on", s, 0.9 + 0.01 * s) for s in range(3)])
    eb = write(tmp_path / "eb.json", "equivalence", [equivalence_record("wd_on", s, 0.8 + 0.01 * s) for s in range(3)])
    paths = plot_compare(compare_files(ea, eb).records(), tmp_path, ["svg"])
    text = paths[0].read_text()
    assert paths[0].name == "compare-equivalence.svg" and "test_acc" in text and "train_loss" in text


def test_bad_input_is_one_line(profile_files, tmp_path):
    res = invoke(["plot", "compare", profile_files[0], "--output-dir", str(tmp_path)])
    assert res.exit_code == 2 and "give BASE and NEW results files" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = invoke(["plot", "compare", *profile_files, "--format", "bmp"])
    assert res.exit_code == 2 and "--format" in res.stderr
    only_added = write(tmp_path / "c.json", "profile", [profile_record("top10", "eager", times(5))])
    with pytest.raises(UserError, match="nothing to draw"):
        plot_compare(compare_files(profile_files[0], only_added).records(), tmp_path)
