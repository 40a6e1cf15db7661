"""A low-precision arithmetic emulator on torch tensors, differentiable by autograd.

Values live in float64 tensors that hold only values of the emulated :class:`Format`. Every
operation computes its exact (or float64) result and rounds it to the format once, as hardware
with that arithmetic would (see :mod:`normbench.numerics.formats` for why this is exact for
single operations). Reductions run in the format in a chosen order:

``pairwise``
    a balanced tree over adjacent pairs, each node rounded. For a *mean*, every node is the mean
    of its two children, computed as ``round(round(a/2) + round(b/2))`` after zero-padding the
    row to a power of two (then one rounded multiply by ``2**m / n``): a mean of partial means,
    whose partials never exceed the largest input, so a mean that fits the format cannot overflow.
``sequential``
    a running sum, left to right, rounded after every addition; a mean divides it by n. An fp16
    sum of ones stops at 2048 (2048 + 1 rounds back to 2048), a bf16 one at 256.
``sum``
    sum then divide: the sum of the row with a wide (float64) accumulator, rounded once to the
    format, then divided by n. Overflows exactly when the true sum leaves the format's range.

Dividing by a count n is one correctly rounded operation with n exact (a count is an integer,
not a format value; in fp16 n = 65536 itself would overflow).

Autograd: each operation is a :class:`torch.autograd.Function` whose backward is computed with the
same rounded operations, and whose broadcasting sums (for example the gradient of ``u / D`` with
respect to a per-row ``D``) are reductions in the chosen order. The engine adds the gradients of a
tensor used several times in float64; a hook on every output rounds that total once.
Data movement (reshape, permute, indexing) is exact and stays plain torch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from normbench.numerics.formats import Format, get_format

REDUCTIONS = ("pairwise", "sequential", "sum")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Emulator:
    """Rounded arithmetic in one format with one reduction order.

    Build one per (format, order): ``emu = Emulator("fp16", "pairwise")``; then ``x = emu.input(t)``
    rounds a tensor into the format (float64, requires_grad kept) and ``emu.add``, ``emu.mean`` ...
    compute on such tensors. The plain (non-autograd) versions are the ``r_`` methods.
    """

    def __init__(self, fmt: Format | str | torch.dtype, reduction: str = "pairwise") -> None:
        self.format = fmt if isinstance(fmt, Format) else get_format(fmt)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"Emulator({self.format.name!r}, {self.reduction!r})"

    # ---- plain rounded operations (no autograd) ------------------------------------------------

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the format, as float64."""
        return self.format.round(x.to(torch.float64))

    def constant(self, value: float) -> float:
        """A Python number rounded to the format (eps, C1, ... as the format stores them)."""
        return float(self.round(torch.tensor([value], dtype=torch.float64))[0])

    def r_sum_last(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the last dimension in this emulator's order (no keepdim)."""
        n = x.shape[-1]
        if n == 0:
            return x.new_zeros(x.shape[:-1])
        if self.reduction == "sum":
            return self.round(x.sum(-1))
        if self.reduction == "sequential":
            s = x[..., 0]
            for i in range(1, n):
                s = self.round(s + x[..., i])
            return s
        while x.shape[-1] > 1:
            if x.shape[-1] % 2:
                x = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], -1)
            x = self.round(x[..., 0::2] + x[..., 1::2])
        return x[..., 0]

    def r_mean_last(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the last dimension in this emulator's order (no keepdim)."""
        n = x.shape[-1]
        if self.reduction != "pairwise":
            return self.round(self.r_sum_last(x) / n)
        width = _next_pow2(n)
        if width != n:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], width - n)], -1)
        while x.shape[-1] > 1:
            x = self.round(self.round(x[..., 0::2] * 0.5) + self.round(x[..., 1::2] * 0.5))
        m = x[..., 0]
        return m if width == n else self.round(m * (width / n))

    def r_sum(self, x: torch.Tensor, dims: Sequence[int], keepdim: bool = False) -> torch.Tensor:
        """Sum over ``dims`` in this emulator's order: the dims are merged into one row (row-major
        order of the reduced elements) and reduced as one."""
        return self._reduce(x, dims, keepdim, self.r_sum_last)

    def r_mean(self, x: torch.Tensor, dims: Sequence[int], keepdim: bool = False) -> torch.Tensor:
        """Mean over ``dims`` in this emulator's order."""
        return self._reduce(x, dims, keepdim, self.r_mean_last)

    def _reduce(self, x: torch.Tensor, dims: Sequence[int], keepdim: bool, fn) -> torch.Tensor:
        dims = sorted({d % x.dim() for d in dims}) if x.dim() else []
        if not dims:
            return x
        kept = [d for d in range(x.dim()) if d not in dims]
        moved = x.permute(*kept, *dims)
        out = fn(moved.reshape(*moved.shape[: len(kept)], -1))
        if keepdim:
            out = out.reshape([1 if d in dims else s for d, s in enumerate(x.shape)])
        return out

    def r_sum_to(self, g: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Reduce a broadcast gradient ``g`` back to ``shape`` (the gradient of broadcasting)."""
        shape = tuple(shape)
        if tuple(g.shape) == shape:
            return g
        lead = g.dim() - len(shape)
        dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1]
        out = self.r_sum(g, dims, keepdim=True) if dims else g
        return out.reshape(shape)

    # ---- differentiable operations -----------------------------------------------------------

    def _track(self, out: torch.Tensor) -> torch.Tensor:
        if out.requires_grad:
            out.register_hook(self.round)
        return out

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a float64 tensor of format values (the gradient flowing back is rounded too)."""
        return self._track(_Round.apply(x, self))

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._track(_Binary.apply(a, b, self, "add"))

    def sub(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._track(_Binary.apply(a, b, self, "sub"))

    def mul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._track(_Binary.apply(a, b, self, "mul"))

    def div(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._track(_Binary.apply(a, b, self, "div"))

    def scale(self, a: torch.Tensor, c: float) -> torch.Tensor:
        """``a * c`` with the constant ``c`` first rounded to the format."""
        return self._track(_Scale.apply(a, self, self.constant(c)))

    def add_scalar(self, a: torch.Tensor, c: float) -> torch.Tensor:
        """``a + c`` with the constant ``c`` first rounded to the format (``eps`` in fp16 ...)."""
        return self._track(_AddScalar.apply(a, self, self.constant(c)))

    def sqrt(self, a: torch.Tensor) -> torch.Tensor:
        return self._track(_Sqrt.apply(a, self))

    def abs(self, a: torch.Tensor) -> torch.Tensor:
        return a.abs()  # exact; autograd's sign(a) * g is exact too

    def sum(self, a: torch.Tensor, dims: Sequence[int], keepdim: bool = False) -> torch.Tensor:
        return self._track(_Reduce.apply(a, self, tuple(dims), keepdim, False))

    def mean(self, a: torch.Tensor, dims: Sequence[int], keepdim: bool = False) -> torch.Tensor:
        return self._track(_Reduce.apply(a, self, tuple(dims), keepdim, True))

    def amax(self, a: torch.Tensor, dims: Sequence[int], keepdim: bool = False) -> torch.Tensor:
        """Maximum (exact; ties share the gradient equally, as torch's amax does)."""
        return self._track(_Amax.apply(a, self, tuple(dims), keepdim))

    def topk_mean_last(self, a: torch.Tensor, k: int) -> torch.Tensor:
        """Mean of the k largest values along the last dimension, keepdim (selection is exact).
        The gradient follows normbench's tie rule: the values above the k-th largest t get their
        own share, and the shares of the selected values equal to t are pooled and split equally
        among every value equal to t (:func:`normbench.kernels.reference.tie_weights`)."""
        return self.mean(_TopkValues.apply(a, self, k), (-1,), keepdim=True)


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, emu):
        ctx.emu = emu
        return emu.round(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.emu.round(g), None


class _Binary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, emu, op):
        ctx.emu, ctx.op = emu, op
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        if op == "add":
            out = emu.round(a + b)
        elif op == "sub":
            out = emu.round(a - b)
        elif op == "mul":
            out = emu.round(a * b)
            ctx.save_for_backward(a, b)
        else:
            out = emu.round(a / b)
            ctx.save_for_backward(b, out)
        return out

    @staticmethod
    def backward(ctx, g):
        emu, op = ctx.emu, ctx.op
        if op == "add":
            ga, gb = g, g
        elif op == "sub":
            ga, gb = g, -g
        elif op == "mul":
            a, b = ctx.saved_tensors
            ga, gb = emu.round(g * b), emu.round(g * a)
        else:  # d(a/b)/da = 1/b,  d(a/b)/db = -(a/b)/b
            b, out = ctx.saved_tensors
            ga = emu.round(g / b)
            gb = -emu.round(ga * out)
        ga = emu.r_sum_to(ga, ctx.a_shape) if ctx.needs_input_grad[0] else None
        gb = emu.r_sum_to(gb, ctx.b_shape) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, emu, c):
        ctx.emu, ctx.c = emu, c
        return emu.round(a * c)

    @staticmethod
    def backward(ctx, g):
        return ctx.emu.round(g * ctx.c), None, None


class _AddScalar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, emu, c):
        return emu.round(a + c)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _Sqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, emu):
        ctx.emu = emu
        out = emu.round(a.sqrt())
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        emu = ctx.emu
        return emu.round(g / emu.round(2 * out)), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, emu, dims, keepdim, is_mean):
        ctx.emu, ctx.shape, ctx.dims, ctx.keepdim, ctx.is_mean = emu, a.shape, dims, keepdim, is_mean
        ctx.count = math.prod(a.shape[d] for d in dims) if dims else 1
        return emu.r_mean(a, dims, keepdim) if is_mean else emu.r_sum(a, dims, keepdim)

    @staticmethod
    def backward(ctx, g):
        emu = ctx.emu
        if not ctx.keepdim:
            g = g.reshape([1 if d in {x % len(ctx.shape) for x in ctx.dims} else s for d, s in enumerate(ctx.shape)])
        if ctx.is_mean:
            g = emu.round(g / ctx.count)
        return g.expand(ctx.shape).contiguous(), None, None, None, None


class _Amax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, emu, dims, keepdim):
        out = a.amax(dims, keepdim=True)
        ctx.emu, ctx.shape, ctx.keepdim, ctx.dims = emu, a.shape, keepdim, dims
        ctx.save_for_backward(a == out)
        return out if keepdim else out.squeeze(dims)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        if not ctx.keepdim:
            g = g.reshape([1 if d in {x % len(ctx.shape) for x in ctx.dims} else s for d, s in enumerate(ctx.shape)])
        ties = mask.sum(ctx.dims, keepdim=True)
        share = ctx.emu.round(g / ties)
        return torch.where(mask, share, torch.zeros_like(share)), None, None, None


class _TopkValues(torch.autograd.Function):
    """The k largest values along the last dimension (unsorted); backward by the tie rule."""

    @staticmethod
    def forward(ctx, a, emu, k):
        values, idx = a.topk(k, dim=-1, sorted=False)
        threshold = values.amin(-1, keepdim=True)
        ctx.emu = emu
        ctx.save_for_backward(a, idx, threshold)
        return values

    @staticmethod
    def backward(ctx, g):
        a, idx, threshold = ctx.saved_tensors
        above = a.gather(-1, idx) > threshold  # selected slots strictly above the k-th largest
        grad = torch.zeros_like(a).scatter_(-1, idx, torch.where(above, g, torch.zeros_like(g)))
        tied = a == threshold
        pooled = torch.where(above, torch.zeros_like(g), g).sum(-1, keepdim=True)
        share = ctx.emu.round(pooled / tied.sum(-1, keepdim=True).clamp(min=1))
        return torch.where(tied, share, grad), None, None

