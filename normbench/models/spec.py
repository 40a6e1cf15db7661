"""Naming a model on the command line (``--model SPEC``) and building it.

Forms of ``SPEC``:

``path/to/file.py:factory``
    a Python file of the user's; ``factory`` is called with no arguments and returns an
    ``nn.Module`` (a module-level ``nn.Module`` instance is taken as it is). The file's folder is
    on ``sys.path`` while it is imported, so it may import its neighbours.
``package.module:factory``
    the same from an importable module (the current folder is importable, as with ``python -m``).
``torchvision:NAME`` / ``timm:NAME``
    ``torchvision.models.NAME()`` / ``timm.create_model(NAME)``, randomly initialized (give
    trained weights with ``--weights``); a one-line error naming the package when it is not
    installed. Neither is a dependency of normbench (the ``normbench[models]`` extra names them).
``builtin:NAME``
    one of the small models in :mod:`normbench.models.builtins`, which run offline.

Every failure (a missing file, module or name, a factory that raises or returns something other
than a module, an unreadable weights file) is a :class:`~normbench.errors.UserError`: one line, exit
code 2 on the command line.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from normbench.errors import UserError

FORMS = "path/file.py:factory, package.module:factory, torchvision:NAME, timm:NAME or builtin:NAME"
# the input shape a model of a hub package usually takes, when neither --input-shape nor
# --model-input is given
HUB_INPUT_SHAPE = (8, 3, 224, 224)


@dataclass
class LoadedModel:
    """A built model and what is known about its input: ``input_shape`` the default shape of a
    Gaussian input (None: the user must give one)."""

    spec: str
    module: nn.Module
    input_shape: tuple[int, ...] | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _on_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration (then removed again if we added it)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise UserError(f"--model {spec}: no such file {str(path)!r}")
    name = f"normbench_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--model {spec}: {str(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    with _on_path(str(path.resolve().parent)):
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code: any failure is theirs, in one line
            raise UserError(f"--model {spec}: importing {path.name} raised {_first_line(exc)}") from None
    return module


def _import_module(name: str, spec: str) -> Any:
    with _on_path(os.getcwd()):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or name
            raise UserError(f"--model {spec}: no module named {missing!r} (installed? or run from the folder that "
                            f"holds it)") from None
        except Exception as exc:  # noqa: BLE001 - the user's code
            raise UserError(f"--model {spec}: importing {name} raised {_first_line(exc)}") from None


def _package(name: str, spec: str) -> Any:
    """An optional package (torchvision, timm): a one-line error naming it when it is missing or
    does not import."""
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == top:
            raise UserError(f"--model {spec}: needs the {top} package, which is not installed "
                            f"(install it, or normbench[models])") from None
        raise UserError(f"--model {spec}: {top} is installed but does not import ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. torchvision built for another torch
        raise UserError(f"--model {spec}: {top} is installed but does not import ({_first_line(exc)})") from None


def _call(factory: Callable[[], Any], spec: str, what: str) -> nn.Module:
    try:
        model = factory()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory: one line
        raise UserError(f"--model {spec}: {what} raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: {what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_object(owner: Any, attr: str, spec: str, where: str) -> nn.Module:
    if not attr.isidentifier():
        raise UserError(f"--model {spec}: {attr!r} is not a Python name")
    if not hasattr(owner, attr):
        names = sorted(n for n in vars(owner) if not n.startswith("_") and callable(getattr(owner, n, None)))
        hint = f" (it defines {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})" if names else ""
        raise UserError(f"--model {spec}: {where} has no {attr!r}{hint}")
    obj = getattr(owner, attr)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UserError(f"--model {spec}: {where}.{attr} is a {type(obj).__name__}, not a callable returning a model")
    return _call(obj, spec, f"{attr}()")


def _torchvision(name: str, spec: str) -> nn.Module:
    models = _package("torchvision.models", spec)
    factory = getattr(models, name, None)
    if callable(factory):
        return _call(factory, spec, f"torchvision.models.{name}()")
    get_model = getattr(models, "get_model", None)
    if callable(get_model):
        return _call(lambda: get_model(name), spec, f"torchvision.models.get_model({name!r})")
    raise UserError(f"--model {spec}: torchvision has no model {name!r} (torchvision.models.list_models() lists them)")


def _timm(name: str, spec: str) -> nn.Module:
    timm = _package("timm", spec)
    return _call(lambda: timm.create_model(name, pretrained=False), spec, f"timm.create_model({name!r})")


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def load_model(spec: str) -> LoadedModel:
    """Build the model that ``spec`` names (see the module docstring for the forms)."""
    from normbench.models import builtins

    text = spec.strip()
    target, sep, attr = text.rpartition(":")
    if not sep or not target or not attr:
        raise UserError(f"--model {spec!r}: name a model as {FORMS}")
    if target == "builtin":
        return LoadedModel(text, builtins.build(attr), builtins.input_shape(attr))
    if target == "torchvision":
        return LoadedModel(text, _torchvision(attr, text), HUB_INPUT_SHAPE)
    if target == "timm":
        return LoadedModel(text, _timm(attr, text), HUB_INPUT_SHAPE)
    if _is_path(target):
        path = Path(target).expanduser()
        return LoadedModel(text, _from_object(_import_file(path, text), attr, text, path.name))
    if not all(part.isidentifier() for part in target.split(".")):
        raise UserError(f"--model {spec!r}: {target!r} is neither a .py file nor a module name; name a model as {FORMS}")
    return LoadedModel(text, _from_object(_import_module(target, text), attr, text, target))


def load_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a state_dict file into ``model`` (``torch.load(weights_only=True)``: no code is ever
    unpickled). A file holding ``{"state_dict": {...}}`` or ``{"model": {...}}`` is unwrapped.
    Returns the notes worth showing (none when every key matched)."""
    from normbench.numerics.inputs import load_torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--weights {p}: no such file")
    obj = load_torch(p)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--weights {p}: holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    try:
        result = model.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else ""
        raise UserError(f"--weights {p}: does not fit the model ({detail[:300]})") from None
    return [str(result)] if result.missing_keys or result.unexpected_keys else []
