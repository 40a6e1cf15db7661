"""The summary table and the verdict, on records built by hand."""

import pytest

from normbench.experiments.summary import regime_table, verdict


def rec(regime, seed, train_loss, diverged=False, protocol="isolated"):
    epochs = [] if diverged else [{"train_loss": train_loss, "test_loss": 0.1, "test_acc": 0.9}]
    return {"regime": regime, "seed": seed, "protocol": protocol, "diverged": diverged, "epochs": epochs}


def test_departs_and_closes():
    records = [rec("wd_on", s, v) for s, v in enumerate([1.0, 1.1, 0.9])]
    records += [rec("wd_off", s, v) for s, v in enumerate([1.5, 1.7, 1.4])]
    records += [rec("wd_off_corrected", s, v) for s, v in enumerate([1.05, 1.0, 0.95])]
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is True
    assert v["gap_wd_off"] == pytest.approx(0.5333, rel=1e-3)
    assert v["correction"] == "closes"
    assert "departs from" in v["text"] and "the paper's correction closes" in v["text"]


def test_no_departure_within_noise_and_diverged_runs_reported():
    records = [rec("wd_on", s, v) for s, v in enumerate([1.0, 2.0, 0.5])]
    records += [rec("wd_off", s, v) for s, v in enumerate([1.1, 2.1, 0.6])]
    records += [rec("wd_off_corrected", 0, 0, diverged=True), rec("wd_off_corrected", 1, 2.0), rec("wd_off_corrected", 2, 0.5)]
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is False
    assert v["corrected_diverged"] == 1
    assert "diverged for 1 of 3 seeds" in v["text"]


def test_one_seed_cannot_judge_and_table_stats():
    records = [rec("wd_on", 0, 1.0), rec("wd_off", 0, 2.0)]
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is None
    rows = regime_table(records + [rec("wd_on", 1, 3.0)])
    on = next(r for r in rows if r["regime"] == "wd_on")
    assert on["seeds"] == 2 and on["train_loss"]["mean"] == 2.0 and on["train_loss"]["min"] == 1.0
