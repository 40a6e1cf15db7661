import math

import pytest
import torch

from normbench.nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, convert


def _trained_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5),
    )
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("p,k", [(1, None), (2, None), (math.inf, None), (math.inf, 4)])
def test_convert_keeps_eval_outputs(p, k):
    model = _trained_model()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    convert(model, p=p, k=k)
    assert isinstance(model[1], LpBatchNorm2d) and isinstance(model[3][1], LpBatchNorm2d)
    assert isinstance(model[6], LpBatchNorm1d)
    assert all(m.p == float(p) and m.k == k for m in model.modules() if isinstance(m, LpBatchNorm2d))
    assert not model[1].training
    torch.testing.assert_close(model(x), before)
    # and back again, from Lp to another p
    convert(model, p=2)
    torch.testing.assert_close(model(x), before)


def test_convert_a_single_layer_and_3d():
    bn = torch.nn.BatchNorm3d(2)
    new = convert(bn, p=1)
    assert isinstance(new, LpBatchNorm3d) and new.p == 1.0


def test_convert_refuses_unknown_batchnorm():
    with pytest.raises(ValueError, match="cannot convert SyncBatchNorm"):
        convert(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)), p=1)
