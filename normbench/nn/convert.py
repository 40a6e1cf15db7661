"""Replace the batch-norms of a model by Lp batch-norms, keeping eval outputs unchanged."""

from __future__ import annotations

from torch import nn

from normbench.nn.modules import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

_TARGET = {
    nn.BatchNorm1d: LpBatchNorm1d,
    nn.BatchNorm2d: LpBatchNorm2d,
    nn.BatchNorm3d: LpBatchNorm3d,
    LpBatchNorm1d: LpBatchNorm1d,
    LpBatchNorm2d: LpBatchNorm2d,
    LpBatchNorm3d: LpBatchNorm3d,
}


def _converted(bn: nn.Module, p: float, k: int | None, impl: str) -> nn.Module:
    target = next((new for old, new in _TARGET.items() if type(bn) is old), None)
    if target is None:
        raise ValueError(f"convert: cannot convert {type(bn).__name__}; it handles torch.nn.BatchNorm1d/2d/3d and LpBatchNorm1d/2d/3d")
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    new = target(
        bn.num_features, p=p, k=k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype, impl=impl,
    )
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new


def convert(model: nn.Module, p: float = 2, k: int | None = None, impl: str = "auto") -> nn.Module:
    """Replace every torch ``BatchNorm1d/2d/3d`` and every ``LpBatchNorm*`` in ``model`` by an
    ``LpBatchNorm*`` of the same rank with this ``p`` and ``k``, in place.

    Affine parameters, running statistics and the train/eval flag carry over, so eval outputs do
    not change. Returns the model (or the new layer, when ``model`` itself is a batch-norm).
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _converted(model, p, k, impl)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _converted(child, p, k, impl))
        else:
            convert(child, p, k, impl)
    return model
