"""Resolving MODEL arguments and loading weights safely."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from normdeploy.errors import ModelSpecError, WeightsError
from normdeploy.modelspec import (
    reference_models_dir,
    reference_registry,
    resolve_model,
)

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


ROOT = Path(__file__).resolve().parents[1]


def test_factory_imports_from_the_current_directory(tmp_path, monkeypatch):
    """As ``python -m`` would: the current directory is importable, without touching sys.path
    for good."""
    (tmp_path / "cwd_zoo.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert str(tmp_path) not in before
    rm = resolve_model("cwd_zoo:net", input_shapes=[(1, 3, 8, 8)])
    assert isinstance(rm.module[1], nn.BatchNorm2d)
    assert sys.path == before


def test_reference_names_come_from_our_models_whatever_is_on_the_path(tmp_path, monkeypatch):
    """A user's own package named ``models``, first on sys.path and in the current directory,
    neither replaces ours nor gets imported by the lookup."""
    theirs = tmp_path / "models"
    theirs.mkdir()
    (theirs / "__init__.py").write_text(
        "raise RuntimeError('the user models were imported')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    rm = resolve_model("conv_bn_relu")
    assert rm.example_inputs[0].shape == (1, 3, 32, 32)
    assert Path(reference_registry().__file__) == ROOT / "models" / "__init__.py"
    assert "models" not in sys.modules


def test_user_packages_named_models_and_cli_are_theirs_from_the_checkouts_cli(tmp_path):
    """``python /checkout/cli.py`` puts the checkout first on sys.path; a factory that imports
    the user's own ``models`` and ``cli`` still gets theirs, and reference names still ours."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("WIDTH = 5\n")
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "__init__.py").write_text("CHANNELS = 3\n")
    (tmp_path / "userzoo.py").write_text(
        textwrap.dedent(
            """
            import cli
            import models
            from torch import nn

            def net():
                return nn.Sequential(
                    nn.Conv2d(cli.CHANNELS, models.WIDTH, 3), nn.BatchNorm2d(models.WIDTH)
                )
            """
        )
    )
    run = [sys.executable, str(ROOT / "cli.py")]
    exported = subprocess.run(
        [*run, "export", "userzoo:net", "-o", "user.onnx", "--input-shape", "1x3x8x8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "user.onnx").is_file()
    listed = subprocess.run(
        [*run, "models", "--format", "json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "conv_bn_relu" in [m["name"] for m in json.loads(listed.stdout)["models"]]


def test_an_installation_without_the_checkout_has_no_reference_models(tmp_path):
    """The package alone, as a wheel installs it (no models/ or pyproject.toml beside it), is
    recognised as such; a stray top-level models/ package next to it is not taken for ours."""
    shutil.copytree(ROOT / "normdeploy", tmp_path / "site" / "normdeploy")
    (tmp_path / "site" / "models").mkdir()
    (tmp_path / "site" / "models" / "__init__.py").write_text("")
    code = (
        "import sys; sys.path.insert(0, 'site'); "
        "from normdeploy.modelspec import reference_models_dir; print(reference_models_dir())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"
    assert reference_models_dir() == ROOT / "models"  # this checkout has them
