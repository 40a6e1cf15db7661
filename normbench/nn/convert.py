"""Replace the batch-norms of a model by Lp batch-norms, keeping eval outputs unchanged."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.kernels.reference import check_pk
from normbench.nn.functional import IMPLS
from normbench.nn.modules import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

# exactly these classes (not subclasses) are converted, each to the Lp batch-norm of its rank
_TARGET: dict[type, type] = {
    nn.BatchNorm1d: LpBatchNorm1d,
    nn.BatchNorm2d: LpBatchNorm2d,
    nn.BatchNorm3d: LpBatchNorm3d,
    LpBatchNorm1d: LpBatchNorm1d,
    LpBatchNorm2d: LpBatchNorm2d,
    LpBatchNorm3d: LpBatchNorm3d,
}


def is_convertible(module: nn.Module) -> bool:
    """Whether :func:`convert` swaps this module (its exact class is one of torch's BatchNorm1d/2d/3d
    or normbench's LpBatchNorm1d/2d/3d)."""
    return type(module) in _TARGET


_PARAMETERS = ("weight", "bias")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_HOOKS = (
    "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
    "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_HANDLED = "torch.nn.BatchNorm1d/2d/3d and normbench's LpBatchNorm1d/2d/3d, exactly (not subclasses)"


def _why_not(m: nn.Module) -> str | None:
    """Why the batch-norm ``m`` cannot be converted, or None when it can."""
    name = type(m).__name__
    if torch.nn.utils.parametrize.is_parametrized(m):
        return f"{name.removeprefix('Parametrized')} has parametrizations (remove them first: torch.nn.utils.parametrize.remove_parametrizations)"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return f"{name} is not initialized yet (run one forward pass first)"
    if type(m) not in _TARGET:
        return name
    extra = sorted(set(m._parameters) - set(_PARAMETERS)) + sorted(set(m._buffers) - set(_BUFFERS))
    if extra:  # e.g. torch.nn.utils.weight_norm's weight_g / weight_v and its forward pre-hook
        return f"{name} with extra parameters or buffers {', '.join(extra)}"
    return None


def _converted(bn: _BatchNorm, p: float, k: int | None, impl: str) -> nn.Module:
    """The Lp batch-norm of ``bn``'s rank holding ``bn``'s own parameter and buffer objects."""
    new = _TARGET[type(bn)](
        bn.num_features, p=p, k=k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device="meta", impl=impl,
    )
    for name in _PARAMETERS:
        new._parameters[name] = bn._parameters.get(name)
    for name in _BUFFERS:
        new._buffers[name] = bn._buffers.get(name)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set) & set(_BUFFERS)
    new.training = bn.training
    return new


def convert(model: nn.Module, p: float = 2, k: int | None = None, impl: str = "auto") -> nn.Module:
    """Replace every torch ``BatchNorm1d/2d/3d`` and every ``LpBatchNorm1d/2d/3d`` in ``model`` by
    an ``LpBatchNorm*`` of the same rank with this ``p``, ``k`` and ``impl``, in place. Returns
    ``model``, or the new layer when ``model`` itself is a batch-norm (a module cannot replace
    itself). Convert before wrapping (DDP, DataParallel) and before ``torch.compile`` or
    ``torch.jit.script`` (scripted batch-norms are refused).
    An optimizer may be built before or after (see below).

    **The new layer reuses the old layer's tensors**: the same ``nn.Parameter`` objects for
    ``weight`` and ``bias`` and the same buffer tensors ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (nothing is copied). So ``requires_grad`` (a frozen batch-norm stays
    frozen), device, dtype, ``momentum`` (also None), ``eps``, ``affine``,
    ``track_running_stats``, the train/eval flag and the running statistics carry over, eval
    outputs do not change, and an optimizer built earlier still holds the live parameters (and
    its state for them). The old layer, if you keep a reference to it, shares these tensors:
    do not use it. ``state_dict`` keys stay torch's, so a checkpoint of the converted model
    loads into the original torch model and back.

    **Not carried over** (they belong to the old module object): hooks registered on the old
    layer (forward, forward pre-, backward, state_dict and load_state_dict hooks: a warning names
    the layers that had some; hooks on the enclosing modules stay), attributes you set on it, a
    patched ``forward``, and its ``impl`` (the argument's is used). Refused, with nothing
    changed: a layer with parametrizations (``torch.nn.utils.parametrize``) or extra parameters
    or buffers (the deprecated ``torch.nn.utils.weight_norm``), subclasses of these classes, other
    batch-norms (``SyncBatchNorm``, an uninitialized ``LazyBatchNorm*``; materialized lazy
    layers are plain ``BatchNorm*d``). Left as they are: instance-norms, and modules that keep
    batch-norm statistics without being torch batch-norms (torchvision's ``FrozenBatchNorm2d``):
    they always normalize by their stored statistics, which is eval mode's formula for every p,
    so converting them would change nothing.

    The whole model, ``p``, ``k`` and ``impl`` are checked first: on a ``ValueError`` the model
    is unchanged. A batch-norm registered at several places stays one shared layer.
    """
    try:
        p, k = check_pk(p, k)
    except ValueError as err:
        raise ValueError(f"convert: {err}") from None
    if impl not in IMPLS:
        raise ValueError(f"convert: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    modules = dict(model.named_modules())
    refused = [
        f"{why} at {name!r}" if name else f"{why} (the model itself)"
        for name, m in modules.items()
        if isinstance(m, _BatchNorm) and (why := _why_not(m)) is not None
    ]
    if refused:
        raise ValueError(f"convert: cannot convert {'; '.join(refused)}. It converts {_HANDLED}; the model was not changed")
    hooked = [repr(name) if name else "the model itself" for name, m in modules.items()
              if type(m) in _TARGET and any(getattr(m, h, None) for h in _HOOKS)]
    if hooked:
        warnings.warn(f"convert: the hooks registered on {', '.join(hooked)} are not carried over to the new layers",
                      stacklevel=2)

    if type(model) in _TARGET:
        return _converted(model, p, k, impl)
    new: dict[int, nn.Module] = {}  # by id of the old layer: one new layer per old one, however often registered
    for parent in list(modules.values()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in _TARGET:
                if id(child) not in new:
                    new[id(child)] = _converted(child, p, k, impl)
                parent._modules[name] = new[id(child)]
    return model
