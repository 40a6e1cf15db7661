"""Figures of the half-precision experiment, drawn from synthetic records (nothing trains)."""

import math

import pytest

from normbench.plots import halfprec as figs


def _record(norm, compute, scale, seed, acc, reduction=None, regime="wd_on", diverged=False, event=None, dev=3.0):
    dtype = "fp32" if compute == "fp32" else "fp16"
    epochs = [] if diverged else [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "test_acc": acc,
         "norm_layers": {"norm1": {"max_deviation": dev * scale * (1 + 0.1 * e * (regime == "wd_off"))}}}
        for e in range(3)]
    return {"regime": regime, "norm": norm, "k": None, "compute": compute, "dtype": dtype, "compute_dtype": dtype,
            "reduction": reduction, "storage": "fp32", "scale": scale, "seed": seed, "status": "ok",
            "diverged": diverged, "first_nonfinite": event, "epochs": epochs,
            "final": {"test_acc": None if diverged else acc, "train_loss": None if diverged else 0.3}}


@pytest.fixture
def records():
    out = []
    for seed in (0, 1):
        for norm in ("l2", "l1"):
            for scale in (1.0, 100.0, 1e4):
                out.append(_record(norm, "fp32", scale, seed, 0.95))
                out.append(_record(norm, "framework", scale, seed, 0.94))
                for reduction in ("pairwise", "sum"):
                    fails = norm == "l2" and scale >= 100
                    out.append(_record(norm, "native", scale, seed, 0.1 if fails else 0.93, reduction,
                                       diverged=fails and reduction == "sum",
                                       event={"step": 0, "layer": "norm1", "quantity": "statistic"} if fails else None))
            out.append(_record(norm, "fp32", 1.0, seed, 0.95, regime="wd_off"))
    return out


def test_draw_all_writes_every_figure(records, tmp_path):
    verdicts = [{"dtype": "fp16", "reduction": "pairwise", "first_failing_scale": {"l2": 100.0, "l1": None},
                 "text": "native fp16, pairwise: L2 fails from scale 100."}]
    paths = figs.draw_all(records, tmp_path, ("png", "svg"), verdicts)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{stem}.{ext}" for stem in ("halfprec_accuracy_fp16", "halfprec_curves_fp16",
                                                        "halfprec_nonfinite_fp16", "halfprec_natural")
                           for ext in ("png", "svg"))
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_square_overflow_scale_from_the_scale_one_deviation(records):
    # the fp32 runs at scale 1 saw deviations up to 3.0: an fp16 square overflows at 65504 ** 0.5 / 3
    assert figs._square_overflow_scale(records, "fp16") == pytest.approx(math.sqrt(65504.0) / 3.0)


def test_curves_are_drawn_where_l2_first_fails(records):
    verdicts = [{"dtype": "fp16", "reduction": "pairwise", "first_failing_scale": {"l2": 100.0}}]
    assert figs.failing_scale(records, "fp16", "pairwise", verdicts) == 100.0
    assert figs.failing_scale(records, "fp16", "pairwise", []) == 1e4  # never fails: the largest scale


def test_unknown_format_is_refused(records, tmp_path):
    with pytest.raises(ValueError, match="format"):
        figs.draw_all(records, tmp_path, ("gif",))
