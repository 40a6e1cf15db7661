"""One forward and one backward pass of a model with hooks on its normalization layers.

For every normalization layer, by qualified name and in the order the forward pass calls them,
:func:`capture` records the input tensor, the gradient arriving at the layer's output, the
layer's kind, eps, affine parameters and reduction axes. Tensors are copied to the CPU as they
arrive. Recognized layers: torch's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` (and every other
``_BatchNorm``, normbench's ``LpBatchNorm*`` and ``SyncLpBatchNorm`` among them), ``LayerNorm``,
``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d`` and normbench's Lp variants of these (their own
``p`` and ``k`` are recorded). A layer the analysis cannot take is listed with the reason
(``skipped``): one the forward pass never called, one no gradient reaches, a non-float input.

The backward pass needs a loss: for a 2-D output (a classifier's logits) the cross-entropy against
labels drawn from a fixed seed, else the mean of the output times a seeded N(0, 1) tensor (a
random linear readout; the first tensor of a tuple, list or dict output). Not the output's mean
square: after a final layer-norm that gradient is parallel to the normalized output, which the
layer's backward projects out, leaving a gradient that is zero up to rounding. The capture leaves the model as it found it: its buffers (batch-norm
running statistics), train/eval flag and gradients are restored.

Memory: ``max_elements`` keeps at most about that many elements per layer, by whole statistics so
that every kept statistic is exact: channels of a batch-norm or instance-norm, rows of a
layer-norm or RMS-norm, samples of a group-norm. Half the kept ones are those with the largest
deviation from their mean (nearest to overflow), half those with the smallest (nearest to
underflow); :attr:`CapturedLayer.kept` says what was kept.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normbench.errors import UserError

if TYPE_CHECKING:
    from normbench.numerics.cases import Case

# the unit subsampling keeps whole, per family: (name, dimension it indexes)
_UNITS = {"batchnorm": ("channels", 1), "instancenorm": ("channels", 1), "layernorm": ("rows", 0),
          "rmsnorm": ("rows", 0), "groupnorm": ("samples", 0)}


def classify(module: nn.Module) -> str | None:
    """The family of a normalization layer (``batchnorm``, ``layernorm``, ``rmsnorm``,
    ``groupnorm``, ``instancenorm``), or None for any other module."""
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, _InstanceNorm):
        return "instancenorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.RMSNorm):
        return "rmsnorm"
    return None


@dataclass
class CapturedLayer:
    """What the capture saw of one call of one normalization layer.

    ``input`` and ``grad_output`` are CPU copies of the layer's input and output gradient; after
    subsampling a layer-norm's leading dimensions are flattened into one (rows) and an unbatched
    instance-norm's input gains a batch dimension. ``weight`` and ``bias`` are the
    affine parameters restricted to the kept channels (None without affine). ``reduction_dims``:
    the dimensions of the layer's input that one statistic reduces over (group-norm: within
    groups of ``channels / groups`` channels, also over dimension 1). ``statistics``: ``"batch"``
    when the layer normalized by statistics of this input, ``"running"`` when (eval mode) it used
    stored ones. ``kept``: ``{"unit", "kept", "of", "elements", "of_elements"}``."""

    name: str
    kind: str
    family: str
    eps: float
    p: float = 2.0
    k: int | None = None
    groups: int | None = None
    normalized_shape: tuple[int, ...] | None = None
    reduction_dims: tuple[int, ...] = ()
    input_shape: tuple[int, ...] = ()
    dtype: str = "fp32"
    memory_format: str = "contiguous"
    statistics: str = "batch"
    affine: bool = False
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    input: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None
    kept: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def describe(self) -> dict[str, Any]:
        """The layer's facts as JSON-able fields (no tensors)."""
        out: dict[str, Any] = {
            "layer": self.name, "layer_kind": self.kind, "family": self.family, "eps": self.eps,
            "layer_p": self.p if math.isfinite(self.p) else "inf", "layer_k": self.k, "groups": self.groups,
            "reduction_dims": list(self.reduction_dims), "input_shape": list(self.input_shape), "dtype": self.dtype,
            "memory_format": self.memory_format, "statistics": self.statistics, "affine": self.affine,
            "kept": dict(self.kept), "skipped": self.skipped,
        }
        if self.weight is not None:
            out["weight_absmax"] = float(self.weight.abs().max()) if self.weight.numel() else 0.0
        return out


@dataclass
class Capture:
    """The result of :func:`capture`: every normalization layer in forward order (then those never
    called), the loss used, the mode of the pass."""

    layers: list[CapturedLayer]
    loss: str
    mode: str

    @property
    def analysed(self) -> list[CapturedLayer]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[CapturedLayer]:
        return [layer for layer in self.layers if layer.skipped is not None]

    def profile_shapes(self) -> tuple[list[tuple[str, tuple[int, ...]]], list[str], list[str]]:
        """The layers as ``profile`` shapes: ``(family, shape)`` in network order (a layer- or
        RMS-norm's leading dimensions flattened into rows), the memory formats seen, and notes on
        the layers left out (instance-norms, which profile has no family for, and skipped ones)."""
        shapes, formats, notes = [], [], []
        for layer in self.layers:
            if layer.skipped is not None and not layer.input_shape:
                notes.append(f"{layer.name}: {layer.skipped}")
                continue
            if layer.family == "instancenorm":
                notes.append(f"{layer.name}: instance-norms are not profiled")
                continue
            shape = layer.input_shape
            if layer.family in ("layernorm", "rmsnorm"):
                hidden = math.prod(layer.normalized_shape or shape[-1:])
                shape = (math.prod(shape) // hidden, hidden)
            shapes.append((layer.family, tuple(shape)))
            formats.append(layer.memory_format)
        return shapes, list(dict.fromkeys(formats)), notes


def _dtype_name(dtype: torch.dtype) -> str:
    from normbench.axes import dtype_name

    return dtype_name(dtype)


def memory_format_of(x: torch.Tensor) -> str:
    """``channels_last`` for a 4-D or 5-D tensor laid out so (and not also contiguous), else ``contiguous``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "contiguous"


def _describe_module(name: str, m: nn.Module, family: str) -> CapturedLayer:
    eps = getattr(m, "eps", None)
    layer = CapturedLayer(name=name, kind=type(m).__name__, family=family, eps=float(eps) if eps is not None else -1.0,
                          p=float(getattr(m, "p", 2.0)), k=getattr(m, "k", None))
    if family in ("layernorm", "rmsnorm"):
        layer.normalized_shape = tuple(m.normalized_shape)
        layer.affine = bool(getattr(m, "elementwise_affine", False))
    elif family == "groupnorm":
        layer.groups = int(m.num_groups)
        layer.affine = bool(m.affine)
    else:
        layer.affine = bool(getattr(m, "affine", False))
    return layer


def _units(layer: CapturedLayer, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` in a layout whose dimension ``dim`` indexes the independent units of the layer."""
    if layer.family in ("layernorm", "rmsnorm"):
        return x.reshape(-1, *layer.normalized_shape), 0
    return x, _UNITS[layer.family][1]


def _choose(x: torch.Tensor, dim: int, keep: int) -> torch.Tensor:
    """Indices of ``keep`` units along ``dim``: half the largest spread, half the smallest, sorted."""
    moved = x.detach().movedim(dim, 0).reshape(x.shape[dim], -1).to(torch.float64)
    spread = (moved - moved.mean(1, keepdim=True)).abs().amax(1)
    order = torch.argsort(spread, descending=True)
    hi = (keep + 1) // 2
    idx = torch.cat([order[:hi], order[len(order) - (keep - hi):]]) if keep > hi else order[:hi]
    return torch.unique(idx).sort().values


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class _Recorder:
    """The hooks of one capture: a forward hook per layer that copies the input (subsampled) and
    registers a gradient hook on the output."""

    def __init__(self, max_elements: int | None) -> None:
        self.max_elements = max_elements
        self.layers: list[CapturedLayer] = []
        self.calls: dict[str, int] = {}

    def hook(self, name: str, family: str):
        def forward_hook(m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            count = self.calls.get(name, 0) + 1
            self.calls[name] = count
            layer = _describe_module(name if count == 1 else f"{name}#{count}", m, family)
            self.layers.append(layer)
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                layer.skipped = "its input is not a floating-point tensor"
                return
            layer.input_shape, layer.dtype, layer.memory_format = tuple(x.shape), _dtype_name(x.dtype), memory_format_of(x)
            if layer.eps < 0:  # RMSNorm(eps=None) uses the dtype's machine epsilon
                layer.eps = float(torch.finfo(x.dtype).eps)
            self._axes(layer, m, x)
            units, dim = _units(layer, x if not (family == "instancenorm" and _unbatched(m, x)) else x.unsqueeze(0))
            total, numel = units.shape[dim], units.numel()
            idx = None
            if self.max_elements is not None and numel > self.max_elements:
                keep = max(1, min(total, self.max_elements // max(1, numel // total)))
                if keep < total:
                    idx = _choose(units, dim, keep).to(x.device)
            kept_units = units if idx is None else units.index_select(dim, idx)
            layer.input = _to_cpu(x if idx is None else kept_units)
            n_kept = kept_units.shape[dim]
            layer.kept = {"unit": _UNITS[family][0], "kept": int(n_kept), "of": int(total),
                          "elements": int(kept_units.numel()), "of_elements": int(numel),
                          "how": "all" if idx is None else "half the largest, half the smallest spread"}
            w = getattr(m, "weight", None) if layer.affine else None
            b = getattr(m, "bias", None) if layer.affine else None
            per_channel = family in ("batchnorm", "instancenorm")
            for attr, t in (("weight", w), ("bias", b)):
                if isinstance(t, torch.Tensor):
                    t = t.detach()
                    if per_channel and idx is not None:
                        t = t.index_select(0, idx)
                    setattr(layer, attr, _to_cpu(t))
            out = output if isinstance(output, torch.Tensor) else None
            if out is None or not out.requires_grad:
                layer.skipped = "no gradient reaches its output (nothing before or in it requires grad)"
                layer.input = None
                return

            def grad_hook(g: torch.Tensor) -> None:
                if idx is None:
                    layer.grad_output = _to_cpu(g)
                    return
                gu, _ = _units(layer, g if not (family == "instancenorm" and _unbatched(m, x)) else g.unsqueeze(0))
                layer.grad_output = _to_cpu(gu.index_select(dim, idx))

            out.register_hook(grad_hook)

        return forward_hook

    @staticmethod
    def _axes(layer: CapturedLayer, m: nn.Module, x: torch.Tensor) -> None:
        nd = x.dim()
        if layer.family == "batchnorm":
            layer.reduction_dims = (0, *range(2, nd))
            uses_batch = m.training or not m.track_running_stats
        elif layer.family == "instancenorm":
            start = 1 if _unbatched(m, x) else 2
            layer.reduction_dims = tuple(range(start, nd))
            uses_batch = m.training or not m.track_running_stats
        elif layer.family == "groupnorm":
            layer.reduction_dims = tuple(range(1, nd))
            uses_batch = True
        else:
            layer.reduction_dims = tuple(range(nd - len(layer.normalized_shape), nd))
            uses_batch = True
        layer.statistics = "batch" if uses_batch else "running"


def _unbatched(m: nn.Module, x: torch.Tensor) -> bool:
    """An instance-norm called on ``(C, L...)`` without a batch dimension."""
    return isinstance(m, _InstanceNorm) and x.dim() == m._get_no_batch_dim()


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` applied to its prepared input: a tensor, a tuple of positional arguments, or a
    dict of keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(*inputs)


def training_loss(out: Any, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The loss of the capture pass and of ``profile --model``'s training step, and its
    description: the cross-entropy of a 2-D output against seeded labels, else the mean of the
    output times a seeded N(0, 1) readout (see the module docstring)."""
    y = _first_tensor(out)
    if y is None or not y.is_floating_point():
        raise UserError("the model's output holds no floating-point tensor to take a loss of")
    if not y.requires_grad:
        raise UserError("the model's output does not require grad: nothing to backpropagate (frozen model?)")
    if y.dim() == 2 and y.shape[1] > 1:
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, y.shape[1], (y.shape[0],), generator=gen).to(y.device)
        return nn.functional.cross_entropy(y.float(), labels), "cross-entropy against seeded random labels"
    gen = torch.Generator().manual_seed(seed)
    readout = torch.randn(tuple(y.shape), generator=gen).to(y.device)
    return (y.float() * readout).mean(), "the mean of the output times a seeded N(0, 1) readout"


def capture(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor] | dict[str, torch.Tensor],
    train: bool = True,
    max_elements: int | None = None,
    seed: int = 0,
) -> Capture:
    """Run one forward and one backward pass of ``model`` on ``inputs`` (a tensor, positional
    tensors, or keyword tensors) in train (``train``) or eval mode, and return what every
    normalization layer saw. A model without normalization layers is a UserError."""
    norms = [(name, m, fam) for name, m in model.named_modules() if (fam := classify(m)) is not None]
    if not norms:
        raise UserError(f"the model ({type(model).__name__}) has no normalization layer normbench knows "
                        f"(BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm or their Lp variants)")
    if max_elements is not None and max_elements < 1:
        raise UserError(f"--max-elements must be positive, got {max_elements}")
    rec = _Recorder(max_elements)
    was_training = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    grads = {n: (p.grad, p.requires_grad) for n, p in model.named_parameters()}
    handles = [m.register_forward_hook(rec.hook(name, fam)) for name, m, fam in norms]
    model.train(train)
    try:
        out = call_model(model, inputs)
        loss, how = training_loss(out, seed)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        for n, p in model.named_parameters():
            p.grad = grads[n][0]
    for layer in rec.layers:
        if layer.skipped is None and layer.grad_output is None:
            layer.skipped = "no gradient reached its output in the backward pass"
            layer.input = None
    called = set(rec.calls)
    never = []
    for name, m, fam in norms:
        if name not in called:
            layer = _describe_module(name, m, fam)
            layer.skipped = "not called in the forward pass"
            never.append(layer)
    return Capture(rec.layers + never, how, "train" if train else "eval")


def gaussian_input(shape: Sequence[int], dtype: torch.dtype = torch.float32, device: str = "cpu",
                   seed: int = 0) -> torch.Tensor:
    """N(0, 1) input of ``shape`` from a fixed seed (``--input-shape``)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def load_model_input(path: str | os.PathLike) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """The model's input from a file (``--model-input``), read as ``--input`` reads files, never
    unpickling code: a tensor (``model(t)``), a list of tensors (``model(*ts)``) or a dict of
    tensors (one entry: ``model(t)``; several: ``model(**d)``). Torch files keep their dtypes
    (token ids stay integers); .npy/.npz arrays are read as float64."""
    from normbench.numerics.inputs import SUFFIXES, load_numpy, load_torch

    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise UserError(f"--model-input {p}: takes {', '.join(SUFFIXES)} files")
    if not p.is_file():
        raise UserError(f"--model-input {p}: no such file")
    obj: Any = load_numpy(p) if p.suffix.lower() in (".npy", ".npz") else load_torch(p)
    if isinstance(obj, dict) and None in obj:
        obj = obj[None]
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]
    if not all(isinstance(t, torch.Tensor) for t in items) or not items:
        raise UserError(f"--model-input {p}: holds no tensor, or something besides tensors")
    if isinstance(obj, list):
        obj = tuple(obj)
    return obj


def prepare_input(
    inputs: Any, model: nn.Module, device: str
) -> Any:
    """``inputs`` on ``device``, floating tensors in the dtype of the model's first floating
    parameter (integer tensors such as token ids kept as they are)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    if isinstance(inputs, torch.Tensor):
        return move(inputs)
    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    return tuple(move(t) for t in inputs)


def _core_gradient(layer: CapturedLayer) -> torch.Tensor:
    """The gradient reaching the normalization itself, ``dy * weight`` (the affine step
    ``y = weight * xhat + bias`` multiplies it by the weight), in the input's layout."""
    g = layer.grad_output.to(torch.float64)
    if layer.weight is None:
        return g
    w = layer.weight.to(torch.float64)
    if layer.family in ("layernorm", "rmsnorm"):
        return g * w
    return g * w.reshape(1, -1, *([1] * (g.dim() - 2)))


def _analysis_layout(layer: CapturedLayer, t: torch.Tensor) -> torch.Tensor:
    """``t`` laid out for the norm family it is analysed in: a batch-norm as it is; a layer- or
    RMS-norm as (rows, hidden); a group-norm as (samples x groups, 1, values of a group) and an
    instance-norm as (samples x channels, 1, values of a channel), both one-group group-norms."""
    if layer.family in ("layernorm", "rmsnorm"):
        return t.reshape(-1, math.prod(layer.normalized_shape))
    if layer.family == "instancenorm" and t.dim() == len(layer.input_shape) == len(layer.reduction_dims) + 1:
        t = t.unsqueeze(0)  # unbatched (C, L...): one sample
    if layer.family == "groupnorm":
        return t.reshape(t.shape[0] * int(layer.groups or 1), 1, -1)
    if layer.family == "instancenorm":
        return t.reshape(t.shape[0] * t.shape[1], 1, -1)
    return t


def analysis_family(family: str) -> str:
    """The :class:`~normbench.axes.NormSpec` family a captured layer's family is analysed as
    (an instance-norm is a group-norm with one channel per group)."""
    return "groupnorm" if family == "instancenorm" else family


def layer_case(layer: CapturedLayer, index: int) -> Case:
    """A stability case of a captured layer: its input, and the gradient reaching the
    normalization (``dy * weight``) scaled by a power of 2 so that its largest value lies in
    [1, 2), as a loss scaler would (recorded as ``grad_scale``: gradients of a mean loss are tiny
    and would underflow fp16 for every norm alike, which says nothing about the norm)."""
    from normbench.numerics.cases import Case
    from normbench.numerics.runner import LAYER_CASE

    if layer.skipped is not None or layer.input is None or layer.grad_output is None:
        raise ValueError(f"{layer.name} was not captured ({layer.skipped})")
    x = _analysis_layout(layer, layer.input.to(torch.float64))
    g = _analysis_layout(layer, _core_gradient(layer))
    peak = float(g.abs().max()) if g.numel() else 0.0
    scale = 2.0 ** -math.floor(math.log2(peak)) if peak > 0 and math.isfinite(peak) else 1.0
    fields = (("layer", layer.name), ("layer_kind", layer.kind), ("layer_index", index),
              ("layer_family", layer.family), ("layer_shape", list(layer.input_shape)),
              ("layer_statistics", layer.statistics), ("kept", dict(layer.kept)), ("grad_scale", scale))
    return Case(LAYER_CASE, (("layer", layer.name), ("kind", layer.kind)), tuple(x.shape), 0, x, g * scale,
                analysis_family(layer.family), layer.eps, fields)


def layer_cases(cap: Capture) -> tuple[Case, ...]:
    """The stability cases of every analysed layer, in network order."""
    return tuple(layer_case(layer, i) for i, layer in enumerate(cap.analysed))
