"""The half-precision experiment (``plot halfprec``): train the equivalence experiments' network with
every batch-norm computed in low precision, swept over the scale of the activations entering it.

In exact arithmetic batch-norm ignores that scale; in fp16 an L2 batch-norm squares deviations and
overflows once they reach 256, while L1 and L-inf take no squares. So each run multiplies the input
of every batch-norm by a fixed ``scale`` (:class:`~normbench.experiments.lowp.LowPrecisionBatchNorm2d`)
and trains with the rest of the network in fp32, per norm, dtype and compute model (``native``: every
operation of the layer rounded and reduced in the dtype, in the chosen reduction order;
``framework``: low-precision storage, fp32 statistics; ``fp32``: the reference), on the same seeds.
Runs use the equivalence experiments' data, model, training loop (:func:`~normbench.experiments.runner.train_run`,
WD on) and run cache; the natural case rides along: WD off at scale 1, where the weights' norms,
and so the pre-normalization scale, grow on their own.

Each run becomes a ``normbench.halfprec/1`` record (docs/halfprec.md); :func:`summary_table` and
:func:`verdicts` turn them into a table and a verdict per dtype and reduction order.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from normbench import distributed
from normbench.axes import NormSpec, norm_label, parse_norm
from normbench.errors import UserError
from normbench.experiments.data import Dataset, load_dataset
from normbench.experiments.lowp import COMPUTES, DTYPES, LowpSpec, Monitor, attach
from normbench.experiments.models import build_model
from normbench.experiments.runner import (
    ExperimentConfig,
    Progress,
    cache_read,
    cache_write,
    config_hash,
    train_run,
    with_overrides,
)
from normbench.numerics.emulator import REDUCTIONS
from normbench.numerics.formats import FORMATS

CODE_VERSION = 1  # bump when a change to the low-precision layer changes the numbers
KEY_FIELDS = ("regime", "norm", "dtype", "compute", "reduction", "storage", "scale", "seed")
STORAGES = ("fp32", "fp16", "bf16")
PROTOCOL = "isolated"  # one protocol: only WD on (and WD off for the natural case) are trained


def training_default() -> ExperimentConfig:
    """The training settings the half-precision runs share (the equivalence experiments' network
    and data; fewer epochs, since an emulated layer costs about 50x an fp32 one)."""
    return ExperimentConfig(regimes=["wd_on"], seeds=[0, 1, 2], protocols=[PROTOCOL], dataset="digits",
                            model="small", epochs=10, batch_size=32, lr=0.1, momentum=0.9, wd=2e-3)


@dataclass
class HalfprecConfig:
    """The grid (norms x dtypes x computes x reductions x scales x seeds) and the shared training."""

    norms: list[str] = field(default_factory=lambda: ["l2", "l1", "linf"])
    dtypes: list[str] = field(default_factory=lambda: ["fp16"])
    computes: list[str] = field(default_factory=lambda: list(COMPUTES))
    reductions: list[str] = field(default_factory=lambda: ["pairwise", "sum"])
    scales: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 1e4])
    storage: str = "fp32"
    natural: bool = True
    training: ExperimentConfig = field(default_factory=training_default)

    @property
    def seeds(self) -> list[int]:
        return self.training.seeds

    def norm_specs(self) -> list[NormSpec]:
        specs = [parse_norm(n) for n in self.norms]
        for s in specs:
            if s.family != "batchnorm":
                raise UserError(f"plot halfprec trains batch-norms: {s.name} is a {s.family}")
        return specs

    def validate(self) -> "HalfprecConfig":
        """Check every field; a UserError names the first bad one. Returns self."""
        self.training.validate()
        if not self.norms:
            raise UserError("no norm given")
        self.norm_specs()
        for name, values, allowed in (("dtype", self.dtypes, DTYPES), ("compute", self.computes, COMPUTES),
                                      ("reduction", self.reductions, REDUCTIONS)):
            if not values:
                raise UserError(f"no {name} given")
            for v in values:
                if v not in allowed:
                    raise UserError(f"unknown {name} {v!r}: use one of {', '.join(allowed)}")
        if self.storage not in STORAGES:
            raise UserError(f"unknown storage {self.storage!r}: use one of {', '.join(STORAGES)}")
        if not self.scales:
            raise UserError("no scale given")
        for s in self.scales:
            if not (math.isfinite(s) and s > 0):
                raise UserError(f"a scale must be a finite number > 0, got {s:g}")
        return self

    def check_fits(self, data: Dataset) -> None:
        """A UserError when a top-k norm's k is larger than the smallest batch-norm channel of the
        model on this data."""
        smallest = smallest_channel(self.training, data)
        for s in self.norm_specs():
            if s.k is not None and s.k > smallest:
                raise UserError(f"{s.name}: k={s.k} is larger than the smallest batch-norm channel of this "
                                f"model and batch ({smallest} values)")


def smallest_channel(training: ExperimentConfig, data: Dataset) -> int:
    """The fewest values any batch-norm channel of the model reduces over at this batch size."""
    model = build_model(training.model, "bn", 2.0, data.input_shape, data.num_classes, training.width).eval()
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].numel() // args[0].shape[1]))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    batch = min(training.batch_size, len(data.y_train))
    with torch.no_grad():
        model(torch.zeros(batch, *data.input_shape))
    for h in hooks:
        h.remove()
    return min(sizes)


@dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    regime: str
    norm: NormSpec
    compute: str
    dtype: str
    reduction: str | None
    storage: str
    scale: float
    seed: int

    def lowp(self) -> LowpSpec:
        return LowpSpec(self.norm.p, self.norm.k, self.compute, self.dtype, self.reduction, self.scale)

    def fields(self) -> dict[str, Any]:
        """The record's key fields."""
        return {"regime": self.regime, "norm": self.norm.name, "k": self.norm.k, "dtype": self.dtype,
                "compute": self.compute, "compute_dtype": self.lowp().compute_dtype, "reduction": self.reduction,
                "storage": self.storage, "scale": self.scale, "seed": self.seed}

    def label(self) -> str:
        where = self.compute if self.compute == "fp32" else f"{self.compute} {self.dtype}"
        order = f" {self.reduction}" if self.reduction else ""
        return f"{self.norm.name} x{self.scale:g} {where}{order} seed {self.seed}" + (
            f" ({self.regime})" if self.regime != "wd_on" else "")


def grid(config: HalfprecConfig) -> list[Run]:
    """Every run of ``config``, in the order they are trained: per seed, norm and scale the fp32
    reference, then framework and native per dtype (native per reduction order); then the natural
    case (WD off, scale 1). fp32 runs have dtype ``fp32`` and no reduction; framework runs no
    reduction; ``storage`` applies to the low-precision runs."""
    out: list[Run] = []

    def cells(regime: str, norm: NormSpec, scale: float, seed: int, computes: Sequence[str]) -> Iterator[Run]:
        if "fp32" in computes:
            yield Run(regime, norm, "fp32", "fp32", None, "fp32", scale, seed)
        for dtype in config.dtypes:
            if "framework" in computes:
                yield Run(regime, norm, "framework", dtype, None, config.storage, scale, seed)
            if "native" in computes:
                for reduction in config.reductions:
                    yield Run(regime, norm, "native", dtype, reduction, config.storage, scale, seed)

    for seed in config.seeds:
        for norm in config.norm_specs():
            for scale in config.scales:
                out.extend(cells("wd_on", norm, scale, seed, config.computes))
    if config.natural:
        natural = [c for c in config.computes if c != "framework"]
        for seed in config.seeds:
            for norm in config.norm_specs():
                out.extend(cells("wd_off", norm, 1.0, seed, natural))
    return out


class _Probe:
    """Puts the low-precision layers into a freshly built network and reports what they saw
    (:class:`~normbench.experiments.runner.Probe`)."""

    def __init__(self, spec: LowpSpec, storage: str) -> None:
        self.spec, self.storage, self.monitor = spec, storage, Monitor()

    def attach(self, model: torch.nn.Module) -> None:
        attach(model, self.spec, self.monitor, self.storage)

    def before_step(self, step: int) -> None:
        self.monitor.step = step

    def epoch_fields(self) -> dict[str, Any]:
        return self.monitor.epoch_fields()

    def record_fields(self) -> dict[str, Any]:
        return {"first_nonfinite": self.monitor.first_nonfinite}


def run_config(config: HalfprecConfig, run: Run) -> dict[str, Any]:
    """The JSON configuration of one run (what its cache key covers)."""
    rc = config.training.run_config(run.regime, run.seed, PROTOCOL)
    fields = run.fields()
    rc["spec"] = dict(rc["spec"], p="inf" if math.isinf(run.norm.p) else run.norm.p)
    rc["halfprec"] = {**{k: fields[k] for k in ("norm", "k", "dtype", "compute", "compute_dtype", "reduction",
                                                 "storage", "scale")},
                      "code_version": CODE_VERSION}
    return rc


def _record(run: Run, trained: dict[str, Any], rc: dict[str, Any], cached: bool) -> dict[str, Any]:
    final = trained.get("final") or {}
    diverged = bool(trained.get("diverged"))
    return {
        **run.fields(),
        "status": trained.get("status", "ok"),
        "reason": trained.get("reason"),
        "config": rc,
        "config_hash": trained.get("config_hash"),
        "epochs": [{k: e.get(k) for k in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "norm_layers", "layers")}
                   for e in trained.get("epochs", [])],
        "diverged": diverged,
        "first_nonfinite": trained.get("first_nonfinite"),
        "final": {k: None if diverged else final.get(k) for k in ("test_acc", "train_loss", "test_loss", "train_acc")},
        "train_seconds": trained.get("train_seconds"),
        "cached": cached,
    }


@functools.lru_cache(maxsize=None)
def _skip_reason(compute_dtype: str, device: str) -> str | None:
    """Why runs computing in ``compute_dtype`` cannot train on ``device`` (torch lacks that
    arithmetic there), or None."""
    try:
        torch.zeros(2, dtype=FORMATS[compute_dtype].dtype, device=device) + 1
    except (RuntimeError, TypeError) as exc:
        return f"{compute_dtype} arithmetic is not supported on {device}: {exc}"
    return None


def load_data(config: HalfprecConfig) -> Dataset:
    """The training data of ``config`` (loaded once per process)."""
    t = config.training
    return _dataset(t.dataset, t.data_dir, t.train_size, t.label_noise, t.data_seed)


def _train(job: tuple[dict[str, Any], Run, str | None], progress: Progress | None = None) -> dict[str, Any]:
    """Train one cell and cache it (what a worker process runs; also the one-process path)."""
    rc, cell, cache = job
    data = _dataset(rc["dataset"], rc["data_dir"], rc["train_size"], rc["label_noise"], rc["data_seed"])
    trained = train_run(rc, data, None, progress, _Probe(cell.lowp(), cell.storage))
    cache_write(Path(cache) if cache else None, config_hash(rc), trained)
    return trained


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str | None, train_size: int | None, label_noise: float, data_seed: int) -> Dataset:
    return load_dataset(name, data_dir, train_size, label_noise, data_seed)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_each(todo: list[tuple[dict[str, Any], Run, str | None]], jobs: int,
                progress: Progress | None) -> Iterator[dict[str, Any]]:
    """The trained record of each job of ``todo``, in order: in this process, or with ``jobs`` > 1
    in that many worker processes, each with this process's torch thread count, so a run's
    numbers do not depend on which process trains it."""
    if jobs <= 1 or len(todo) <= 1:
        yield from (_train(job, progress) for job in todo)
        return
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(todo)), _init_worker, (torch.get_num_threads(),))
    try:
        yield from pool.imap(_train, todo)
    finally:
        pool.terminate()


def _train_on_ranks(todo: list[tuple[dict[str, Any], Run, str | None]], jobs: int,
                    progress: Progress | None) -> list[dict[str, Any]] | None:
    """Under torchrun: the runs of ``todo`` spread over the ranks (rank r trains runs r, r + W,
    ...; each whole, alone, exactly as one process would), their records gathered in ``todo``
    order on rank 0, which caches those the other ranks trained; None on the other ranks."""
    ranks, me = distributed.world(), distributed.rank()
    mine = todo[me::ranks]
    with distributed.alone():
        trained = list(_train_each(mine, jobs, progress if me == 0 else None))
    every = distributed.gather_to_main(trained)
    if every is None:
        return None
    ordered = [every[i % ranks][i // ranks] for i in range(len(todo))]
    for i, (rc, _, cache) in enumerate(todo):
        if i % ranks:
            cache_write(Path(cache) if cache else None, config_hash(rc), ordered[i])
    return ordered


def run(
    config: HalfprecConfig,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    retrain: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Train (or read from the cache) every run of the grid; returns their records in
    :func:`grid` order, each with ``cached``. ``on_record(record)`` is called as each is ready, in
    that order. ``jobs`` > 1 trains that many runs at a time in worker processes, each with this
    process's torch thread count, so a run's numbers do not depend on which process trains it.

    Under torchrun the runs are spread over the ranks, each trained whole by one rank (a grid of
    small runs gains nothing from splitting one run's batch, and sharding would change the sums
    in low precision that the experiment measures): rank 0 reads and writes the cache and returns
    every record; the other ranks return an empty list."""
    t = config.training
    config.check_fits(load_data(config.validate()))
    main = distributed.is_main()
    cache = str(cache_dir) if cache_dir is not None and main else None
    cells = []
    with distributed.alone():  # a run's configuration and cache key are one process's
        for cell in grid(config):
            rc = run_config(config, cell)
            key = config_hash(rc)
            reason = _skip_reason(cell.lowp().compute_dtype, rc["device"])
            found = None if retrain or reason or not main else cache_read(Path(cache) if cache else None, key)
            cells.append((cell, rc, key, reason, found))
    todo = [(rc, cell, cache) for cell, rc, key, reason, found in cells if reason is None and found is None]
    ranks = distributed.world()
    if ranks > 1:
        wanted = set(distributed.from_main(lambda: [config_hash(rc) for rc, _, _ in todo]))
        todo = [job for job in todo if config_hash(job[0]) in wanted]
        ordered = _train_on_ranks(todo, jobs, progress)
        if ordered is None:
            return []
        trained_runs: Iterator[dict[str, Any]] = iter(ordered)
        shown = {config_hash(rc) for rc, _, _ in todo[::ranks]}  # rank 0's own: train_run showed them
    else:
        trained_runs = _train_each(todo, jobs, progress)
        shown = set() if jobs > 1 and len(todo) > 1 else {config_hash(rc) for rc, _, _ in todo}
    records = []
    try:
        for cell, rc, key, reason, found in cells:
            if reason is not None:
                record = _record(cell, {"status": "skipped", "reason": reason, "config_hash": key}, rc, False)
            else:
                if progress is not None and key not in shown:  # else train_run says it
                    progress.run_started(cell.label(), t.epochs if found is not None else 0)
                trained = found if found is not None else next(trained_runs)
                if progress is not None:
                    progress.run_finished(found is not None)
                record = _record(cell, trained, rc, found is not None)
            records.append(record)
            if on_record is not None:
                on_record(record)
    finally:
        close = getattr(trained_runs, "close", None)
        if close is not None:
            close()  # stops the worker pool of _train_each
    return records


def count_runs(config: HalfprecConfig) -> int:
    return len(grid(config))


def with_training(config: HalfprecConfig, **changes: Any) -> HalfprecConfig:
    """A copy of ``config`` whose training settings have the non-None ``changes`` applied."""
    return replace(config, training=with_overrides(config.training, **changes))


# ---- summary and verdict ----------------------------------------------------------------------

def _acc(record: dict[str, Any]) -> float | None:
    """Final test accuracy, None for a diverged or skipped run."""
    if record.get("status") != "ok" or record.get("diverged"):
        return None
    return record["final"].get("test_acc")


@dataclass
class Cell:
    """The runs of one (regime, norm, compute, dtype, reduction, scale) over seeds."""

    regime: str
    norm: str
    compute: str
    dtype: str
    reduction: str | None
    scale: float
    runs: list[dict[str, Any]]

    @property
    def trained(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("status") == "ok"]

    @property
    def diverged(self) -> int:
        return sum(bool(r.get("diverged")) for r in self.trained)

    @property
    def accuracies(self) -> list[float]:
        return [a for a in (_acc(r) for r in self.trained) if a is not None]

    @property
    def mean_acc(self) -> float | None:
        acc = self.accuracies
        return statistics.fmean(acc) if acc else None

    def first_nonfinite(self) -> dict[str, Any] | None:
        """The earliest first non-finite value over the seeds."""
        events = [r["first_nonfinite"] for r in self.trained if r.get("first_nonfinite")]
        return min(events, key=lambda e: e["step"]) if events else None


def cells(records: Sequence[dict[str, Any]]) -> dict[tuple, Cell]:
    """Records grouped over seeds, keyed ``(regime, norm, compute, dtype, reduction, scale)``."""
    out: dict[tuple, Cell] = {}
    for r in records:
        key = (r["regime"], r["norm"], r["compute"], r["dtype"], r["reduction"], r["scale"])
        out.setdefault(key, Cell(*key, runs=[])).runs.append(r)
    return out


def _paired_gap(cell: Cell, reference: Cell) -> float | None:
    """Mean over seeds of (this run's final accuracy - the reference's, same seed)."""
    ref = {r["seed"]: _acc(r) for r in reference.trained}
    gaps = [a - ref[r["seed"]] for r in cell.trained if (a := _acc(r)) is not None and ref.get(r["seed"]) is not None]
    return statistics.fmean(gaps) if gaps else None


def seed_noise(records: Sequence[dict[str, Any]], test_size: int | None = None, one_seed: bool = True) -> float | None:
    """The run-to-run noise of final test accuracy, from the fp32 WD-on runs: the pooled standard
    deviation over seeds of each (norm, scale); with a single seed, over the scales of each
    (norm, seed) instead, unless ``one_seed`` is False (the fp32 runs at different scales differ
    only by rounding, which training amplifies like a change of seed). At least one test image's
    worth; None with nothing to pool."""
    fp32 = [c for c in cells(records).values() if c.compute == "fp32" and c.regime == "wd_on"]
    groups = [c.accuracies for c in fp32 if len(c.accuracies) > 1]
    if not groups and one_seed:
        by_seed: dict[tuple[str, int], list[float]] = {}
        for c in fp32:
            for r in c.trained:
                if (a := _acc(r)) is not None:
                    by_seed.setdefault((c.norm, r["seed"]), []).append(a)
        groups = [v for v in by_seed.values() if len(v) > 1]
    if not groups:
        return None
    pooled = math.sqrt(statistics.fmean(statistics.variance(g) for g in groups))
    return max(pooled, 1.0 / test_size) if test_size else pooled


def judge(cell: Cell, reference: Cell | None, noise: float | None) -> str:
    """``fails`` (diverged on a seed, or accuracy below the fp32 run's of the same seeds by more
    than twice the seed noise), ``trains`` (within that) or ``n/a`` (no reference to judge by)."""
    if not cell.trained:
        return "n/a"
    if cell.diverged:
        return "fails"
    if reference is None or not reference.accuracies or noise is None:
        return "n/a"
    gap = _paired_gap(cell, reference)
    if gap is None:
        return "n/a"
    return "fails" if gap < -2 * noise else "trains"


def _reference(table: dict[tuple, Cell], cell: Cell) -> Cell | None:
    return table.get((cell.regime, cell.norm, "fp32", "fp32", None, cell.scale))


def verdicts(records: Sequence[dict[str, Any]], test_size: int | None = None) -> list[dict[str, Any]]:
    """Per dtype and reduction order of the native runs (WD on): the scale where L2 first fails,
    whether L1 and L-inf train there, and where each of those fails in turn; in plain words
    (``text``) and as fields. Honest negatives: L2 never failing, or L1 failing with it, are said."""
    table = cells(records)
    noise = seed_noise(records, test_size)
    out = []
    native = sorted({(c.dtype, c.reduction) for c in table.values() if c.compute == "native" and c.regime == "wd_on"},
                    key=lambda t: (t[0], REDUCTIONS.index(t[1]) if t[1] in REDUCTIONS else 9))
    for dtype, reduction in native:
        by_norm: dict[str, list[Cell]] = {}
        for c in table.values():
            if c.compute == "native" and c.regime == "wd_on" and c.dtype == dtype and c.reduction == reduction:
                by_norm.setdefault(c.norm, []).append(c)
        for cs in by_norm.values():
            cs.sort(key=lambda c: c.scale)
        status = {norm: [(c.scale, judge(c, _reference(table, c), noise), c) for c in cs] for norm, cs in by_norm.items()}
        first_fail = {norm: next((s for s, v, _ in st if v == "fails"), None) for norm, st in status.items()}
        scales = sorted({s for st in status.values() for s, _, _ in st})
        parts = []
        l2 = first_fail.get("l2") if "l2" in status else None
        if "l2" in status:
            if l2 is None:
                parts.append(f"L2 does not fail at any scale tried (up to {max(scales):g})")
            else:
                c = next(c for s, _, c in status["l2"] if s == l2)
                parts.append(f"L2 fails from scale {l2:g} ({_why(c)})")
        for norm in status:
            if norm == "l2":
                continue
            name = norm_label(norm)
            if l2 is not None:
                here = next((v for s, v, _ in status[norm] if s == l2), "n/a")
                cell = next((c for s, _, c in status[norm] if s == l2), None)
                ref = _reference(table, cell) if cell else None
                acc = _pct(cell.mean_acc) if cell else "-"
                ref_acc = _pct(ref.mean_acc) if ref else "-"
                if here == "trains":
                    parts.append(f"at {l2:g} {name} trains within seed noise of fp32 ({acc} vs {ref_acc})")
                elif here == "fails":
                    parts.append(f"at {l2:g} {name} fails too ({_why(cell)})")
                else:
                    parts.append(f"at {l2:g} {name} cannot be judged")
            fail = first_fail[norm]
            if fail is None:
                parts.append(f"{name} does not fail up to {max(scales):g}")
            elif l2 is None or fail != l2:
                c = next(c for s, _, c in status[norm] if s == fail)
                parts.append(f"{name} fails from {fail:g} ({_why(c)})")
        out.append({
            "dtype": dtype, "reduction": reduction, "noise": noise, "first_failing_scale": first_fail,
            "status": {norm: {f"{s:g}": v for s, v, _ in st} for norm, st in status.items()},
            "text": f"native {dtype}, {reduction}: " + "; ".join(parts) + ".",
        })
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _why(cell: Cell) -> str:
    event = cell.first_nonfinite()
    runs = len(cell.trained)
    if cell.diverged:
        text = f"diverged on {cell.diverged} of {runs} seed{'s' if runs != 1 else ''}"
    else:
        text = f"{_pct(cell.mean_acc)} test accuracy"
    if event:
        text += f"; first non-finite: {event['quantity']} of {event['layer']} at step {event['step']}"
    return text


def fp32_control(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The control: the fp32 runs of one norm and seed should not depend on the scale. Returns the
    largest spread (max - min over scales) of final test accuracy, per norm, beside the seed noise."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r["compute"] == "fp32" and r["regime"] == "wd_on" and (a := _acc(r)) is not None:
            by.setdefault((r["norm"], r["seed"]), []).append(a)
    spread: dict[str, float] = {}
    for (norm, _), accs in by.items():
        spread[norm] = max(spread.get(norm, 0.0), max(accs) - min(accs))
    return {"spread": spread, "noise": seed_noise(records, one_seed=False)}


# ---- the whole command ------------------------------------------------------------------------

def default_config() -> HalfprecConfig:
    """The default experiment: 3 seeds, L2 / L1 / L-inf, fp16, pairwise and sum orders, scales
    1 to 1e4, every compute model, and the natural case (about 5 minutes on a 2-core CPU with 2 jobs)."""
    return HalfprecConfig()


def quick_config() -> HalfprecConfig:
    """A reduced default that runs in seconds (tests and CI): one seed, L2 and L1, two scales,
    three epochs on 400 images, a narrow model."""
    training = replace(training_default(), seeds=[0], epochs=3, train_size=400, width=8)
    return HalfprecConfig(norms=["l2", "l1"], scales=[1.0, 1000.0], training=training)


def summary_table(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (regime, compute, dtype, reduction, norm), the scales as columns: per scale the
    mean final test accuracy over the seeds that trained, and how many diverged."""
    rows: dict[tuple, dict[str, Any]] = {}
    for c in cells(records).values():
        key = (c.regime, c.compute, c.dtype, c.reduction, c.norm)
        row = rows.setdefault(key, dict(zip(("regime", "compute", "dtype", "reduction", "norm"), key), scales={}))
        row["scales"][c.scale] = {"test_acc": c.mean_acc, "diverged": c.diverged, "runs": len(c.trained),
                                  "skipped": len(c.runs) - len(c.trained)}
    order = {c: i for i, c in enumerate(("fp32", "framework", "native"))}
    return sorted(rows.values(), key=lambda r: (r["regime"] != "wd_on", order[r["compute"]], r["dtype"],
                                                 r["reduction"] or "", r["norm"]))


@dataclass
class Outcome:
    """What one ``plot halfprec`` produced."""

    records: list[dict[str, Any]]
    figures: list[Path]
    results_path: Path
    table: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]
    control: dict[str, Any]
    trained: int = 0


def run_halfprec(
    config: HalfprecConfig,
    output_dir: str | Path = "normbench-out",
    formats: Sequence[str] = ("png",),
    progress: Progress | None = None,
    retrain: bool = False,
    argv: Sequence[str] | None = None,
    jobs: int = 1,
) -> Outcome:
    """Run (or reuse from ``<output_dir>/cache/halfprec``) every run of ``config``, stream the
    records to ``<output_dir>/halfprec.json`` and draw the figures."""
    from normbench.plots.halfprec import FORMATS, draw_all
    from normbench.results import ResultsWriter, environment, schema_name

    for fmt in formats:
        if fmt not in FORMATS:
            raise UserError(f"unknown figure format {fmt!r}: use {', '.join(FORMATS)}")
    t = config.training
    data = load_data(config.validate())
    config.check_fits(data)  # before anything is written
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ResultsWriter(out / "halfprec.json", schema_name("halfprec"), environment(t.device, argv), KEY_FIELDS)
    records = run(config, cache_dir=out / "cache" / "halfprec", progress=progress, retrain=retrain, on_record=writer.write,
                  jobs=jobs)
    found = verdicts(records, len(data.y_test))
    figures = draw_all(records, out, formats, found)
    return Outcome(records=records, figures=figures, results_path=writer.path, table=summary_table(records),
                   verdicts=found, control=fp32_control(records),
                   trained=sum(1 for r in records if r["status"] == "ok" and not r["cached"]))
