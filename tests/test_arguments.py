"""The public functions fail like the CLI: a wrong argument type is a typed one-line error naming
the parameter (normdeploy/arguments.py), never a raw TypeError/AttributeError; and every function
that reads a model takes the same kinds (path as str or Path, ModelProto, bytes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from fold_support import conv_bn_model
from torch import nn

import normdeploy
from normdeploy.errors import InvalidArgumentError, InvalidModelError, NormdeployError
from normdeploy.folding import fold_bn_file
from normdeploy.verification.compare import Tolerance


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("args")
    onnx.save_model(conv_bn_model(), str(d / "in.onnx"))
    return d


def _module() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()


X = torch.zeros(1, 3, 8, 8)
M = _module()

# (id, call taking the fixture folder, the parameter the message must start with)
WRONG: list[tuple[str, Callable[[Path], object], str]] = [
    ("fold_bn-None", lambda d: normdeploy.fold_bn(None), "model"),
    ("fold_bn-int", lambda d: normdeploy.fold_bn(123), "model"),
    ("fold_bn-module", lambda d: normdeploy.fold_bn(M), "model"),
    ("fold_bn-garbage-bytes", lambda d: normdeploy.fold_bn(b"garbage"), "model"),
    ("fold_bn-verify-str", lambda d: normdeploy.fold_bn(d / "in.onnx", verify="no"), "verify"),
    ("fold_bn-inplace-int", lambda d: normdeploy.fold_bn(d / "in.onnx", inplace=1), "inplace"),
    ("fold_bn-seed-str", lambda d: normdeploy.fold_bn(d / "in.onnx", seed="0"), "seed"),
    ("fold_bn_file-input-None", lambda d: fold_bn_file(None, d / "o.onnx"), "input_path"),
    ("fold_bn_file-output-None", lambda d: fold_bn_file(d / "in.onnx", None), "output_path"),
    ("fold_bn_file-output-int", lambda d: fold_bn_file(d / "in.onnx", 5), "output_path"),
    (
        "fold_bn_file-overwrite-str",
        lambda d: fold_bn_file(d / "in.onnx", d / "o.onnx", overwrite="yes"),
        "overwrite",
    ),
    (
        "fold_bn_file-keep_failed-int",
        lambda d: fold_bn_file(d / "in.onnx", d / "o.onnx", keep_failed=1),
        "keep_failed",
    ),
    ("inspect-None", lambda d: normdeploy.inspect(None), "model_or_path"),
    ("inspect-float", lambda d: normdeploy.inspect(3.5), "model_or_path"),
    ("inspect-module-str", lambda d: normdeploy.inspect(d / "in.onnx", module="x"), "module"),
    (
        "inspect-example_inputs-int",
        lambda d: normdeploy.inspect(d / "in.onnx", module=M, example_inputs=5),
        "example_inputs",
    ),
    ("inspect-seed-None", lambda d: normdeploy.inspect(d / "in.onnx", seed=None), "seed"),
    ("verify-model-None", lambda d: normdeploy.verify(M, None), "ONNX model"),
    ("verify-reference-None", lambda d: normdeploy.verify(None, d / "in.onnx"), "reference"),
    (
        "verify-batch_sizes-int",
        lambda d: normdeploy.verify(M, d / "in.onnx", batch_sizes=3),
        "batch_sizes",
    ),
    (
        "verify-batch_sizes-str",
        lambda d: normdeploy.verify(M, d / "in.onnx", batch_sizes="1,3"),
        "batch_sizes",
    ),
    (
        "verify-providers-int-entry",
        lambda d: normdeploy.verify(M, d / "in.onnx", providers=["cpu", 5]),
        "providers",
    ),
    (
        "verify-providers-int",
        lambda d: normdeploy.verify(M, d / "in.onnx", providers=5),
        "providers",
    ),
    ("verify-inputs-int", lambda d: normdeploy.verify(M, d / "in.onnx", inputs=5), "inputs"),
    (
        "verify-tolerance-float",
        lambda d: normdeploy.verify(M, d / "in.onnx", tolerance=0.1),
        "tolerance",
    ),
    ("verify-atol-str", lambda d: normdeploy.verify(M, d / "in.onnx", atol="x"), "atol"),
    (
        "verify-bisect-str",
        lambda d: normdeploy.verify(M, d / "in.onnx", bisect="no"),
        "bisect",
    ),
    (
        "verify-weights-int",
        lambda d: normdeploy.verify(M, d / "in.onnx", weights=5),
        "weights",
    ),
    (
        "verify-input_shapes-ints",
        lambda d: normdeploy.verify(M, d / "in.onnx", input_shapes=[3]),
        "input_shapes",
    ),
    ("export-path-None", lambda d: normdeploy.export(M, X, None), "path"),
    ("export-module-None", lambda d: normdeploy.export(None, X, d / "e.onnx"), "module"),
    ("export-inputs-int", lambda d: normdeploy.export(M, 5, d / "e.onnx"), "example_inputs"),
    ("export-opset-str", lambda d: normdeploy.export(M, X, d / "e.onnx", opset="18"), "opset"),
    (
        "export-dynamic_batch-str",
        lambda d: normdeploy.export(M, X, d / "e.onnx", dynamic_batch="yes"),
        "dynamic_batch",
    ),
    (
        "export-overwrite-int",
        lambda d: normdeploy.export(M, X, d / "e.onnx", overwrite=1),
        "overwrite",
    ),
    (
        "export-exporter-int",
        lambda d: normdeploy.export(M, X, d / "e.onnx", exporter=5),
        "exporter",
    ),
    ("fold_bn_module-None", lambda d: normdeploy.fold_bn_module(None), "module"),
    (
        "fold_bn_module-inputs-str",
        lambda d: normdeploy.fold_bn_module(M, "x"),
        "example_inputs",
    ),
    ("fold_bn_module-inputs-int", lambda d: normdeploy.fold_bn_module(M, 5), "example_inputs"),
    ("deploy-model-None", lambda d: normdeploy.deploy(None, d / "out"), "model"),
    # A module is a MODEL too, but it needs its example inputs (or their shapes).
    ("deploy-module-no-inputs", lambda d: normdeploy.deploy(M, d / "out"), "example_inputs"),
    ("deploy-out_dir-None", lambda d: normdeploy.deploy("conv_bn_relu", None), "out_dir"),
    (
        "deploy-batch_sizes-int",
        lambda d: normdeploy.deploy("conv_bn_relu", d / "out", batch_sizes=3),
        "batch_sizes",
    ),
    (
        "deploy-providers-int-entry",
        lambda d: normdeploy.deploy("conv_bn_relu", d / "out", providers=[5]),
        "providers",
    ),
    (
        "deploy-progress-bool",
        lambda d: normdeploy.deploy("conv_bn_relu", d / "out", progress=True),
        "progress",
    ),
]


@pytest.mark.parametrize(("call", "param"), [w[1:] for w in WRONG], ids=[w[0] for w in WRONG])
def test_wrong_argument_is_a_typed_one_line_error_naming_the_parameter(files, call, param):
    before = sorted(p.name for p in files.iterdir())
    with pytest.raises(NormdeployError) as info:
        call(files)
    assert isinstance(info.value, (InvalidArgumentError, InvalidModelError)), info.value
    message = str(info.value)
    assert message.startswith(f"{param}:") and "\n" not in message, message
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written


def test_the_table_is_broad():
    assert len(WRONG) >= 30
    functions = {w[0].split("-")[0] for w in WRONG}
    assert functions == {
        "fold_bn", "fold_bn_file", "inspect", "verify", "export", "fold_bn_module", "deploy",
    }  # fmt: skip


def _kinds(path: Path) -> dict[str, object]:
    """The same model as every accepted kind."""
    return {
        "str": str(path),
        "Path": path,
        "ModelProto": onnx.load(str(path)),
        "bytes": path.read_bytes(),
    }


@pytest.mark.parametrize("kind", ["str", "Path", "ModelProto", "bytes"])
def test_every_model_reader_accepts_the_same_kinds(files, kind):
    model = _kinds(files / "in.onnx")[kind]
    assert len(normdeploy.fold_bn(model).folded) == 1
    assert normdeploy.inspect(model).op_counts == {"BatchNormalization": 1}
    result = normdeploy.verify(model, model, providers="cpu", bisect=False)
    assert result.passed and result.reference_kind == "onnx"


def test_tolerance_object_is_accepted(files):
    result = normdeploy.verify(
        files / "in.onnx", files / "in.onnx", tolerance=Tolerance(0.0, 0.0), providers="cpu"
    )
    assert result.passed  # the same graph on the same inputs is bit-identical
