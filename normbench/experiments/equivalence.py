"""The whole equivalence experiment as the ``plot equivalence`` command runs it: train what the
cache lacks, write ``equivalence.json`` (schema ``normbench.equivalence/1``) and
``scale_invariance.json``, draw the figures, and compute the summary and verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from normbench.experiments.checks import check_passes, scale_invariance_check
from normbench.experiments.data import load_dataset
from normbench.experiments.regimes import ALL_REGIMES
from normbench.experiments.runner import ExperimentConfig, Progress, run
from normbench.experiments.summary import METRICS, equilibrium_summary, regime_table, verdict
from normbench.results import ResultsWriter, environment, schema_name

SCHEMA = schema_name("equivalence")
CHECK_SCHEMA = schema_name("scale_invariance")
# The metric the verdict leads with (the others are reported too): the default task was chosen for it
# (docs/equivalence.md).
PRIMARY_METRIC = "test_loss"


# The default task: digits translated by up to 2 pixels on a 12x12 canvas, plus noise, chosen by
# benchmarks/equivalence_search.py (docs/equivalence.md): the WD run's conv weights then turn at the
# equilibrium through most of the first lr phase, and WD off departs from WD on in test loss.
DEFAULT_AUGMENT = "shift=2,noise=0.3"
DEFAULT_WD = 1e-2


def default_config() -> ExperimentConfig:
    """The default experiment (docs/equivalence.md explains the choice)."""
    return ExperimentConfig(
        regimes=list(ALL_REGIMES),
        seeds=[0, 1, 2],
        protocols=["isolated", "paper"],
        dataset="digits",
        model="small",
        epochs=30,
        batch_size=32,
        lr=0.1,
        momentum=0.9,
        wd=DEFAULT_WD,
        augment=DEFAULT_AUGMENT,
    )


def quick_config() -> ExperimentConfig:
    """A reduced default that runs in seconds (tests and CI): fewer images, epochs and channels."""
    cfg = default_config()
    cfg.seeds = [0, 1]
    cfg.protocols = ["isolated"]
    cfg.epochs = 4
    cfg.train_size = 400
    cfg.width = 8
    return cfg


@dataclass
class Outcome:
    """What one ``plot equivalence`` produced."""

    records: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    check_passed: bool
    figures: list[Path]
    results_path: Path
    table: list[dict[str, Any]]
    verdicts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    trained: int = 0  # distinct runs trained by this call (the others came from the cache)
    equilibrium: list[dict[str, Any]] = field(default_factory=list)  # per protocol, see equilibrium_summary


def run_equivalence(
    config: ExperimentConfig,
    output_dir: str | Path = "normbench-out",
    formats: Sequence[str] = ("png",),
    progress: Progress | None = None,
    retrain: bool = False,
    argv: Sequence[str] | None = None,
) -> Outcome:
    """Run (or reuse) every run of ``config``, write the results files and draw the figures."""
    from normbench.plots.equivalence import FORMATS, draw_all

    for fmt in formats:
        if fmt not in FORMATS:
            from normbench.errors import UserError

            raise UserError(f"unknown figure format {fmt!r}: use {', '.join(FORMATS)}")
    config.validate()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(config.device, argv)
    writer = ResultsWriter(out / "equivalence.json", SCHEMA, env, key_fields=("protocol", "regime", "seed"))
    records = run(config, cache_dir=out / "cache" / "equivalence", progress=progress, retrain=retrain, on_record=writer.write)

    data = load_dataset(config.dataset, config.data_dir, config.train_size, config.label_noise, config.data_seed)
    checks = scale_invariance_check(data, config.model, config.width)
    check_writer = ResultsWriter(out / "scale_invariance.json", CHECK_SCHEMA, env, key_fields=("layer", "alpha"))
    for c in checks:
        check_writer.write({**c, "status": "ok", "reason": None})

    verdicts = {m: verdict(records, m) for m in METRICS}
    figures = draw_all(records, checks, out, formats, verdicts[PRIMARY_METRIC])
    return Outcome(
        records=records,
        checks=checks,
        check_passed=check_passes(checks),
        figures=figures,
        results_path=writer.path,
        table=regime_table(records),
        verdicts=verdicts,
        trained=len({r["config_hash"] for r in records if not r["cached"] and r["status"] == "ok"}),
        equilibrium=equilibrium_summary(records),
    )
