"""Training runs: the correction and the norm schedule are exactly the paper's, the last layer
keeps weight decay, the optimizer is torch's SGD, runs are deterministic and cached."""

import math

import pytest
import torch
import torch.nn.functional as F

from normbench.errors import UserError
from normbench.experiments import runner as runner_mod
from normbench.experiments.data import load_dataset
from normbench.experiments.models import build_model, conv_layers
from normbench.experiments.recorder import channel_angles
from normbench.experiments.regimes import REGIMES, decays_before
from normbench.experiments.runner import ExperimentConfig, _param_table, config_hash, run, train_run

torch.set_num_threads(1)

TINY = dict(train_size=128, width=4, epochs=4, batch_size=32, wd=2e-3, seeds=[0])


def tiny(**changes) -> ExperimentConfig:
    return ExperimentConfig(**{**TINY, "regimes": ["wd_on", "wd_off", "wd_off_corrected", "wd_off_corrected_grad",
                                                   "norm_schedule"], **changes})


@pytest.fixture(scope="module")
def wd_records():
    records = run(tiny())
    return {r["regime"]: r for r in records}


def _channels(record, epoch, layer, key):
    return torch.tensor(record["epochs"][epoch]["layers"][layer][key], dtype=torch.float64)


def test_corrected_effective_lr_equals_the_recorded_wd_run(wd_records):
    on, off = wd_records["wd_on"], wd_records["wd_off"]
    for corr in (wd_records["wd_off_corrected"], wd_records["wd_off_corrected_grad"]):
        assert not corr["diverged"]
        for e in range(len(on["epochs"])):
            for layer in on["epochs"][e]["layers"]:
                ref = _channels(on, e, layer, "channel_effective_lr")
                assert torch.allclose(_channels(corr, e, layer, "channel_effective_lr"), ref, rtol=1e-6, atol=0)
                assert corr["epochs"][e]["layers"][layer]["effective_lr"] == pytest.approx(
                    on["epochs"][e]["layers"][layer]["effective_lr"], rel=1e-6)
    # the comparison can fail: WD off's effective lr is not WD on's
    last = len(on["epochs"]) - 1
    gap = max(
        float((_channels(off, last, layer, "channel_effective_lr") / _channels(on, last, layer, "channel_effective_lr") - 1).abs().max())
        for layer in on["epochs"][last]["layers"]
    )
    assert gap > 1e-3


def test_corrected_step_is_scaled_per_channel_by_norm_ratio():
    """One step by hand: w1 = w0 - lr * (||w0_c||^2 / ||w_WD,c[0]||^2) * grad (no WD on the convs)."""
    cfg = tiny(train_size=32, epochs=1)
    data = load_dataset("digits", train_size=32)
    on = train_run(cfg.run_config("wd_on", 0, "isolated"), data)
    # after one step the WD run's norms are still about the initial ones; halve the recorded
    # targets so that the correction (about x4 here) is far from a plain step
    for layer in on["epochs"][0]["layers"].values():
        layer["channel_norms"] = [0.5 * v for v in layer["channel_norms"]]
    corr = train_run(cfg.run_config("wd_off_corrected", 0, "isolated"), data, reference=on)
    torch.manual_seed(0)
    model = build_model("small", "bn", 2.0, data.input_shape, 10, 4).train()
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(data.x_train[order]), data.y_train[order]).backward()
    for layer, conv in conv_layers(model):
        w, g = conv.weight.detach().double(), conv.weight.grad.double()
        target = _channels(on, 0, layer, "channel_norms")
        scale = w.flatten(1).norm(dim=1) ** 2 / target**2
        w1 = w - cfg.lr * scale.view(-1, 1, 1, 1) * g
        # the gradient is orthogonal to w (scale invariance), so the step shows first in the angle
        recorded = corr["epochs"][0]["layers"][layer]["angular_update"]
        assert recorded == pytest.approx(float(channel_angles(w, w1).mean()), rel=1e-4)
        assert torch.allclose(_channels(corr, 0, layer, "channel_norms"), w1.flatten(1).norm(dim=1), rtol=1e-5)
        plain = w - cfg.lr * g  # the uncorrected step turns the weights by another angle
        assert recorded != pytest.approx(float(channel_angles(w, plain).mean()), rel=1e-2)


@pytest.mark.parametrize("form", ["step", "gradient"])
def test_two_corrected_steps_by_hand(form):
    """The paper's form scales the momentum buffer by the current factor; the variant scales each
    gradient by the factor of the weights it was computed at, before it enters the buffer."""
    cfg = tiny(train_size=64, epochs=1)
    data = load_dataset("digits", train_size=64)
    on = train_run(cfg.run_config("wd_on", 0, "isolated"), data)
    for layer in on["epochs"][0]["layers"].values():
        layer["channel_norms"] = [0.5 * v for v in layer["channel_norms"]]
    regime = "wd_off_corrected" if form == "step" else "wd_off_corrected_grad"
    corr = train_run(cfg.run_config(regime, 0, "isolated"), data, reference=on)
    torch.manual_seed(0)
    model = build_model("small", "bn", 2.0, data.input_shape, 10, 4).train()
    convs = conv_layers(model)
    targets = {layer: _channels(on, 0, layer, "channel_norms") for layer, _ in convs}
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    bufs = {layer: 0.0 for layer, _ in convs}
    angles = {layer: [] for layer, _ in convs}
    # isolated protocol: every parameter but the conv weights keeps WD, with torch's SGD
    others = [p for name, p in model.named_parameters() if not name.startswith("conv")]
    opt = torch.optim.SGD(others, lr=0.1, momentum=0.9, weight_decay=2e-3)
    for i in (0, 32):
        model.zero_grad()
        F.cross_entropy(model(data.x_train[order[i:i + 32]]), data.y_train[order[i:i + 32]]).backward()
        with torch.no_grad():
            for layer, conv in convs:
                w = conv.weight
                scale = (w.double().flatten(1).norm(dim=1) ** 2 / targets[layer] ** 2).float().view(-1, 1, 1, 1)
                g = w.grad * scale if form == "gradient" else w.grad
                bufs[layer] = 0.9 * bufs[layer] + g
                step = 0.1 * (scale * bufs[layer] if form == "step" else bufs[layer])
                before = w.detach().clone()
                w -= step
                angles[layer].append(float(channel_angles(before, w).mean()))
        opt.step()
    for layer, _ in convs:
        expected = sum(angles[layer]) / 2
        assert corr["epochs"][0]["layers"][layer]["angular_update"] == pytest.approx(expected, rel=1e-4), layer


def test_norm_schedule_norms_follow_the_wd_run_grown_at_each_decay(wd_records):
    on, ns = wd_records["wd_on"], wd_records["norm_schedule"]
    epochs = len(on["epochs"])
    for e in range(epochs):
        factor = math.sqrt(10.0) ** decays_before(e, epochs)
        assert ns["epochs"][e]["conv_lr"] == 0.1  # no lr decay for the conv weights
        for layer in on["epochs"][e]["layers"]:
            expected = _channels(on, e, layer, "channel_norms") * factor
            assert torch.allclose(_channels(ns, e, layer, "channel_norms"), expected, rtol=1e-5)
            assert torch.allclose(_channels(ns, e, layer, "channel_effective_lr"),
                                  _channels(on, e, layer, "channel_effective_lr"), rtol=1e-5)
    assert ns["epochs"][-1]["lr"] == pytest.approx(0.1 * 0.1**3)  # the other parameters still decay


@pytest.mark.parametrize("protocol", ["paper", "isolated"])
def test_last_layer_keeps_wd(protocol):
    cfg = tiny(protocols=[protocol])
    data = load_dataset("digits", train_size=128)
    torch.manual_seed(0)
    model = build_model("small", "bn", 2.0, data.input_shape, 10, 4)
    kinds = {name: kind for name, _, kind, _ in _param_table(model)}
    assert kinds["classifier.weight"] == kinds["classifier.bias"] == "last"
    rc = cfg.run_config("wd_off", 0, protocol)
    assert rc["spec"]["wd_last"] == 2e-3 and rc["spec"]["wd_conv"] == 0.0
    # behaviour: WD off with and without the last layer's decay train differently
    with_wd = train_run(rc, data)
    no_wd = train_run(tiny(wd=0.0, protocols=[protocol]).run_config("wd_off", 0, protocol), data)
    assert with_wd["final"]["train_loss"] != no_wd["final"]["train_loss"]


def test_optimizer_is_torch_sgd():
    """Our SGD (written out for the per-channel correction) matches torch.optim.SGD for wd_on."""
    cfg = tiny(train_size=64, epochs=1)
    data = load_dataset("digits", train_size=64)
    record = train_run(cfg.run_config("wd_on", 0, "paper"), data)
    torch.manual_seed(0)
    model = build_model("small", "bn", 2.0, data.input_shape, 10, 4).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-3)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for i in range(0, 64, 32):
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[order[i:i + 32]]), data.y_train[order[i:i + 32]]).backward()
        opt.step()
    for layer, conv in conv_layers(model):
        norms = conv.weight.detach().double().flatten(1).norm(dim=1)
        assert torch.allclose(_channels(record, 0, layer, "channel_norms"), norms, rtol=1e-5)


def test_deterministic_and_records_schema(wd_records):
    again = run(tiny(regimes=["wd_on"]))[0]
    assert again["epochs"] == wd_records["wd_on"]["epochs"]
    entry = again["epochs"][0]
    for key in ("epoch", "lr", "train_loss", "test_loss", "test_acc", "layers"):
        assert key in entry
    for layer in entry["layers"].values():
        assert {"norm", "effective_lr", "angular_update", "channel_norms"} <= set(layer)
    assert again["protocol"] == "isolated" and again["status"] == "ok"


def test_cache_avoids_retraining(tmp_path, monkeypatch):
    cfg = tiny(regimes=["wd_on", "batch_norm", "wd_off_corrected"], epochs=2)
    first = run(cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2  # batch_norm trains as wd_on: one entry
    assert not any(r["cached"] for r in first)

    def refuse(*args, **kwargs):
        raise AssertionError("retrained a cached run")

    monkeypatch.setattr(runner_mod, "train_run", refuse)
    second = run(cfg, cache_dir=tmp_path)
    assert all(r["cached"] for r in second)
    assert [r["epochs"] for r in second] == [r["epochs"] for r in first]
    # a changed setting is a new run
    with pytest.raises(AssertionError, match="retrained"):
        run(tiny(regimes=["wd_on"], epochs=2, lr=0.05), cache_dir=tmp_path)


def test_hash_ignores_names_not_training():
    cfg = tiny()
    assert config_hash(cfg.run_config("wd_on", 0, "paper")) == config_hash(cfg.run_config("batch_norm", 0, "isolated"))
    assert config_hash(cfg.run_config("wd_off", 0, "paper")) != config_hash(cfg.run_config("wd_off", 0, "isolated"))
    assert config_hash(cfg.run_config("wd_on", 0, "paper")) != config_hash(cfg.run_config("wd_on", 1, "paper"))


def test_normalization_regimes_train():
    records = run(tiny(regimes=["weight_norm", "bounded_weight_norm", "batch_norm_linf"], width=8, train_size=256, epochs=8))
    for r in records:
        assert r["final"]["test_acc"] > 0.3, r["regime"]  # chance is 0.1
    bwn = records[1]
    # bounded WN keeps each conv channel's weight norm at its initial value: its v may move,
    # the recorded direction parameter v has norm > 0 and finite
    assert all(math.isfinite(x) for x in bwn["epochs"][-1]["layers"]["conv1"]["channel_norms"])


def test_bad_config():
    with pytest.raises(UserError, match="epochs"):
        run(tiny(epochs=0))
    with pytest.raises(UserError, match="protocol"):
        run(tiny(protocols=["nope"]))
    with pytest.raises(ValueError, match="needs a complete wd_on"):
        train_run(tiny().run_config("wd_off_corrected", 0, "isolated"), load_dataset("digits", train_size=128))
    assert REGIMES["wd_off_corrected"].needs_reference


def test_shared_runs_carry_the_names_they_were_asked_for():
    records = run(tiny(regimes=["wd_on", "wd_off"], protocols=["isolated", "paper"], epochs=1))
    assert [(r["protocol"], r["regime"]) for r in records] == [
        ("isolated", "wd_on"), ("isolated", "wd_off"), ("paper", "wd_on"), ("paper", "wd_off")]
    assert records[0]["epochs"] == records[2]["epochs"]  # wd_on trains the same under both protocols
    assert records[1]["epochs"] != records[3]["epochs"]  # wd_off does not (paper: BN params lose WD)


def test_diverged_reference_skips_the_runs_that_follow_it():
    records = run(tiny(regimes=["wd_on", "wd_off_corrected", "norm_schedule"], lr=1e30, epochs=2))
    on, corr, ns = records
    assert on["diverged"] and on["status"] == "ok" and "loss became" in on["reason"]
    for r in (corr, ns):
        assert r["status"] == "skipped" and "diverged" in r["reason"] and r["epochs"] == []


def test_per_step_series_matches_the_angle_between_weight_snapshots(monkeypatch):
    """The per-step angular update against a direct computation from weights saved at each step."""
    from normbench.experiments import recorder as recorder_mod

    saved = []
    original = recorder_mod.Recorder.after_step

    def spy(self, before, lr=None):
        saved.append([b.clone() for b in before] + [p.detach().clone() for _, p in self.layers])
        original(self, before, lr)

    monkeypatch.setattr(recorder_mod.Recorder, "after_step", spy)
    monkeypatch.setattr(runner_mod, "STEP_POINTS", 3)  # 3 epochs x 3 steps: blocks of 3 steps
    cfg = tiny(regimes=["wd_on"], train_size=96, epochs=3)
    record = train_run(cfg.run_config("wd_on", 0, "isolated"), load_dataset("digits", train_size=96))
    series = record["steps"]
    assert series["every"] == 3 and series["step"] == [3, 6, 9]
    assert series["lr"] == [e["conv_lr"] for e in record["epochs"]]
    n_layers = len(series["layers"])
    for layer_index, name in enumerate(series["layers"]):
        by_hand = []
        for snap in saved:
            a = snap[layer_index].double().flatten(1)
            b = snap[n_layers + layer_index].double().flatten(1)
            cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
            by_hand.append(float(torch.arccos(cos.clamp(-1, 1)).mean()))
        blocks = [sum(by_hand[i : i + 3]) / 3 for i in range(0, 9, 3)]
        assert series["layers"][name]["angular_update"] == pytest.approx(blocks, rel=1e-9)
        # the epoch mean is the mean of the epoch's steps, the norm the one at the block's end
        assert [e["layers"][name]["angular_update"] for e in record["epochs"]] == pytest.approx(blocks, rel=1e-9)
        assert series["layers"][name]["norm"] == pytest.approx(
            [float(saved[i][n_layers + layer_index].double().norm()) for i in (2, 5, 8)], rel=1e-12)
