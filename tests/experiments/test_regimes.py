"""Regime definitions, the weight-decay protocols and the schedules."""

import math

import pytest

from normbench.errors import UserError
from normbench.experiments.regimes import (
    REGIMES,
    WD_REGIMES,
    decays_before,
    equilibrium_angular_update,
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
