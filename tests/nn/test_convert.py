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


def _tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_convert_reuses_the_parameter_and_buffer_objects():
    torch.manual_seed(0)
    frozen, mixed, train = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, momentum=None, eps=1e-3), torch.nn.BatchNorm1d(3)
    model = torch.nn.Sequential(frozen, mixed, torch.nn.Sequential(train))
    for _ in range(2):
        frozen(torch.randn(8, 4, 3, 3)), mixed(torch.randn(8, 4, 3, 3)), train(torch.randn(8, 3))
    frozen.requires_grad_(False).eval()
    mixed.weight.requires_grad_(False)  # weight frozen, bias trained
    before = _tensors(model)
    convert(model, p=1)
    assert isinstance(model[0], LpBatchNorm2d) and isinstance(model[1], LpBatchNorm2d) and isinstance(model[2][0], LpBatchNorm1d)
    after = _tensors(model)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)  # the same objects: nothing copied
    assert [m.weight.requires_grad for m in (model[0], model[1], model[2][0])] == [False, False, True]
    assert [m.bias.requires_grad for m in (model[0], model[1], model[2][0])] == [False, True, True]
    assert [m.training for m in (model[0], model[1], model[2][0])] == [False, True, True]
    assert model[1].momentum is None and model[1].eps == 1e-3 and int(model[1].num_batches_tracked) == 2


def test_an_optimizer_built_before_convert_keeps_training_the_new_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 6, 6)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    convert(model, p=1)
    weight = model[1].weight.detach().clone()
    assert any(q is model[1].weight for q in opt.param_groups[0]["params"])
    assert opt.state[model[1].weight]["momentum_buffer"] is not None  # its state is kept too
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(model[1].weight.detach(), weight)


def test_convert_continues_momentum_none_and_num_batches_tracked():
    import copy

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4, momentum=None)
    for _ in range(3):
        bn(torch.randn(8, 4, 3, 3))
    ref = copy.deepcopy(bn)
    new = convert(bn, p=2)
    x = torch.randn(8, 4, 3, 3) * 3 + 1
    torch.testing.assert_close(new(x), ref(x))  # p=2 in train mode is torch's BatchNorm
    assert int(new.num_batches_tracked) == 4
    torch.testing.assert_close(new.running_mean, ref.running_mean)
    torch.testing.assert_close(new.running_var, ref.running_var)


def test_convert_without_parameters_or_buffers():
    bn = torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    model = torch.nn.Sequential(bn)
    x = torch.randn(4, 3, 5, 5)
    before = model.eval()(x)
    convert(model, p=2)
    new = model[0]
    assert isinstance(new, LpBatchNorm2d) and not new.training
    assert new.weight is None and new.bias is None and new.running_mean is None and new.num_batches_tracked is None
    assert list(new.parameters()) == [] and list(new.buffers()) == []
    torch.testing.assert_close(model(x), before)  # batch statistics in eval mode, as torch


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_convert_keeps_dtype_and_eval_outputs(dtype):
    model = _trained_model().to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    before = model(x)
    convert(model, p=1)
    assert all(t.dtype == dtype and t.device.type == "cpu" for name, t in _tensors(model).items() if "num_batches" not in name)
    torch.testing.assert_close(model(x), before)


def test_convert_a_model_on_the_meta_device():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, device="meta"))
    convert(model, p=1)
    assert isinstance(model[0], LpBatchNorm2d) and all(t.is_meta for t in _tensors(model).values())


def test_state_dict_keys_stay_torchs_and_load_both_ways():
    import copy

    model = _trained_model()
    torch_copy = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    keys = list(model.state_dict())
    convert(model, p=math.inf, k=3)
    assert list(model.state_dict()) == keys
    fresh = copy.deepcopy(torch_copy)
    for m in fresh.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(m.weight, 5.0)
    fresh.load_state_dict(model.state_dict())  # Lp -> torch
    torch.testing.assert_close(fresh(x), torch_copy(x))
    back = convert(copy.deepcopy(torch_copy), p=1)
    back.load_state_dict(fresh.state_dict())  # torch -> Lp
    torch.testing.assert_close(back(x), torch_copy(x))


def test_a_shared_batch_norm_stays_shared():
    bn = torch.nn.BatchNorm1d(3)
    model = torch.nn.Sequential(bn, torch.nn.ReLU(), bn, torch.nn.Sequential(bn))
    convert(model, p=1)
    assert isinstance(model[0], LpBatchNorm1d) and model[0] is model[2] is model[3][0]


class _MyBatchNorm(torch.nn.BatchNorm2d):
    pass


class _MyLpBatchNorm(LpBatchNorm2d):
    pass


class _FrozenBatchNorm2d(torch.nn.Module):  # as torchvision's: buffers only, not a torch norm layer
    def __init__(self, n):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.ones(n))

    def forward(self, x):
        return x


def test_frozen_batch_norms_are_left_as_they_are():
    """torchvision's FrozenBatchNorm2d (buffers only, not a torch norm layer) always normalizes by
    its stored statistics, eval's formula for every p: convert leaves it, and converts the rest."""
    frozen = _FrozenBatchNorm2d(4)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), frozen)
    convert(model, p=1)
    assert model[1] is frozen and isinstance(model[0], LpBatchNorm2d)


def _parametrized_bn():
    class Twice(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    bn = torch.nn.BatchNorm2d(4)
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", Twice())
    return bn


def _weight_normed_bn():
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(torch.nn.BatchNorm2d(4), dim=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: torch.nn.SyncBatchNorm(4), "cannot convert SyncBatchNorm at '2'"),
        (lambda: _MyBatchNorm(4), "cannot convert _MyBatchNorm at '2'"),
        (lambda: _MyLpBatchNorm(4), "cannot convert _MyLpBatchNorm at '2'"),
        (lambda: torch.nn.LazyBatchNorm2d(), "LazyBatchNorm2d is not initialized yet"),
        (_parametrized_bn, "BatchNorm2d has parametrizations"),
        (_weight_normed_bn, "extra parameters or buffers weight_g, weight_v"),
    ],
)
def test_a_failed_convert_changes_nothing(bad, message):
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1), bad(), torch.nn.BatchNorm2d(4))
    modules, tensors = list(model.modules()), _tensors(model)
    with pytest.raises(ValueError, match=message) as err:
        convert(model, p=1)
    assert "\n" not in str(err.value) and "not changed" in str(err.value)
    assert all(a is b for a, b in zip(model.modules(), modules)) and len(list(model.modules())) == len(modules)
    assert type(model[0]) is torch.nn.BatchNorm2d and type(model[3]) is torch.nn.BatchNorm2d
    assert all(t is tensors[name] for name, t in _tensors(model).items())


def test_a_failed_convert_names_every_refused_layer():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.SyncBatchNorm(4), _MyBatchNorm(4)))
    with pytest.raises(ValueError, match=r"SyncBatchNorm at '1\.0'; _MyBatchNorm at '1\.1'"):
        convert(model, p=1)
    assert type(model[0]) is torch.nn.BatchNorm2d


@pytest.mark.parametrize(
    "kwargs, message",
    [({"p": 3}, "p must be"), ({"p": 2, "k": 4}, "k .top-k. goes only with"), ({"p": math.inf, "k": 0}, "k must be"),
     ({"p": 1, "impl": "bogus"}, "impl must be")],
)
def test_invalid_p_k_impl_change_nothing(kwargs, message):
    model = _trained_model()
    modules = list(model.modules())
    with pytest.raises(ValueError, match=f"convert: {message}"):
        convert(model, **kwargs)
    assert all(a is b for a, b in zip(model.modules(), modules))


def test_instance_norms_are_left_alone():
    model = torch.nn.Sequential(torch.nn.InstanceNorm2d(3, track_running_stats=True), torch.nn.BatchNorm2d(3))
    inorm = model[0]
    convert(model, p=1)
    assert model[0] is inorm and isinstance(model[1], LpBatchNorm2d)


def test_hooks_are_not_carried_over_and_a_warning_says_so():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match="hooks registered on '0' are not carried over"):
        convert(model, p=1)
    model(torch.randn(2, 3, 4, 4))
    assert calls == []
