"""What the numba CPU kernels share (batch-norm, :mod:`normbench.kernels.numba_bn`, and rows,
:mod:`normbench.kernels.numba_rows`): the scalar helpers that load and store float32, float64 and
bfloat16 alike, vectorizable max and min, the insertion that keeps the k largest values, and how
kernels are launched, which lets :mod:`normbench.kernels.background` compile them without running
them (:func:`compile_only`).

bfloat16 travels as its int16 bits and is widened in registers (``x << 16``) and rounded to
nearest-even on store, as torch rounds. Max and min use LLVM's ``maxnum``/``minnum`` so that
their reductions vectorize (numba's ``max`` does not).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from normbench.kernels.fused import NUMBA_DTYPES

# reassociation lets LLVM vectorize the sums; no nnan/ninf: NaN and inf input stay visible
_FASTMATH = {"reassoc", "contract", "nsz"}
SUPPORTED = NUMBA_DTYPES


@intrinsic
def _bf16_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    """Round to nearest even; NaN stays NaN (quiet)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb), ir.Constant(i32, 16))
        quiet_nan = builder.or_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.int16(types.float32), codegen


def _llvm_binary(name: str):
    @intrinsic
    def call(typingctx, a, b):
        def codegen(context, builder, signature, args):
            ty = args[0].type
            suffix = ".f32" if ty == ir.FloatType() else ".f64"
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty]), name + suffix)
            # nnan lets the reduction vectorize; a NaN input already makes the channel's sum NaN
            return builder.call(fn, args, fastmath=("nnan", "nsz", "reassoc"))

        return a(a, a), codegen

    return call


_maxnum = _llvm_binary("llvm.maxnum")
_minnum = _llvm_binary("llvm.minnum")


def _load(arr, i, j, m):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


def _load1(arr, i):  # pragma: no cover
    raise NotImplementedError


def _store(arr, i, j, m, v):  # pragma: no cover
    raise NotImplementedError


def _cast(arr, v):  # pragma: no cover
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(arr, i, j, m):
    if arr.dtype == types.int16:
        return lambda arr, i, j, m: _bf16_to_f32(arr[i, j, m])
    return lambda arr, i, j, m: arr[i, j, m]


@overload(_load1, inline="always")
def _load1_impl(arr, i):
    if arr.dtype == types.int16:
        return lambda arr, i: _bf16_to_f32(arr[i])
    return lambda arr, i: arr[i]


@overload(_store, inline="always")
def _store_impl(arr, i, j, m, v):
    if arr.dtype == types.int16:

        def store_bf16(arr, i, j, m, v):
            arr[i, j, m] = _f32_to_bf16(np.float32(v))

        return store_bf16
    if arr.dtype == types.float64:

        def store_f64(arr, i, j, m, v):
            arr[i, j, m] = np.float64(v)

        return store_f64

    def store_f32(arr, i, j, m, v):
        arr[i, j, m] = np.float32(v)

    return store_f32


@overload(_cast, inline="always")
def _cast_impl(arr, v):
    """``v`` in the arithmetic type of ``arr``'s values: float64 for float64, float32 otherwise."""
    if arr.dtype == types.float64:
        return lambda arr, v: np.float64(v)
    return lambda arr, v: np.float32(v)


def _store1(arr, i, v):  # pragma: no cover
    raise NotImplementedError


@overload(_store1, inline="always")
def _store1_impl(arr, i, v):
    """``arr[i] = v`` rounded to ``arr``'s storage (bfloat16 bits, float32 or float64)."""
    if arr.dtype == types.int16:

        def store_bf16(arr, i, v):
            arr[i] = _f32_to_bf16(np.float32(v))

        return store_bf16
    if arr.dtype == types.float64:

        def store_f64(arr, i, v):
            arr[i] = np.float64(v)

        return store_f64

    def store_f32(arr, i, v):
        arr[i] = np.float32(v)

    return store_f32


@njit(inline="always")
def _tie_step(u, t, n_eq, s_eq, n_gt, s_gt):
    """One deviation u's share of the tie counts against the threshold t: E and the sign sum of the
    |u| equal to t, G and the sign sum of those above it (integers without branches, so that the
    loops counting them vectorize)."""
    d = abs(u)
    s = np.int64(u > 0) - np.int64(u < 0)
    eq = np.int64(d == t)
    gt = np.int64(d > t)
    return n_eq + eq, s_eq + s * eq, n_gt + gt, s_gt + s * gt


@njit(inline="always")
def _insert(top, v):
    """Put ``v`` into ``top``, the k largest so far in descending order, when it beats the last."""
    k = top.shape[0]
    if not v > top[k - 1]:
        return
    i = k - 1
    while i > 0 and top[i - 1] < v:
        top[i] = top[i - 1]
        i -= 1
    top[i] = v


# ----------------------------------------------------------------------------- launching kernels
_local = threading.local()


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Within this block (on this thread only), :func:`launch` compiles each kernel for the types
    of its arguments and does not run it, and :func:`threads` answers 1 without starting numba's
    thread pool: how a background job compiles the kernels with the very types the entry points
    pass, by calling the entry points on a small input (the outputs are then garbage). Torch's
    thread count is kept."""
    torch_threads = torch.get_num_threads()
    _local.compile_only = True
    try:
        yield
    finally:
        _local.compile_only = False
        # compiling a parallel kernel starts numba's thread pool, which resets the OpenMP thread
        # count torch reads (see sync_threads): keep torch's as it was
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def compiling_only() -> bool:
    return getattr(_local, "compile_only", False)


def launch(kernel, *args) -> None:
    """Run ``kernel(*args)``, or under :func:`compile_only` compile it for these argument types."""
    if compiling_only():
        kernel.compile(tuple(numba.typeof(a) for a in args))
    else:
        kernel(*args)


def threads() -> int:
    """numba's thread count (1 under :func:`compile_only`, which must not start the pool)."""
    return 1 if compiling_only() else numba.get_num_threads()


def sync_threads() -> int:
    """Use as many threads as torch does (``normbench profile --threads`` sets torch's), keep
    torch's count as it was, and return numba's count: numba's OpenMP layer shares libgomp with
    torch, and launching its thread pool (on the first call) resets the count torch reads to
    numba's default. numba's count is per Python thread, so each thread remembers the torch count
    it last synchronized to and returns at once while that holds (this runs on every kernel call,
    where a few microseconds of Python count). 1 under :func:`compile_only`, touching nothing."""
    if compiling_only():
        return 1
    torch_threads = torch.get_num_threads()
    synced = getattr(_local, "synced", None)
    if synced is not None and synced[0] == torch_threads:
        return synced[1]
    current = numba.get_num_threads()  # launches numba's pool the first time
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    want = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if current != want:
        numba.set_num_threads(want)
    _local.synced = (torch_threads, want)
    return want


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor sharing its memory (bfloat16 as its int16 bits)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
