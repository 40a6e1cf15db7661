"""Naming a model (normbench.models.spec): every --model form, the optional hub packages through
stand-in modules (the real torchvision does not import beside this torch build), weights files,
and each error as one UserError."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from normbench.errors import UserError
from normbench.models import builtins, load_model, load_weights

FACTORY_FILE = """
import torch
from torch import nn

def factory():
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))

def broken():
    raise RuntimeError("the user's bug")

def not_a_model():
    return 42

INSTANCE = nn.BatchNorm1d(3)
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(FACTORY_FILE)
    return path


def test_file_form_calls_the_factory(user_file):
    loaded = load_model(f"{user_file}:factory")
    assert isinstance(loaded.module, nn.Sequential)
    assert isinstance(loaded.module[1], nn.LayerNorm)
    assert loaded.input_shape is None  # the user must give the input


def test_file_form_takes_a_module_instance(user_file):
    assert isinstance(load_model(f"{user_file}:INSTANCE").module, nn.BatchNorm1d)


def test_file_form_may_import_its_neighbours(tmp_path):
    (tmp_path / "helper_mod_for_spec_test.py").write_text("WIDTH = 5\n")
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn
        import helper_mod_for_spec_test as h
        def make():
            return nn.LayerNorm(h.WIDTH)
    """))
    assert load_model(f"{tmp_path / 'net.py'}:make").module.normalized_shape == (5,)
    assert str(tmp_path) not in sys.path  # the folder was on the path only while importing


@pytest.mark.parametrize("attr, words", [
    ("missing", ["has no 'missing'", "factory"]),
    ("broken", ["broken() raised RuntimeError: the user's bug"]),
    ("not_a_model", ["returned a int, not a torch.nn.Module"]),
])
def test_file_form_errors(user_file, attr, words):
    with pytest.raises(UserError) as info:
        load_model(f"{user_file}:{attr}")
    text = str(info.value)
    assert "\n" not in text
    for w in words:
        assert w in text


def test_missing_file_and_a_file_that_fails_to_import(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_model(f"{tmp_path / 'nope.py'}:f")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n")
    with pytest.raises(UserError, match="importing bad.py raised SyntaxError"):
        load_model(f"{bad}:f")


def test_module_form_imports_from_the_current_folder(tmp_path, monkeypatch):
    pkg = tmp_path / "spec_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("from torch import nn\ndef tiny():\n    return nn.GroupNorm(2, 4)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "spec_test_pkg", raising=False)
    monkeypatch.delitem(sys.modules, "spec_test_pkg.nets", raising=False)
    assert isinstance(load_model("spec_test_pkg.nets:tiny").module, nn.GroupNorm)
    with pytest.raises(UserError, match="no module named 'spec_test_pkg.nope'"):
        load_model("spec_test_pkg.nope:tiny")


@pytest.mark.parametrize("spec", ["resnet50", "torchvision", ":f", "builtin:", "a b:c", "x.py:not-a-name"])
def test_malformed_specs(spec):
    with pytest.raises(UserError) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_builtin_form_and_unknown_builtin():
    loaded = load_model("builtin:resnet")
    assert isinstance(loaded.module, builtins.SmallResNet)
    assert loaded.input_shape == builtins.input_shape("resnet")
    with pytest.raises(UserError, match="builtin:cnn, builtin:resnet, builtin:transformer"):
        load_model("builtin:vgg")


def _stand_in_torchvision(monkeypatch):
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.tinynet = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_torchvision_names_go_through_torchvision_models(monkeypatch):
    _stand_in_torchvision(monkeypatch)
    loaded = load_model("torchvision:tinynet")
    assert isinstance(loaded.module[1], nn.BatchNorm2d)
    assert loaded.input_shape == (8, 3, 224, 224)
    with pytest.raises(UserError, match="torchvision has no model 'nonet'"):
        load_model("torchvision:nonet")


def test_timm_names_go_through_create_model(monkeypatch):
    timm = types.ModuleType("timm")
    calls = []

    def create_model(name, pretrained=False):
        calls.append((name, pretrained))
        if name != "tiny_vit":
            raise RuntimeError(f"Unknown model ({name})")
        return nn.LayerNorm(8)

    timm.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", timm)
    assert isinstance(load_model("timm:tiny_vit").module, nn.LayerNorm)
    assert calls == [("tiny_vit", False)]
    with pytest.raises(UserError, match=r"create_model\('nope'\) raised RuntimeError: Unknown model"):
        load_model("timm:nope")


@pytest.mark.parametrize("package, spec", [("torchvision", "torchvision:resnet50"), ("timm", "timm:convnext_tiny")])
def test_missing_package_is_one_line_naming_it(monkeypatch, package, spec):
    monkeypatch.setitem(sys.modules, package, None)  # import of it now fails as if it were absent
    monkeypatch.delitem(sys.modules, f"{package}.models", raising=False)
    with pytest.raises(UserError) as info:
        load_model(spec)
    text = str(info.value)
    assert f"needs the {package} package, which is not installed" in text and "\n" not in text


def test_package_that_does_not_import(monkeypatch, tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(UserError, match="torchvision is installed but does not import .*nms does not exist"):
        load_model("torchvision:resnet18")


def test_weights_load_a_state_dict(tmp_path):
    source = builtins.build("resnet")
    with torch.no_grad():
        source.bn1.weight.fill_(3.0)
        source.bn1.running_var.fill_(7.0)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    target = builtins.build("resnet")
    assert load_weights(target, path) == []
    assert torch.equal(target.bn1.weight, torch.full((16,), 3.0))
    assert torch.equal(target.bn1.running_var, torch.full((16,), 7.0))


class Payload:
    """Something only an unpickler that runs code could rebuild."""


def test_weights_refuse_pickled_code_and_misfits(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(UserError, match="refused: loading it needs unpickling of code"):
        load_weights(builtins.build("resnet"), evil)
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(UserError, match="does not fit the model"):
        load_weights(builtins.build("resnet"), other)
    with pytest.raises(UserError, match="no such file"):
        load_weights(builtins.build("resnet"), tmp_path / "none.pt")
    tensor = tmp_path / "t.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(UserError, match="not a state_dict"):
        load_weights(builtins.build("resnet"), tensor)
