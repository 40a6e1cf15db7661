"""Synthetic results files for the compare tests: records of every kind with known contents,
timing samples from known distributions, written with the real ResultsWriter."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any, Iterable

from normbench.results import ResultsWriter, schema_name

PROFILE_KEY = ("norm", "impl", "dtype", "shape", "pass", "mode", "memory_format", "device")


def times(seed: int, n: int = 30, sigma: float = 0.02, scale: float = 1e-3) -> list[float]:
    """``n`` per-repeat times: log-normal around ``scale`` seconds with relative spread ``sigma``."""
    rng = random.Random(seed)
    return [scale * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def profile_record(norm: str = "l2", impl: str = "eager", samples: list[float] | None = None,
                   dtype: str = "fp32", raw: bool = True, **extra: Any) -> dict[str, Any]:
    """An ``ok`` profile record of one cell; without ``raw`` it has no ``times_s`` (an old file)."""
    samples = samples if samples is not None else times(0)
    record: dict[str, Any] = {
        "norm": norm, "impl": impl, "dtype": dtype, "shape": "8x4x2x2", "group": "custom", "pass": "fwd",
        "mode": "train", "memory_format": "contiguous", "device": "cpu", "status": "ok", "reason": None,
        "time_median_s": statistics.median(samples), "time_iqr_s": 0.0, "repeats": len(samples), "threads": 1,
        "cache": "cold",
    }
    if raw:
        record["times_s"] = list(samples)
    record.update(extra)
    return record


def stability_record(norm: str = "l2", dtype: str = "fp16", scale: float = 1.0, safe: bool = True,
                     overflow: bool = False, err_ulps: float | None = 1.0, grad_err_ulps: float | None = 2.0,
                     **extra: Any) -> dict[str, Any]:
    """An ``ok`` stability record of one Gaussian-sweep cell."""
    record: dict[str, Any] = {
        "norm": norm, "impl": "normbench", "dtype": dtype, "compute": "native", "compute_dtype": dtype,
        "reduction": "pairwise", "eps": 1e-5, "case": {"name": "gauss", "scale": scale, "seed": 0},
        "status": "ok", "reason": None, "safe": safe, "overflow": overflow, "grad_overflow": overflow,
        "nonfinite_fraction": 0.0, "grad_nonfinite_fraction": 0.0, "err_ulps": err_ulps,
        "grad_err_ulps": grad_err_ulps,
    }
    record.update(extra)
    return record


def equivalence_record(regime: str, seed: int, test_acc: float, train_loss: float = 0.1, test_loss: float = 0.3,
                       diverged: bool = False, protocol: str = "isolated") -> dict[str, Any]:
    """A finished equivalence run's record (the fields compare reads)."""
    return {"protocol": protocol, "regime": regime, "seed": seed, "status": "ok", "reason": None,
            "diverged": diverged, "epochs": [],
            "final": {"train_loss": train_loss, "train_acc": None, "test_loss": test_loss, "test_acc": test_acc}}


def halfprec_record(norm: str, seed: int, test_acc: float, train_loss: float = 0.2, diverged: bool = False,
                    scale: float = 1.0) -> dict[str, Any]:
    """A half-precision training run's record (schema normbench.halfprec/1)."""
    return {"regime": "native", "norm": norm, "k": None, "dtype": "fp16", "compute": "native",
            "reduction": "pairwise", "storage": "fp16", "scale": scale, "seed": seed, "status": "ok", "reason": None,
            "diverged": diverged, "final": {"test_acc": test_acc, "train_loss": train_loss}}


KEYS = {
    "profile": PROFILE_KEY,
    "stability": ("norm", "impl", "dtype", "compute", "compute_dtype", "reduction", "eps", "case"),
    "equivalence": ("protocol", "regime", "seed"),
    "halfprec": ("regime", "norm", "k", "dtype", "compute", "reduction", "storage", "scale", "seed"),
}


def write(path: Path, command: str, records: Iterable[dict[str, Any]],
          environment: dict[str, Any] | None = None) -> str:
    """Write ``records`` as a ``command`` results file at ``path`` (format by suffix)."""
    env = {"device": "cpu", "threads": 1, "torch_version": "2.13.0", "normbench_version": "0.1.0",
           "cpu_model": "test cpu", "device_name": "test cpu"} if environment is None else environment
    writer = ResultsWriter(path, schema_name(command), env, KEYS[command])
    for r in records:
        writer.write(r)
    return str(path)
