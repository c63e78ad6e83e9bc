"""Resolving MODEL arguments and loading weights safely."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch
from torch import nn

from normdeploy.errors import InvalidArgumentError, ModelSpecError, WeightsError
from normdeploy.modelspec import parse_shape, resolve_model

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def net_with_inputs():
        return net(), torch.zeros(1, 3, 8, 8)

    def broken():
        raise RuntimeError("boom")

    def not_a_module():
        return 42

    VALUE = 3
    """
)


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "userzoo.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_reference_name_resolves_in_eval_mode():
    rm = resolve_model("conv_bn_relu")
    assert isinstance(rm.module, nn.Module) and not rm.module.training
    assert rm.example_inputs[0].shape == (1, 3, 32, 32)


def test_import_path_with_and_without_inputs(user_pkg):
    rm = resolve_model("userzoo:net_with_inputs")
    assert rm.example_inputs[0].shape == (1, 3, 8, 8)
    with pytest.raises(ModelSpecError, match=r"give input_shapes=1x3x224x224"):
        resolve_model("userzoo:net")
    rm = resolve_model("userzoo:net", input_shapes=[(2, 3, 8, 8)])
    assert rm.example_inputs[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_model", "unknown reference model 'no_such_model'"),
        ("nosuchpkg_xyz:net", "cannot import module 'nosuchpkg_xyz'"),
        ("userzoo:missing", "has no attribute 'missing'"),
        ("userzoo:broken", "factory raised RuntimeError: boom"),
        ("userzoo:not_a_module", "returned int, not a torch.nn.Module"),
        ("userzoo:VALUE", "is not callable"),
        ("model.onnx", "expected a PyTorch model"),
    ],
)
def test_bad_model_specs_give_one_line(user_pkg, spec, message):
    with pytest.raises(ModelSpecError, match=message) as info:
        resolve_model(spec)
    assert "\n" not in str(info.value)


def test_weights_load_strictly_and_safely(user_pkg, tmp_path):
    rm = resolve_model("userzoo:net_with_inputs")
    good = tmp_path / "good.pt"
    state = {k: v + 1 for k, v in rm.module.state_dict().items()}
    torch.save(state, good)
    loaded = resolve_model("userzoo:net_with_inputs", weights=good)
    torch.testing.assert_close(loaded.module[0].weight, state["0.weight"])

    wrong_keys = tmp_path / "keys.pt"
    torch.save({"other.weight": torch.zeros(1)}, wrong_keys)
    with pytest.raises(WeightsError, match=r"missing .* unexpected"):
        resolve_model("userzoo:net_with_inputs", weights=wrong_keys)

    wrong_shape = tmp_path / "shape.pt"
    bad = dict(state)
    bad["0.weight"] = torch.zeros(2, 2)
    torch.save(bad, wrong_shape)
    with pytest.raises(WeightsError, match="shape"):
        resolve_model("userzoo:net_with_inputs", weights=wrong_shape)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(user_pkg, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"0.weight": _Evil()}, f)
    with pytest.raises(WeightsError, match=r"refused|cannot load"):
        resolve_model("userzoo:net_with_inputs", weights=evil)
    assert "pwned" not in capsys.readouterr().out


def test_parse_shape():
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("1xax3", "0x3", ""):
        with pytest.raises(InvalidArgumentError):
            parse_shape(bad)
