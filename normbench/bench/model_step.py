"""``profile --model``: the whole model's training step (forward and backward of the capture's
loss, in the model's own dtype and the input's memory format) timed as it is and after
:func:`normbench.nn.convert` to each requested dispersion, in the same rounds (so that a busy
machine slows every variant alike), with the ratio to the original.

Records (``kind: "model_step"``), beside the layer cells of the same results file:
``model`` (the --model spec), ``norm`` (``original``, or the dispersion converted to: ``l1``,
``linf``, ``top10``, ``l2``), ``impl`` (``model``), ``pass`` (``fwd+bwd``), ``mode`` (``train``),
``layer_impl`` (the converted layers' implementation: ``auto`` unless --impl names eager,
analytic or fused), ``dtype``, ``shape`` (the input's), ``memory_format``, ``device``, ``converted_layers``,
``time_median_s``, ``time_iqr_s``, ``times_s``, ``repeats``, ``first_call_s``,
``speedup_vs_original`` (original median / this median) and ``status`` / ``reason``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from normbench.axes import NormSpec, dtype_name, format_shape
from normbench.bench.timing import CallFailed, TimingSpec, measure_interleaved

KIND = "model_step"


def step_norms(norms: Sequence[NormSpec]) -> list[NormSpec]:
    """The batch-norm dispersions a model is converted to (convert replaces batch-norms only)."""
    return list(dict.fromkeys(n for n in norms if n.family == "batchnorm"))


def convert_impl(impls: Sequence[str] | None) -> str:
    """The implementation the converted layers use: the first of ``impls`` (profile's --impl)
    that :func:`normbench.nn.convert` takes (eager, analytic, fused), else ``auto``."""
    from normbench.nn.functional import IMPLS

    return next((i for i in impls or () if i in IMPLS), "auto")


def _convertible(model: nn.Module) -> int:
    from normbench.nn.convert import is_convertible

    return len({id(m) for m in model.modules() if is_convertible(m)})


def _step(model: nn.Module, inputs: Any, seed: int) -> Callable[[], object]:
    from normbench.models.capture import call_model, training_loss

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> object:
        for p in params:
            p.grad = None
        loss, _ = training_loss(call_model(model, inputs), seed)
        loss.backward()
        return loss

    return step


def _input_facts(inputs: Any) -> tuple[str, str]:
    from normbench.models.capture import memory_format_of

    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values() if isinstance(inputs, dict)
                                                                      else inputs))
    return format_shape(first.shape), memory_format_of(first)


def model_step_records(
    model: nn.Module,
    inputs: Any,
    model_spec: str,
    norms: Sequence[NormSpec],
    device: str,
    timing: TimingSpec,
    timer: Any,
    impl: str = "auto",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time the training step of ``model`` and of a converted copy per batch-norm dispersion of
    ``norms`` (``impl``: the converted layers' implementation), all in the same rounds; one
    record each, the original first."""
    from normbench.nn import convert

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shape, fmt = _input_facts(inputs)
    base = {"kind": KIND, "model": model_spec, "impl": "model", "layer_impl": impl, "pass": "fwd+bwd", "mode": "train",
            "dtype": dtype_name(dtype), "shape": shape, "memory_format": fmt, "device": device}
    count = _convertible(model)
    variants: list[tuple[dict[str, Any], nn.Module | None]] = [
        ({**base, "norm": "original", "converted_layers": 0}, model)]
    for norm in step_norms(norms):
        rec = {**base, "norm": norm.name, "p": norm.p if norm.p != float("inf") else "inf", "k": norm.k,
               "converted_layers": count}
        if count == 0:
            variants.append(({**rec, "status": "skipped", "reason": "the model has no torch or normbench batch-norm "
                              "for normbench.nn.convert to replace"}, None))
            continue
        try:
            converted = convert(copy.deepcopy(model), p=norm.p, k=norm.k, impl=impl)
        except ValueError as exc:
            variants.append(({**rec, "status": "skipped", "reason": str(exc)}, None))
            continue
        variants.append((rec, converted))
    recs = [rec for rec, _ in variants]
    mods = [m for _, m in variants]
    for i, m in enumerate(mods):
        if m is None:
            continue
        m.train()
        try:  # a trial step: a variant that cannot train is an error of its own, the others are timed
            _step(m, inputs, seed)()
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            recs[i], mods[i] = _failed(recs[i], exc), None
    todo = [i for i, m in enumerate(mods) if m is not None]
    measured = {}
    while todo and todo[0] == 0:  # the original model is every ratio's reference
        try:
            measured = dict(zip(todo, measure_interleaved([_step(mods[i], inputs, seed) for i in todo], timing, timer)))
            break
        except CallFailed as exc:  # a step failed in a later call: record it, time the others again
            i = todo.pop(exc.index)
            recs[i] = _failed(recs[i], exc.error)
    for i in todo:
        if i not in measured:
            recs[i] = {**recs[i], "status": "error", "reason": "not timed: the original model's step failed"}
    original = measured.get(0)
    for i, m in measured.items():
        recs[i] = {**recs[i], "status": "ok", "reason": None, "time_median_s": m.median, "time_iqr_s": m.iqr,
                   "times_s": list(m.times), "repeats": m.repeats, "first_call_s": m.first_call_s,
                   "speedup_vs_original": original.median / m.median if original and m.median > 0 else None}
    return recs


def _failed(rec: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    text = str(exc).splitlines()
    return {**rec, "status": "error", "reason": f"{type(exc).__name__}: {text[0] if text else ''}"}


def step_verdicts(records: Sequence[dict[str, Any]], device: str | None = None) -> list[str]:
    """One sentence per converted variant: "converting builtin:resnet to l1 batch-norm makes a
    training step 1.12x faster on this device (cpu)"."""
    lines = []
    for r in records:
        if r.get("kind") != KIND or r.get("norm") == "original" or r.get("status") != "ok":
            continue
        ratio = r.get("speedup_vs_original")
        if ratio is None:
            continue
        how = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        lines.append(f"converting {r['model']} to {r['norm']} batch-norm ({r['converted_layers']} layers) makes a "
                     f"training step {how} on this device ({r.get('device', device)})")
    return lines
