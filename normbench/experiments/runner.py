"""Training runs of the equivalence experiments, cached by their configuration.

:func:`run` takes an :class:`ExperimentConfig` (a grid of regimes x seeds x protocols plus the
shared settings) and returns one record per run, in the ``normbench.equivalence/1`` layout of
docs/equivalence.md. Each run is identified by the hash of everything that changes its numbers (dataset,
model, optimizer settings, epochs, seed, protocol, the regime's training spec, device, and
:data:`CODE_VERSION`); a finished run is stored as ``<cache_dir>/<hash>.json`` and reused, so
drawing again does not retrain. The corrected and norm-schedule regimes read the per-channel norms
of the ``wd_on`` run of the same seed and protocol, which is trained (or read from the cache) first.

SGD with momentum is written out (it is torch's SGD: ``buf = mu * buf + (grad + wd * w)``,
``w -= lr * buf``) because the correction scales each conv channel's step by its own factor.
Runs are deterministic for a seed on the CPU at a fixed thread count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.kernels.background import compile_mode
from normbench import distributed
from normbench.experiments.distributed import wrap as wrap_for_ranks
from normbench.experiments.augment import canonical_augment, parse_augment
from normbench.experiments.data import DATASETS, Dataset, load_dataset
from normbench.experiments.models import ARCHS, build_model, conv_layers, is_last_layer_param
from normbench.experiments.recorder import Recorder, channel_norms, direction_param
from normbench.experiments.regimes import (
    REFERENCE_REGIME,
    REGIMES,
    WD_REGIMES,
    Regime,
    check_protocol,
    lr_at,
    norm_schedule_factor,
    parse_regimes,
    weight_decay_of,
)

KINDS = ("conv", "other", "last")
# At most this many points per layer in a record's per-step series (blocks of steps averaged beyond it)
STEP_POINTS = 500
# The augmentation's generator is seeded with the run seed plus this, apart from the shuffle's
AUGMENT_SEED_OFFSET = 1_000_003

CODE_VERSION = 1  # bump when a change to training changes the numbers: old cache entries go stale


@dataclass
class ExperimentConfig:
    """A grid of runs (regimes x seeds x protocols) and the settings they share."""

    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    protocols: list[str] = field(default_factory=lambda: ["isolated"])
    dataset: str = "digits"
    data_dir: str | None = None
    train_size: int | None = None
    label_noise: float = 0.0
    data_seed: int = 0
    augment: str | None = None  # a spec of normbench.experiments.augment ("shift=2,noise=0.3"); None: none
    model: str = "small"
    width: int | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    wd: float = 5e-4
    gamma: float = 0.1
    device: str = "cpu"

    def validate(self) -> "ExperimentConfig":
        """Check every field; a UserError names the first bad one. Returns self."""
        self.regimes = parse_regimes(self.regimes)
        if not self.seeds:
            raise UserError("no seed given")
        if not self.protocols:
            raise UserError("no protocol given")
        for p in self.protocols:
            check_protocol(p)
        if self.dataset not in DATASETS:
            raise UserError(f"unknown dataset {self.dataset!r}: use one of {', '.join(DATASETS)}")
        if self.model not in ARCHS:
            raise UserError(f"unknown model {self.model!r}: use one of {', '.join(ARCHS)}")
        for name, value, low in (("epochs", self.epochs, 1), ("batch size", self.batch_size, 1)):
            if value < low:
                raise UserError(f"{name} must be at least {low}, got {value}")
        for name, value in (("lr", self.lr), ("weight decay", self.wd)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.gamma <= 1:
            raise UserError(f"lr decay factor must be in (0, 1], got {self.gamma}")
        if self.train_size is not None and self.train_size < 1:
            raise UserError(f"train size must be positive, got {self.train_size}")
        self.augment = canonical_augment(self.augment)
        return self

    def run_config(self, regime: str, seed: int, protocol: str) -> dict[str, Any]:
        """The JSON configuration of one run (what its hash covers, plus the regime's name)."""
        shared = asdict(self)
        for key in ("regimes", "seeds", "protocols"):
            shared.pop(key)
        if shared["augment"] is None:  # left out, so that runs without augmentation keep their cache keys
            shared.pop("augment")
        shared["device"] = torch.device(self.device).type
        if distributed.world() > 1:  # equal to one process up to rounding only: its own cache entry
            shared["world_size"] = distributed.world()
        r = REGIMES[regime]
        spec = dict(r.spec(), **{f"wd_{kind}": weight_decay_of(kind, r, protocol, self.wd) for kind in KINDS})
        return {"regime": regime, "seed": seed, "protocol": protocol, **shared, "spec": spec}


def config_hash(run_config: dict[str, Any]) -> str:
    """The cache key of a run: a hash of its configuration without the regime's and protocol's
    names (the spec holds what they change: who gets which weight decay, the step rule), so runs
    that train identically, such as ``wd_on`` and ``batch_norm``, or ``wd_on`` under both
    protocols, share one entry."""
    keyed = {k: v for k, v in run_config.items() if k not in ("regime", "protocol")}
    keyed["code_version"] = CODE_VERSION
    text = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Progress(Protocol):
    """What :func:`run` reports while it works (the CLI draws rich progress bars from it)."""

    def run_started(self, label: str, epochs: int) -> None: ...

    def epoch_done(self) -> None: ...

    def run_finished(self, cached: bool) -> None: ...


class Probe(Protocol):
    """What another experiment adds to a training run (``plot halfprec`` computes the batch-norms
    in low precision and watches them): :meth:`attach` changes the freshly built model in place,
    :meth:`before_step` is told each training step's index (counted over the whole run), and the
    dicts of :meth:`epoch_fields` and :meth:`record_fields` are merged into each epoch's entry and
    into the record."""

    def attach(self, model: nn.Module) -> None: ...

    def before_step(self, step: int) -> None: ...

    def epoch_fields(self) -> dict[str, Any]: ...

    def record_fields(self) -> dict[str, Any]: ...


class _NoProgress:
    def run_started(self, label: str, epochs: int) -> None:
        pass

    def epoch_done(self) -> None:
        pass

    def run_finished(self, cached: bool) -> None:
        pass


def _param_table(model: nn.Module) -> list[tuple[str, nn.Parameter, str, str | None]]:
    """Every parameter as ``(name, param, kind, conv layer name if it is that layer's direction
    parameter)``; kind is ``conv``, ``last`` or ``other`` (see :func:`weight_decay_of`)."""
    conv_names = {}
    direction = {}
    for layer, conv in conv_layers(model):
        for pname, p in conv.named_parameters():
            conv_names[id(p)] = layer
        direction[id(direction_param(conv))] = layer
    table = []
    for name, p in model.named_parameters():
        if id(p) in conv_names:
            kind = "conv"
        elif is_last_layer_param(name):
            kind = "last"
        else:
            kind = "other"
        table.append((name, p, kind, direction.get(id(p))))
    return table


def _reference_targets(reference: dict[str, Any], epoch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The WD run's per-channel norms at the end of ``epoch``, per conv layer."""
    entry = reference["epochs"][epoch]
    return {
        name: torch.tensor(layer["channel_norms"], dtype=torch.float64, device=device)
        for name, layer in entry["layers"].items()
    }


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model in eval mode."""
    model.eval()
    loss = 0.0
    correct = 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def train_run(
    run_config: dict[str, Any],
    data: Dataset,
    reference: dict[str, Any] | None = None,
    progress: Progress | None = None,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """Train one run and return its record. ``reference`` is the ``wd_on`` record of the same
    seed and protocol, needed by the regimes that follow its norms; ``probe`` changes the model
    and adds to the record (see :class:`Probe`). The layers' compiled kernels are waited for
    (never replaced by ``analytic`` while they compile), so a run gives the same numbers in a
    fresh process as in a warm one."""
    with compile_mode("wait"):
        return _train_run(run_config, data, reference, progress, probe)


def _train_run(
    run_config: dict[str, Any],
    data: Dataset,
    reference: dict[str, Any] | None,
    progress: Progress | None,
    probe: Probe | None,
) -> dict[str, Any]:
    progress = progress or _NoProgress()
    regime: Regime = REGIMES[run_config["regime"]]
    if regime.needs_reference and (reference is None or len(reference["epochs"]) < run_config["epochs"]):
        raise ValueError(f"{regime.name} needs a complete {REFERENCE_REGIME} record of the same seed")
    device = torch.device(run_config["device"])
    epochs, lr, mu, wd, gamma = (run_config[k] for k in ("epochs", "lr", "momentum", "wd", "gamma"))
    protocol = run_config["protocol"]
    seed = run_config["seed"]

    augment = parse_augment(run_config.get("augment"))
    torch.manual_seed(seed)
    model = build_model(run_config["model"], regime.norm, regime.p, augment.output_shape(data.input_shape),
                        data.num_classes, run_config["width"])
    if probe is not None:
        probe.attach(model)
    model.to(device).train()
    net = wrap_for_ranks(model)  # the model itself in one process (torchrun: docs/distributed.md)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = augment.test_view(data.x_test, data.background).to(device), data.y_test.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
    params = _param_table(model)
    decay = {name: weight_decay_of(kind, regime, protocol, wd) for name, _, kind, _ in params}
    buffers = {name: torch.zeros_like(p) for name, p, _, _ in params}
    n = len(y_train)
    batch = min(run_config["batch_size"], n)
    recorder = Recorder(model, every=math.ceil(epochs * (n // batch) / STEP_POINTS))

    record: dict[str, Any] = {
        "regime": regime.name,
        "seed": seed,
        "protocol": protocol,
        "status": "ok",
        "reason": None,
        "config": run_config,
        "config_hash": config_hash(run_config),
        "diverged": False,
        "epochs": [],
    }
    progress.run_started(f"{regime.name} seed {seed} ({protocol})", epochs)
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        lr_e = lr_at(epoch, epochs, lr, gamma)
        conv_lr = lr if regime.norm_schedule else lr_e
        targets: dict[str, torch.Tensor] = {}
        if regime.correction is not None or regime.norm_schedule:
            targets = _reference_targets(reference, epoch, device)  # type: ignore[arg-type]
            if regime.norm_schedule:
                factor = norm_schedule_factor(epoch, epochs, gamma)
                targets = {k: v * factor for k, v in targets.items()}
        order = torch.randperm(n, generator=shuffle).to(device)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, n - batch + 1, batch):  # drop the last incomplete batch
            idx = order[i : i + batch]
            if probe is not None:
                probe.before_step(step)
            step += 1
            out = net(augment.train_batch(x_train[idx], augment_gen, data.background))
            loss = F.cross_entropy(out, y_train[idx])
            if not torch.isfinite(loss):
                record["diverged"] = True
                record["reason"] = f"loss became {float(loss.detach())} in epoch {epoch}"
                break
            for _, p, _, _ in params:
                p.grad = None
            loss.backward()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y_train[idx]).sum())
            seen += len(idx)
            before = recorder.snapshot()
            with torch.no_grad():
                for name, p, kind, layer in params:
                    d = p.grad if decay[name] == 0 else p.grad + decay[name] * p
                    step_lr = conv_lr if kind == "conv" else lr_e
                    corrected = regime.correction is not None and layer is not None
                    if corrected:  # ||w_c||^2 / ||w_WD,c[e]||^2 at the current weights
                        scale = channel_norms(p).square() / targets[layer].square()
                        scale = scale.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
                        if regime.correction == "gradient":
                            d = d * scale
                    buf = buffers[name].mul_(mu).add_(d)
                    if corrected and regime.correction == "step":
                        p.sub_(step_lr * scale * buf)
                    else:
                        p.sub_(step_lr * buf)
                if regime.norm_schedule:
                    for name, p, kind, layer in params:
                        if layer is not None:
                            ratio = targets[layer] / channel_norms(p)
                            p.mul_(ratio.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))
            recorder.after_step(before, conv_lr)
        if record["diverged"]:
            break
        multipliers = None
        if regime.correction is not None:
            multipliers = {
                layer: channel_norms(p).square() / targets[layer].square()
                for _, p, _, layer in params
                if layer is not None
            }
        test_loss, test_acc = evaluate(model, x_test, y_test)
        record["epochs"].append(
            {
                "epoch": epoch,
                "lr": lr_e,
                "conv_lr": conv_lr,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "layers": recorder.epoch_layers(conv_lr, multipliers),
                **(probe.epoch_fields() if probe is not None else {}),
            }
        )
        progress.epoch_done()
    record["train_seconds"] = time.perf_counter() - start
    record["steps"] = recorder.step_series()
    last = record["epochs"][-1] if record["epochs"] else {}
    record["final"] = {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    if probe is not None:
        record.update(probe.record_fields())
    return record


def cache_read(cache_dir: Path | None, key: str) -> dict[str, Any] | None:
    """The cached record of run ``key`` (a :func:`config_hash`), or None (no cache, no entry, or
    a damaged one)."""
    if cache_dir is None:
        return None
    path = cache_dir / f"{key}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged entry is trained again


def cache_write(cache_dir: Path | None, key: str, record: dict[str, Any]) -> None:
    """Store ``record`` as run ``key`` (atomically: a crash leaves the old entry or none)."""
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{key}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, cache_dir / f"{key}.json")


def _skipped(run_config: dict[str, Any], reason: str) -> dict[str, Any]:
    """The record of a run that could not be trained (shown, never silently dropped)."""
    return {
        "regime": run_config["regime"],
        "seed": run_config["seed"],
        "protocol": run_config["protocol"],
        "status": "skipped",
        "reason": reason,
        "config": run_config,
        "config_hash": config_hash(run_config),
        "diverged": False,
        "epochs": [],
        "final": {k: None for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
        "cached": False,
    }


def run(
    config: ExperimentConfig,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    retrain: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or read from the cache) every run of the grid; returns their records in grid order
    (protocol, seed, regime), each with ``cached``: whether it was read from the cache rather than
    trained by this call. ``retrain`` ignores the cache (and refreshes it). ``on_record(record)``
    is called as each record is ready, so callers can stream them to a results file."""
    config.validate()
    progress = progress or _NoProgress()
    cache = Path(cache_dir) if cache_dir is not None else None
    data = load_dataset(config.dataset, config.data_dir, config.train_size, config.label_noise, config.data_seed)
    trained: dict[str, dict[str, Any]] = {}  # this call's records by hash
    fresh: set[str] = set()  # the hashes this call trained (the rest came from the cache)

    def get(regime: str, seed: int, protocol: str, reference: dict[str, Any] | None) -> dict[str, Any]:
        rc = config.run_config(regime, seed, protocol)
        key = config_hash(rc)
        if key in trained:
            record = trained[key]
            cached = key not in fresh
        else:
            record = None if retrain else distributed.from_main(cache_read, cache, key)
            cached = record is not None
            if record is None:
                record = train_run(rc, data, reference, progress)
                cache_write(cache, key, record)
                fresh.add(key)
            else:
                progress.run_started(f"{regime} seed {seed} ({protocol})", config.epochs)
            trained[key] = record
            progress.run_finished(cached)
        # runs that train identically share a record; each copy carries the names it was asked for
        out = dict(record, regime=regime, protocol=protocol, config=rc, cached=cached)
        return out

    records = []
    for protocol in config.protocols:
        regimes = regimes_for(config, protocol)
        for seed in config.seeds:
            reference = None
            if any(REGIMES[r].needs_reference for r in regimes):
                reference = get(REFERENCE_REGIME, seed, protocol, None)
            for regime in regimes:
                if REGIMES[regime].needs_reference and reference is not None and reference["diverged"]:
                    record = _skipped(config.run_config(regime, seed, protocol),
                                      f"the {REFERENCE_REGIME} run of seed {seed} diverged: no norms to follow")
                else:
                    record = get(regime, seed, protocol, reference)
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def regimes_for(config: ExperimentConfig, protocol: str) -> list[str]:
    """The regimes run under ``protocol``: all of them under the first protocol; under the others
    only the WD regimes, since the normalization and Lp comparisons decay every parameter and so
    train the same under both protocols."""
    if protocol == config.protocols[0]:
        return list(config.regimes)
    return [r for r in config.regimes if r in WD_REGIMES]


def count_runs(config: ExperimentConfig) -> int:
    """How many distinct trainings the grid needs (for an overall progress bar)."""
    config.validate()
    keys = set()
    for protocol in config.protocols:
        for seed in config.seeds:
            regimes = regimes_for(config, protocol)
            if any(REGIMES[r].needs_reference for r in regimes):
                regimes.append(REFERENCE_REGIME)
            for regime in regimes:
                keys.add(config_hash(config.run_config(regime, seed, protocol)))
    return len(keys)


def with_overrides(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """A copy of ``config`` with the non-None ``changes`` applied."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
