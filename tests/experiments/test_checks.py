"""The numeric scale-invariance check: BN-preceded weights invariant, the last layer not."""

import pytest
import torch

from normbench.experiments.checks import TOLERANCE, check_passes, scale_invariance_check
from normbench.experiments.data import load_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", train_size=128)


def test_bn_preceded_weights_are_scale_invariant(data):
    records = scale_invariance_check(data, width=4, alphas=(0.5, 3.0))
    bn = [r for r in records if r["kind"] == "bn-preceded"]
    assert {r["layer"] for r in bn} == {"conv1", "conv2", "conv3", "conv4"}
    for r in bn:
        assert r["loss_rel_change"] < TOLERANCE
        assert r["grad_ratio"] == pytest.approx(1.0, abs=1e-6)  # gradient scaled by 1/alpha
        assert r["invariant"]
    control = [r for r in records if r["kind"] == "control"]
    assert control and not any(r["invariant"] for r in control)
    assert check_passes(records)


def test_eps_breaks_invariance_measurably(data):
    """With batch-norm's usual eps the deviation is visible: the check can fail."""
    records = scale_invariance_check(data, width=4, alphas=(0.01,), eps=1e-2)
    assert not check_passes(records)
    assert max(r["grad_rel_err"] for r in records if r["kind"] == "bn-preceded") > TOLERANCE
