"""Experiments (equivalence, halfprec): final metrics over seeds against the seed noise."""

from __future__ import annotations

import pytest

from compare.synthetic import equivalence_record, halfprec_record, write
from normbench.compare import compare_files
from normbench.compare.experiments import final_values, judge_diverged, judge_metric


def runs(regime, accs, **kw):
    return [equivalence_record(regime, seed, acc, **kw) for seed, acc in enumerate(accs)]


def test_mean_std_and_a_move_beyond_the_seed_noise():
    base = runs("wd_on", [0.90, 0.91, 0.92])
    row = judge_metric(base, runs("wd_on", [0.80, 0.81, 0.82]), "test_acc")
    assert row["base_mean"] == pytest.approx(0.91) and row["base_std"] == pytest.approx(0.01)
    assert row["base_seeds"] == row["new_seeds"] == 3
    assert row["delta"] == pytest.approx(-0.10) and row["verdict"] == "worse"
    assert row["delta_low"] == pytest.approx(-0.12) and row["delta_high"] == pytest.approx(-0.08)
    assert judge_metric(base, runs("wd_on", [0.95, 0.96, 0.97]), "test_acc")["verdict"] == "better"


def test_within_the_seed_noise_is_same_and_direction_follows_the_metric():
    base = runs("wd_on", [0.90, 0.92, 0.94], train_loss=0.1)
    assert judge_metric(base, runs("wd_on", [0.91, 0.93, 0.95]), "test_acc")["verdict"] == "same"
    lower_loss = [equivalence_record("wd_on", s, 0.9, train_loss=0.05 + 0.001 * s) for s in range(3)]
    higher = [equivalence_record("wd_on", s, 0.9, train_loss=0.2 + 0.001 * s) for s in range(3)]
    assert judge_metric(higher, lower_loss, "train_loss")["verdict"] == "better"  # loss down is better
    assert judge_metric(lower_loss, higher, "train_loss")["verdict"] == "worse"


def test_one_seed_is_unsure_and_diverged_runs_are_left_out():
    row = judge_metric(runs("wd_on", [0.9]), runs("wd_on", [0.5]), "test_acc")
    assert row["verdict"] == "unsure" and "fewer than 2 seeds" in row["note"]
    mixed = runs("wd_on", [0.9, 0.91]) + [equivalence_record("wd_on", 2, 0.1, diverged=True)]
    assert final_values(mixed, "test_acc") == [0.9, 0.91]
    assert judge_diverged(runs("wd_on", [0.9, 0.9]), mixed)["verdict"] == "unstable"
    assert judge_diverged(mixed, runs("wd_on", [0.9, 0.9]))["verdict"] == "stabler"


def test_equivalence_files_grouped_without_seed(tmp_path):
    base = write(tmp_path / "a.json", "equivalence", runs("wd_on", [0.90, 0.91, 0.92]) + runs("wd_off", [0.8, 0.81]))
    new = write(tmp_path / "b.json", "equivalence", runs("wd_on", [0.70, 0.71, 0.72]) + runs("bounded_weight_norm", [0.8]))
    cmp = compare_files(base, new)
    assert cmp.kind.name == "equivalence"
    on = {r["metric"]: r for r in cmp.rows if r["regime"] == "wd_on"}
    assert set(on) == {"test_acc", "test_loss", "train_loss", "diverged"}
    assert on["test_acc"]["verdict"] == "worse" and on["test_loss"]["verdict"] == "same"
    assert [r["regime"] for r in cmp.removed] == ["wd_off"] and [r["regime"] for r in cmp.added] == ["bounded_weight_norm"]
    assert cmp.rows[0]["metric"] == "test_acc"  # the most moved first


def test_halfprec_is_one_table_entry(tmp_path):
    base = [halfprec_record("l2", s, 0.9 + 0.01 * s) for s in range(3)] + [halfprec_record("l1", s, 0.9) for s in range(2)]
    new = [halfprec_record("l2", s, 0.5, diverged=s == 0) for s in range(3)] + [halfprec_record("l1", s, 0.9) for s in range(2)]
    cmp = compare_files(write(tmp_path / "a.json", "halfprec", base), write(tmp_path / "b.csv", "halfprec", new))
    assert cmp.kind.name == "halfprec"
    verdicts = {(r["norm"], r["metric"]): r["verdict"] for r in cmp.rows}
    assert verdicts[("l2", "diverged")] == "unstable" and verdicts[("l2", "test_acc")] == "worse"
    assert verdicts[("l1", "test_acc")] == "same" and not cmp.added and not cmp.removed
    assert [r["cell"] for r in cmp.rows if r["metric"] == "diverged"] == ["l2", "l1"]
