"""The equivalence figures are drawn from records, one file per figure and format, not blank."""

import pytest
import torch

from normbench.experiments.checks import scale_invariance_check
from normbench.experiments.data import load_dataset
from normbench.experiments.runner import ExperimentConfig, run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    from normbench.plots.equivalence import draw_all

    cfg = ExperimentConfig(regimes=["all"], seeds=[0, 1], protocols=["isolated", "paper"], train_size=96,
                           width=4, epochs=3, batch_size=32)
    records = run(cfg)
    checks = scale_invariance_check(load_dataset("digits", train_size=96), width=4, alphas=(0.5, 2.0))
    out = tmp_path_factory.mktemp("figs")
    return out, draw_all(records, checks, out, formats=("png", "svg")), records


def test_every_figure_is_written(drawn):
    out, files, _ = drawn
    stems = {f.stem for f in files}
    for protocol in ("isolated", "paper"):
        for kind in ("wd_regimes", "weight_norm", "effective_lr", "angular_update", "equilibrium"):
            assert f"{kind}_{protocol}" in stems
    assert {"normalizations", "lp_batch_norm", "scale_invariance"} <= stems
    assert {f.suffix for f in files} == {".png", ".svg"}
    assert all(f.exists() for f in files)


def test_figures_are_not_blank(drawn):
    import matplotlib.image as mpimg

    out, files, _ = drawn
    for f in files:
        if f.suffix == ".png":
            assert f.stat().st_size > 10_000, f
            pixels = mpimg.imread(f)[..., :3]
            assert (pixels < 0.5).mean() > 0.005, f"{f.name} is nearly blank"
    svg = (out / "wd_regimes_isolated.svg").read_text()
    assert svg.count("<path") > 20


def test_missing_regimes_skip_their_figures(tmp_path, drawn):
    from normbench.plots.equivalence import draw_all

    _, _, records = drawn
    only_on = [r for r in records if r["regime"] == "wd_on" and r["protocol"] == "isolated"]
    files = draw_all(only_on, None, tmp_path)
    assert {f.stem for f in files} == {"wd_regimes_isolated", "weight_norm_isolated", "effective_lr_isolated",
                                       "angular_update_isolated", "equilibrium_isolated"}
    # records without a per-step series (cached before it was recorded) draw no equilibrium figure
    old = [{k: v for k, v in r.items() if k != "steps"} for r in only_on]
    assert "equilibrium_isolated" not in {f.stem for f in draw_all(old, None, tmp_path / "old")}
    with pytest.raises(ValueError, match="format"):
        draw_all(only_on, None, tmp_path, formats=("gif",))


def _synthetic_records():
    """Two seeds of WD on, WD off and the paper's correction (diverged on seed 1), two epochs, one layer."""
    config = {"dataset": "digits", "model": "small", "lr": 0.1, "momentum": 0.9, "wd": 2e-3, "epochs": 2}
    layer = {"norm": 1.0, "effective_lr": 0.1, "angular_update": 0.01}
    records = []
    for regime, values in (("wd_on", [1.0, 1.1]), ("wd_off", [1.5, 1.7]), ("wd_off_corrected", [1.05, None])):
        for seed, v in enumerate(values):
            epochs = [{"lr": 0.1, "train_loss": 2.0, "test_loss": 2.0, "test_acc": 0.5, "layers": {"conv1": layer}}]
            if v is not None:
                epochs.append({"lr": 0.1, "train_loss": v, "test_loss": v, "test_acc": 0.9, "layers": {"conv1": layer}})
            records.append({"regime": regime, "seed": seed, "protocol": "isolated", "status": "ok", "config": config,
                            "diverged": v is None, "epochs": epochs})
    return records


def test_the_wd_figure_shows_the_verdict(tmp_path, monkeypatch):
    from normbench.experiments.summary import verdict
    from normbench.plots import equivalence as plots

    titles = {}

    def capture(fig, out, stem, formats):
        titles[stem] = fig._suptitle.get_text()
        return []

    monkeypatch.setattr(plots, "save_figure", capture)
    records = _synthetic_records()
    plots.draw_all(records, None, tmp_path, verdicts=verdict(records, "train_loss"))
    assert titles["wd_regimes_isolated"].endswith(
        "\nverdict [isolated] final training loss: WD off departs; the paper's correction: unstable: diverged on 1 of 2 seeds")
    plots.draw_all(records, None, tmp_path)  # without verdicts: no verdict line
    assert "verdict" not in titles["wd_regimes_isolated"]
