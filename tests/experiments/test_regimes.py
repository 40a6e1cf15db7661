"""Regime definitions, the weight-decay protocols and the schedules."""

import math

import pytest

from normbench.errors import UserError
from normbench.experiments.regimes import (
    REGIMES,
    WD_REGIMES,
    decays_before,
    equilibrium_angular_update,
    equilibrium_time_scale,
    lr_at,
    milestones,
    norm_schedule_factor,
    parse_regimes,
    weight_decay_of,
)


def test_milestones_every_quarter():
    assert milestones(80) == [20, 40, 60]
    assert milestones(30) == [8, 15, 22]
    assert milestones(4) == [1, 2, 3]
    assert milestones(1) == []


def test_lr_schedule_and_norm_schedule_keep_effective_lr():
    epochs, lr, gamma = 40, 0.1, 0.1
    for e in range(epochs):
        k = decays_before(e, epochs)
        assert lr_at(e, epochs, lr, gamma) == pytest.approx(lr * gamma**k)
        # constant lr over (norm grown by the schedule)^2 equals the decayed lr over the norm^2
        assert lr / norm_schedule_factor(e, epochs, gamma) ** 2 == pytest.approx(lr_at(e, epochs, lr, gamma))


@pytest.mark.parametrize("protocol", ["paper", "isolated"])
def test_last_layer_keeps_wd_in_every_regime(protocol):
    for regime in REGIMES.values():
        assert weight_decay_of("last", regime, protocol, 5e-4) == 5e-4


def test_protocols():
    on, off = REGIMES["wd_on"], REGIMES["wd_off"]
    assert weight_decay_of("conv", on, "paper", 1e-3) == 1e-3
    assert weight_decay_of("conv", off, "paper", 1e-3) == 0.0
    assert weight_decay_of("conv", off, "isolated", 1e-3) == 0.0
    # paper: WD off also drops batch-norm's weight and bias; isolated: they keep it
    assert weight_decay_of("other", off, "paper", 1e-3) == 0.0
    assert weight_decay_of("other", off, "isolated", 1e-3) == 1e-3
    assert weight_decay_of("other", on, "paper", 1e-3) == 1e-3


def test_parse_regimes():
    assert parse_regimes("wd") == list(WD_REGIMES)
    assert parse_regimes("wd_on, wd_off,wd_on") == ["wd_on", "wd_off"]
    assert len(parse_regimes("all")) == len(REGIMES)
    with pytest.raises(UserError, match="unknown regime"):
        parse_regimes("wd_on,nope")
    with pytest.raises(UserError):
        parse_regimes("")


def test_equilibrium_angular_update():
    assert equilibrium_angular_update(0.1, 5e-4, 0.9) == pytest.approx(math.sqrt(1e-4 / 1.9))
    # by hand: 2 * 0.1 * 5e-4 / 1.9 = 5.2632e-5, whose square root is 0.0072548
    assert equilibrium_angular_update(0.1, 5e-4, 0.9) == pytest.approx(0.0072548, rel=1e-4)
    # 2 * 0.1 * 2e-3 / 1.9 = 2.1053e-4 -> 0.014510; after one decay (lr 0.01) sqrt(10) smaller: 0.0045883
    assert equilibrium_angular_update(0.1, 2e-3, 0.9) == pytest.approx(0.014510, rel=1e-4)
    assert equilibrium_angular_update(0.01, 2e-3, 0.9) == pytest.approx(0.0045883, rel=1e-4)
    assert equilibrium_angular_update(0.1, 0.0, 0.9) == 0.0


@pytest.mark.parametrize("lr, wd, momentum", [(0.1, 1e-2, 0.9), (0.01, 1e-2, 0.9), (0.05, 2e-3, 0.0)])
def test_equilibrium_time_scale_is_the_e_folding_of_the_squared_norm_under_sgd(lr, wd, momentum):
    # SGD with momentum and weight decay alone (no gradient) on a weight: once the velocity has
    # built up (30 steps), count the steps until its squared norm has fallen by e
    w, v = 1.0, 0.0
    for _ in range(30):
        v = momentum * v + wd * w
        w -= lr * v
    start, steps = w * w, 0
    while w * w > start * math.exp(-1.0):
        v = momentum * v + wd * w
        w -= lr * v
        steps += 1
    assert abs(steps - equilibrium_time_scale(lr, wd, momentum)) <= 2  # whole steps, and the fast mode's remnant


def test_equilibrium_time_scale_by_hand():
    # by hand, to first order: (1 - momentum) / (2 lr wd) = 0.1 / (2 * 0.1 * 0.01) = 50
    assert equilibrium_time_scale(0.1, 1e-2, 0.9) == pytest.approx(50.0, rel=0.12)
    assert equilibrium_time_scale(0.001, 1e-2, 0.9) == pytest.approx(5000.0, rel=0.01)
    assert equilibrium_time_scale(0.1, 0.0, 0.9) == math.inf
