"""The summary table and the verdict, on records built by hand."""

import pytest

from normbench.experiments.summary import regime_table, verdict


def rec(regime, seed, train_loss, diverged=False, protocol="isolated", status="ok"):
    epochs = [] if diverged or status == "skipped" else [{"train_loss": train_loss, "test_loss": 0.1, "test_acc": 0.9}]
    return {"regime": regime, "seed": seed, "protocol": protocol, "diverged": diverged, "epochs": epochs, "status": status}


def runs(regime, values):
    """One record per seed 0, 1, ...; None is a run that diverged."""
    return [rec(regime, s, v, diverged=v is None) for s, v in enumerate(values)]


# WD on at 1.0 +- 0.1 (seed noise 0.1, so "within noise" is within 0.2); WD off +0.53 above it on every seed
ON, OFF = [1.0, 1.1, 0.9], [1.5, 1.7, 1.4]


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
    assert v["correction"] == "unstable: diverged on 1 of 3 seeds"
    assert "the paper's correction is unstable: diverged on 1 of 3 seeds" in v["text"]


def test_one_seed_cannot_judge_and_table_stats():
    records = [rec("wd_on", 0, 1.0), rec("wd_off", 0, 2.0)]
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is None
    rows = regime_table(records + [rec("wd_on", 1, 3.0)])
    on = next(r for r in rows if r["regime"] == "wd_on")
    assert on["seeds"] == 2 and on["train_loss"]["mean"] == 2.0 and on["train_loss"]["min"] == 1.0


def test_a_seed_that_diverged_makes_the_correction_unstable_even_if_the_others_close():
    records = runs("wd_on", ON) + runs("wd_off", OFF) + runs("wd_off_corrected", [None, 1.1, 0.9])
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is True
    assert v["correction"] == "unstable: diverged on 1 of 3 seeds"
    assert v["corrections"]["wd_off_corrected"]["verdict"] == "unstable: diverged on 1 of 3 seeds"
    assert v["corrections"]["wd_off_corrected"]["gap"] == pytest.approx(0.0)  # the finite seeds sit on WD on
    assert "the paper's correction is unstable: diverged on 1 of 3 seeds (gap +0 on the others)" in v["text"]
    assert "closes" not in v["text"] and "closes" not in v["short"]


def test_every_seed_diverged():
    records = runs("wd_on", ON) + runs("wd_off", OFF) + runs("wd_off_corrected", [None, None, None])
    records += runs("wd_off_corrected_grad", [1.1, 1.2, 1.0])
    (v,) = verdict(records, "train_loss")
    assert v["correction"] == "unstable: diverged on 3 of 3 seeds" and v["gap_corrected"] is None
    assert v["corrections"]["wd_off_corrected_grad"]["verdict"] == "closes"
    assert v["text"].endswith("; the paper's correction is unstable: diverged on 3 of 3 seeds; "
                              "the before-momentum variant closes it (gap +0.1)")
    assert v["short"] == ("[isolated] final training loss: WD off departs; the paper's correction: unstable: "
                          "diverged on 3 of 3 seeds; the before-momentum variant: closes")


@pytest.mark.parametrize("corrected", [[0.6, 0.65, 0.55], [0.3, 0.4, 0.2]])  # less far than WD off, and farther
def test_a_consistent_overshoot(corrected):
    records = runs("wd_on", ON) + runs("wd_off", OFF) + runs("wd_off_corrected", corrected)
    (v,) = verdict(records, "train_loss")
    assert v["correction"] == "overshoots" and v["corrections"]["wd_off_corrected"]["past_wd_on"] is True
    assert "the paper's correction overshoots it (gap -" in v["text"]
    assert "past WD on, opposite to WD off, in every seed" in v["text"]


def test_an_overshoot_within_noise_closes_and_says_so():
    records = runs("wd_on", ON) + runs("wd_off", OFF) + runs("wd_off_corrected", [0.9, 1.0, 0.8])
    (v,) = verdict(records, "train_loss")
    assert v["correction"] == "closes"
    assert "the paper's correction closes it (gap -0.1; past WD on in every seed, within noise)" in v["text"]


@pytest.mark.parametrize(
    "corrected, expected",
    [
        ([1.05, 1.0, 0.95], "closes"),
        ([1.3, 1.4, 1.2], "narrows"),
        ([1.6, 1.8, 1.5], "does not close"),
        ([0.5, 1.2, 0.4], "narrows"),  # beyond noise below WD on, but not on every seed: not an overshoot
    ],
)
def test_the_old_verdicts_stay(corrected, expected):
    records = runs("wd_on", ON) + runs("wd_off", OFF) + runs("wd_off_corrected", corrected)
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is True and v["correction"] == expected
    assert f"the paper's correction {expected} it (gap " in v["text"]


def test_wd_off_that_diverged_is_unstable_and_nothing_is_judged_against_it():
    records = runs("wd_on", ON) + runs("wd_off", [None, 1.7, 1.4]) + runs("wd_off_corrected", [1.05, 1.0, 0.95])
    (v,) = verdict(records, "train_loss")
    assert v["departs"] is None and v["wd_off"]["verdict"] == "unstable: diverged on 1 of 3 seeds"
    assert v["correction"] == "n/a"
    assert "WD off is unstable: diverged on 1 of 3 seeds (on the others: mean gap +0.55, seed noise 0.1)" in v["text"]
    assert "departs" not in v["text"] and "closes" not in v["text"]


def test_skipped_runs_are_not_counted_as_seeds_and_wd_on_divergence_is_reported():
    records = runs("wd_on", [1.0, 1.1, None]) + runs("wd_off", OFF)
    records += [rec("wd_off_corrected", 0, 0, diverged=True), rec("wd_off_corrected", 1, 1.1),
                rec("wd_off_corrected", 2, None, status="skipped")]
    (v,) = verdict(records, "train_loss")
    assert v["wd_on_diverged"] == 1
    assert v["correction"] == "unstable: diverged on 1 of 2 seeds"
    assert "WD on itself diverged on 1 of 3 seeds (compared on the others)" in v["text"]


def test_equilibrium_fraction_by_hand():
    from normbench.experiments.summary import equilibrium_fraction

    # lr 0.1 then 0.01, WD 2e-3, momentum 0.9: equilibria 0.014510 and 0.0045883 (by hand)
    on, after = 0.014510, 0.0045883
    series = {
        "every": 10, "step": [10, 20, 30, 40, 50, 60, 70, 80], "lr": [0.1] * 4 + [0.01] * 4,
        # phase 1: 1 of 4 smoothed points far off (the first), phase 2: all 4 at half the equilibrium
        "layers": {"conv1": {"angular_update": [0.1, on, on, on] + [after / 2] * 4, "norm": [1.0] * 8}},
    }
    record = {"config": {"wd": 2e-3, "momentum": 0.9, "spec": {"wd_conv": 2e-3}}, "steps": series}
    # window 10 steps = 1 point: no smoothing
    phases = equilibrium_fraction(record, tolerance=0.2, window=10)
    assert [p["lr"] for p in phases] == [0.1, 0.01] and [p["steps"] for p in phases] == [40, 40]
    assert phases[0]["equilibrium"] == pytest.approx(on, rel=1e-4)
    assert phases[1]["equilibrium"] == pytest.approx(after, rel=1e-4)
    assert phases[0]["fraction"] == pytest.approx(0.75) and phases[1]["fraction"] == 0.0
    assert phases[1]["ratio"] == pytest.approx(0.5, rel=1e-4)
    # the time scales, to first order (1 - momentum) / (2 lr WD) = 250 and 2,500 steps (by hand)
    assert phases[0]["time_scale"] == pytest.approx(250, rel=0.03)
    assert phases[1]["time_scale"] == pytest.approx(2500, rel=0.01)
    # window 20 steps = 2 points: the second point of phase 1 averages 0.1 and on: still off
    assert equilibrium_fraction(record, window=20)[0]["fraction"] == pytest.approx(0.5)
    assert equilibrium_fraction({"config": {"wd": 0.0, "momentum": 0.9, "spec": {"wd_conv": 0.0}}, "steps": series}) == []
    assert equilibrium_fraction({"config": record["config"]}) == []
