"""The axes shared by the commands' comma-separated options: norms, dtypes, shapes, devices.

Norm names (``--norm``): ``[<dispersion>-]<family>`` where the dispersion is ``l2`` (default),
``l1``, ``linf`` or ``top<k>`` (mean of the k largest deviations, e.g. ``top10``) and the family is
batch-norm (the default, written without a family: ``l2``, ``l1``, ``linf``, ``top10``),
``layernorm``, ``rmsnorm`` or ``groupnorm`` (``layernorm`` alone is the L2 one; ``l1-rmsnorm`` ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from normbench.errors import UserError

FAMILIES = ("batchnorm", "layernorm", "rmsnorm", "groupnorm")
DISPERSIONS = ("l2", "l1", "linf")
GROUPS = 32  # group-norm's groups: gcd(GROUPS, channels)
LABELS = {"l2": "L2", "l1": "L1", "linf": "L-inf"}  # how tables, verdicts and figures write a dispersion


def norm_label(name: str) -> str:
    """A norm's name as prose and figures write it: ``L2``, ``L1``, ``L-inf``; others as named."""
    return LABELS.get(name, name)

DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
_DTYPE_ALIASES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16", "fp8_e4m3fn": "fp8_e4m3", "float": "fp32", "double": "fp64"}


def split_list(text: str | Sequence[str]) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (a sequence is flattened the same way; empty items dropped)."""
    items = [text] if isinstance(text, str) else list(text)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


@dataclass(frozen=True)
class NormSpec:
    """One norm layer: a family and its dispersion (p, and k for top-k)."""

    family: str
    p: float
    k: int | None = None

    @property
    def dispersion(self) -> str:
        if self.k is not None:
            return f"top{self.k}"
        return {2.0: "l2", 1.0: "l1", math.inf: "linf"}[self.p]

    @property
    def name(self) -> str:
        """The canonical ``--norm`` name: ``l1``, ``top10``, ``layernorm``, ``l1-rmsnorm`` ..."""
        if self.family == "batchnorm":
            return self.dispersion
        return self.family if self.dispersion == "l2" else f"{self.dispersion}-{self.family}"

    def check_shape(self, shape: Sequence[int]) -> None:
        """A UserError when this family cannot take input of this shape."""
        if self.family in ("batchnorm", "groupnorm") and not 2 <= len(shape) <= 5:
            raise UserError(f"{self.name} takes (N, C, ...) shapes of 2 to 5 dimensions, got {format_shape(shape)}")
        if len(shape) < 2 and self.family in ("layernorm", "rmsnorm"):
            raise UserError(f"{self.name} takes shapes (rows..., hidden), got {format_shape(shape)}")

    def reduced_numel(self, shape: Sequence[int]) -> int:
        """How many values each statistic of this layer reduces over, for input of this shape."""
        if self.family == "batchnorm":
            return math.prod(shape) // shape[1]
        if self.family == "groupnorm":
            return math.prod(shape[1:]) // math.gcd(GROUPS, shape[1])
        return shape[-1]

    def module(self, shape: Sequence[int], impl: str = "auto", **kwargs) -> torch.nn.Module:
        """The normbench layer for input of ``shape`` (parameters in fp32 on the CPU)."""
        from normbench import nn as nbn

        self.check_shape(shape)
        lp = dict(p=self.p, k=self.k, impl=impl, **kwargs)
        if self.family == "batchnorm":
            cls = {2: nbn.LpBatchNorm1d, 3: nbn.LpBatchNorm1d, 4: nbn.LpBatchNorm2d, 5: nbn.LpBatchNorm3d}[len(shape)]
            return cls(shape[1], **lp)
        if self.family == "layernorm":
            return nbn.LpLayerNorm(shape[-1], **lp)
        if self.family == "rmsnorm":
            return nbn.LpRMSNorm(shape[-1], **lp)
        return nbn.LpGroupNorm(math.gcd(GROUPS, shape[1]), shape[1], **lp)

    def torch_module(self, shape: Sequence[int], **kwargs) -> torch.nn.Module:
        """torch's own layer of this family (its L2 layer, whatever this spec's p)."""
        self.check_shape(shape)
        nn = torch.nn
        if self.family == "batchnorm":
            cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
            return cls(shape[1], **kwargs)
        if self.family == "layernorm":
            return nn.LayerNorm(shape[-1], **kwargs)
        if self.family == "rmsnorm":
            return nn.RMSNorm(shape[-1], **kwargs)
        return nn.GroupNorm(math.gcd(GROUPS, shape[1]), shape[1], **kwargs)


_DISPERSION_RE = re.compile(r"^(l2|l1|linf|top(\d+))$")
_FAMILY_ALIASES = {"bn": "batchnorm", "ln": "layernorm", "rms": "rmsnorm", "gn": "groupnorm"}


def parse_norm(name: str) -> NormSpec:
    """A NormSpec from a ``--norm`` name; a UserError listing the valid forms otherwise."""
    text = name.strip().lower()
    if "-" in text:
        disp, _, family = text.rpartition("-")
    elif _FAMILY_ALIASES.get(text, text) in FAMILIES:
        disp, family = "l2", text
    else:  # a dispersion alone names a batch-norm
        disp, family = text, "batchnorm"
    family = _FAMILY_ALIASES.get(family, family)
    m = _DISPERSION_RE.match(disp)
    if family not in FAMILIES or not m:
        raise UserError(
            f"unknown norm {name!r}: use l2, l1, linf or top<k> (batch-norm), optionally followed by "
            f"-layernorm, -rmsnorm or -groupnorm (e.g. l1-layernorm; 'layernorm' alone is L2)"
        )
    if m.group(2) is not None:
        k = int(m.group(2))
        if k < 1:
            raise UserError(f"norm {name!r}: top-k needs k >= 1")
        return NormSpec(family, math.inf, None if k == 1 else k)
    return NormSpec(family, {"l2": 2.0, "l1": 1.0, "linf": math.inf}[m.group(1)])


def parse_norms(text: str | Sequence[str]) -> list[NormSpec]:
    """Comma-separated norm names, in order, without repeats."""
    specs = [parse_norm(n) for n in split_list(text)]
    if not specs:
        raise UserError("--norm needs at least one norm")
    return list(dict.fromkeys(specs))


def parse_dtype(name: str) -> torch.dtype:
    key = _DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype (``fp16``, ``fp8_e4m3`` ...)."""
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def parse_dtypes(text: str | Sequence[str]) -> list[torch.dtype]:
    dtypes = [parse_dtype(n) for n in split_list(text)]
    if not dtypes:
        raise UserError("--dtype needs at least one dtype")
    return list(dict.fromkeys(dtypes))


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x64x56x56"`` -> ``(32, 64, 56, 56)``."""
    parts = text.strip().lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UserError(f"bad shape {text!r}: write positive sizes joined by 'x', e.g. 32x64x56x56")
    return shape


def parse_shapes(text: str | Sequence[str]) -> list[tuple[int, ...]]:
    return list(dict.fromkeys(parse_shape(s) for s in split_list(text)))


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a UserError for an unavailable device."""
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
        try:
            torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device name (cuda, cuda:0 ...)") from None
        return name
    raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
