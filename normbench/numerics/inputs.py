"""The user's own tensors as stability cases (``--input FILE``), loaded without unpickling code.

``.pt`` / ``.pth``: ``torch.load(weights_only=True)``: a tensor, a dict of named tensors, or a
list/tuple of tensors. ``.npy``: one array; ``.npz``: one case per array; both through numpy with
``allow_pickle=False``. A file that would need unpickling of code (a pickled model, an object
array) is refused with a :class:`~normbench.errors.UserError`.

Shapes: a tensor is used as is when it has 2 to 5 dimensions (batch-norm takes dimension 1 as the
channel, layer/RMS-norm the last dimension); a 1-D tensor becomes one channel, ``(1, 1, n)``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from normbench.errors import UserError
from normbench.numerics.cases import Case

SUFFIXES = (".pt", ".pth", ".npy", ".npz")


def _as_case(path: Path, key: str | None, value: Any) -> Case:
    where = f"{path.name}" + ("" if key is None else f"[{key}]")
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{where}: holds a {type(value).__name__}, not a tensor; save tensors or a dict of tensors")
    if value.is_complex() or value.dtype == torch.bool:
        raise UserError(f"{where}: a {value.dtype} tensor; stability needs real numbers")
    t = value.detach().to("cpu", torch.float64)
    if t.dim() == 1:
        t = t.reshape(1, 1, -1)
    if not 2 <= t.dim() <= 5 or t.numel() < 2:
        raise UserError(f"{where}: shape {list(value.shape)}; use 1 to 5 dimensions and at least 2 values")
    params = (("file", path.name),) + ((("key", key),) if key is not None else ())
    return Case("file", params, tuple(t.shape), 0, t)


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"{path}: refused: loading it needs unpickling of code{what}, which normbench never does; "
            f"save plain tensors (torch.save of a tensor or a dict of tensors) or .npy/.npz"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path}: not a readable torch file ({str(exc).splitlines()[0][:160]})") from None


def load_torch(path: Path) -> Any:
    """What a torch file holds, read with ``torch.load(weights_only=True)`` on the CPU; a
    :class:`~normbench.errors.UserError` for a file that needs code unpickled or cannot be read
    (``--input``, ``--model-input`` and ``--weights`` all read torch files this way)."""
    return _load_torch(path)


def load_numpy(path: Path) -> dict[str | None, Any]:
    """The arrays of a .npy (key None) or .npz file as float64 tensors, read with
    ``allow_pickle=False``; a UserError for object arrays or an unreadable file."""
    return _load_numpy(path)


def _load_numpy(path: Path) -> dict[str | None, Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with most torch installs
        raise UserError(f"{path}: reading .npy/.npz needs numpy (pip install numpy)") from None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays: dict[str | None, Any] = {None: loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UserError(
                f"{path}: refused: it holds object arrays that need unpickling, which normbench never does; "
                f"save numeric arrays"
            ) from None
        raise UserError(f"{path}: not a readable numpy file ({str(exc).splitlines()[0][:160]})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    out: dict[str | None, Any] = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise UserError(f"{path.name}" + ("" if k is None else f"[{k}]") + f": a {a.dtype} array; use numbers")
        out[k] = torch.from_numpy(a.astype("float64"))
    return out


def load_inputs(path: str | Path) -> list[Case]:
    """One :class:`Case` per tensor in the file, in the file's order."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{path}: --input takes {', '.join(SUFFIXES)} files, not {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() in (".npy", ".npz"):
        items = _load_numpy(path)
    else:
        obj = _load_torch(path)
        if isinstance(obj, torch.Tensor):
            items = {None: obj}
        elif isinstance(obj, dict):
            items = {str(k): v for k, v in obj.items()}
        elif isinstance(obj, (list, tuple)):
            items = {str(i): v for i, v in enumerate(obj)}
        else:
            raise UserError(f"{path}: holds a {type(obj).__name__}; save a tensor or a dict of tensors")
    if not items:
        raise UserError(f"{path}: holds no tensors")
    return [_as_case(path, k, v) for k, v in items.items()]
