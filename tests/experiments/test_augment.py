"""The augmentation of the equivalence experiments: deterministic for a seed, label preserving
(labels are never touched, the image is only moved on its canvas), the shapes and values right."""

import pytest
import torch

from normbench.errors import UserError
from normbench.experiments.augment import Augment, canonical_augment, parse_augment
from normbench.experiments.data import load_dataset
from normbench.experiments.runner import ExperimentConfig, config_hash, run

torch.set_num_threads(1)


def _images(n=6, side=5):
    x = torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(3)) + 1.0  # all above background 0
    return x


def test_parse_and_canonical_spec():
    assert parse_augment("noise=0.3, shift=2") == Augment(scale=1, shift=2, noise=0.3)
    assert canonical_augment("noise=0.30,shift=2") == "shift=2,noise=0.3"
    assert canonical_augment(None) is None and canonical_augment("none") is None and canonical_augment("shift=0") is None
    assert parse_augment("scale=2").output_shape((1, 8, 8)) == (1, 16, 16)
    assert parse_augment("scale=2,shift=3").output_shape((3, 8, 8)) == (3, 22, 22)
    for bad, match in (("flip=1", "key"), ("shift", "key"), ("shift=a", "number"), ("shift=1.5", "integer"),
                       ("scale=0", "scale"), ("noise=-1", "noise")):
        with pytest.raises(UserError, match=match):
            parse_augment(bad)


def test_same_seed_same_batch_other_seed_other_batch():
    aug = parse_augment("shift=2,noise=0.3")
    x = _images()
    a = aug.train_batch(x, torch.Generator().manual_seed(0))
    b = aug.train_batch(x, torch.Generator().manual_seed(0))
    c = aug.train_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (6, 1, 9, 9)
    # the global RNG is neither read nor advanced
    state = torch.get_rng_state()
    aug.train_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_shift_places_each_image_whole_at_an_offset_within_range():
    aug = parse_augment("shift=2")
    x = _images(n=40)
    background = torch.tensor([-0.5])
    out = aug.train_batch(x, torch.Generator().manual_seed(5), background)
    offsets = set()
    for i in range(len(x)):
        # find where the image landed: the canvas is background except one 5x5 window holding x[i]
        found = [(r, c) for r in range(5) for c in range(5) if torch.equal(out[i, :, r : r + 5, c : c + 5], x[i])]
        assert len(found) == 1, i
        r, c = found[0]
        rest = out[i].clone()
        rest[:, r : r + 5, c : c + 5] = -0.5
        assert torch.all(rest == -0.5)
        offsets.add(found[0])
    assert len(offsets) > 10  # offsets spread over the 5x5 possible ones
    # the test view is the centred placement, deterministic
    centred = aug.test_view(x, background)
    assert torch.equal(centred[:, :, 2:7, 2:7], x)
    assert float(centred.sum()) == pytest.approx(float(x.sum()) + (-0.5) * (81 - 25) * len(x))


def test_scale_upscales_by_nearest_neighbour_and_noise_has_its_std():
    x = _images(n=2, side=3)
    up = parse_augment("scale=2").test_view(x)
    assert up.shape == (2, 1, 6, 6)
    assert torch.equal(up[:, :, ::2, ::2], x) and torch.equal(up[:, :, 1::2, 1::2], x)
    big = torch.zeros(200, 1, 8, 8)
    noisy = parse_augment("noise=0.5").train_batch(big, torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.03)
    assert torch.equal(parse_augment(None).train_batch(x, torch.Generator()), x)


def test_background_is_the_standardized_zero_pixel():
    d = load_dataset("digits", train_size=200)
    # digits' corners are blank: their standardized value is the background
    assert torch.allclose(d.x_train[:, :, 0, 0].min(), d.background[0], atol=1e-6)


def test_config_without_augmentation_keeps_its_cache_key():
    plain = ExperimentConfig(seeds=[0]).validate()
    rc = plain.run_config("wd_on", 0, "isolated")
    assert "augment" not in rc  # so runs cached before the field existed are still found
    aug = ExperimentConfig(seeds=[0], augment="shift=2").validate().run_config("wd_on", 0, "isolated")
    assert aug["augment"] == "shift=2" and config_hash(aug) != config_hash(rc)
    with pytest.raises(UserError, match="augmentation"):
        ExperimentConfig(augment="turn=3").validate()


def test_augmented_run_is_deterministic_and_sees_the_canvas():
    cfg = ExperimentConfig(regimes=["wd_on"], seeds=[0], train_size=96, width=4, epochs=2, augment="shift=2,noise=0.2")
    first, second = run(cfg), run(cfg)
    assert first[0]["epochs"] == second[0]["epochs"]
    plain = run(ExperimentConfig(regimes=["wd_on"], seeds=[0], train_size=96, width=4, epochs=2))
    assert plain[0]["epochs"][-1]["train_loss"] != first[0]["epochs"][-1]["train_loss"]
