"""inspect/census: norm ops and patterns in any ONNX file, lints, per-module confirmation."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import models
from normdeploy.census import (
    DECOMPOSED_LAYERNORM,
    DECOMPOSED_RMSNORM,
    DECOMPOSITION,
    GROUPNORM_TRICK,
    inspect,
)
from normdeploy.cli import main
from normdeploy.errors import InputFileError
from normdeploy.exporting import exporter_quiet
from tests import replicas


def decomposed_layernorm(dtype: int = TensorProto.FLOAT, eps: float = 1e-5) -> onnx.ModelProto:
    """ReduceMean→Sub→Pow→ReduceMean→Add→Sqrt→Div over the last axis, as TorchScript writes it."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(2.0, np_dtype), "two"),
        numpy_helper.from_array(np.array(eps, np_dtype), "eps"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="ln/mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="ln/sub"),
        helper.make_node("Pow", ["d", "two"], ["sq"], name="ln/pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="ln/var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="ln/add"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="ln/sqrt"),
        helper.make_node("Div", ["d", "std"], ["y"], name="ln/div"),
    ]
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", dtype, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", dtype, ["N", 4, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_decomposed_layernorm_is_found_and_linted():
    census = inspect(decomposed_layernorm())
    assert census.op_counts == {DECOMPOSED_LAYERNORM: 1}
    assert census.norm_nodes[0].node == "ln/mean" and census.norm_nodes[0].dtype == "float32"
    assert census.lint_codes() == {"decomposed-layernorm"}
    assert census.passed  # no PyTorch module: nothing to confirm, nothing failed


def test_fp16_decomposition_with_underflowing_eps_is_an_error():
    census = inspect(decomposed_layernorm(TensorProto.FLOAT16, eps=1e-12))
    errors = {x.code for x in census.lints if x.severity == "error"}
    assert errors == {"fp16-norm", "fp16-eps-underflow"}
    assert census.op_counts["float16 norms"] == 1
    # 1e-5 is representable (subnormal) in float16: fp16 is still flagged, eps is not.
    ok_eps = inspect(decomposed_layernorm(TensorProto.FLOAT16, eps=1e-5))
    assert "fp16-eps-underflow" not in ok_eps.lint_codes()


def test_inspect_exits_1_when_it_prints_an_error_lint(tmp_path, capsys):
    bad = tmp_path / "fp16_ln.onnx"
    onnx.save(decomposed_layernorm(TensorProto.FLOAT16, eps=1e-12), bad)
    assert main(["inspect", str(bad)]) == 1
    assert "[error] fp16-eps-underflow" in capsys.readouterr().out
    warned = tmp_path / "ln.onnx"
    onnx.save(decomposed_layernorm(), warned)
    assert main(["inspect", str(warned)]) == 0  # warnings alone do not fail
    assert "[warning] decomposed-layernorm" in capsys.readouterr().out


def _single_op_model(node: onnx.NodeProto, opset: int, inits=(), n_in: int = 1):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 3])]
    graph = helper.make_graph(
        [node],
        "g",
        inputs,
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(("opset", "linted"), [(18, True), (21, False)], ids=["gn18", "gn21"])
def test_groupnormalization_before_opset_21_is_linted(opset, linted):
    scale = numpy_helper.from_array(np.ones(2, np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "bias")
    node = helper.make_node(
        "GroupNormalization", ["x", "scale", "bias"], ["y"], name="gn", num_groups=2
    )
    census = inspect(_single_op_model(node, opset, [scale, bias]))
    assert census.op_counts == {"GroupNormalization": 1}
    assert ("groupnorm-opset18" in census.lint_codes()) is linted


def test_training_batchnorm_and_dropout_are_linted():
    params = [
        numpy_helper.from_array(np.ones(4, np.float32), n)
        for n in ("scale", "b", "mean", "var")
    ]
    bn = helper.make_node(
        "BatchNormalization",
        ["x", "scale", "b", "mean", "var"],
        ["y", "running_mean", "running_var"],
        name="bn",
        training_mode=1,
    )
    census = inspect(_single_op_model(bn, 15, params))
    assert census.lint_codes() == {"bn-training-mode"}
    eval_bn = helper.make_node(
        "BatchNormalization", ["x", "scale", "b", "mean", "var"], ["y"], name="bn"
    )
    assert inspect(_single_op_model(eval_bn, 15, params)).lints == ()
    drop = helper.make_node("Dropout", ["x"], ["y"], name="drop")
    census = inspect(_single_op_model(drop, 15))
    assert census.op_counts == {"Dropout": 1} and census.lint_codes() == {"dropout"}


def test_subgraphs_functions_and_unknown_domains_do_not_break_the_census():
    ln = helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="inner_ln", axis=-1)
    branch = helper.make_graph(
        [ln], "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])],
        "else",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node(
            "If", ["c"], ["out"], name="if", then_branch=branch, else_branch=other
        ),
        helper.make_node("FancyNorm", ["out"], ["o2"], name="custom", domain="acme.ops"),
        helper.make_node(
            "SkipLayerNormalization", ["o2", "o2", "s"], ["o3"], domain="com.microsoft"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "main",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
        ],
        [helper.make_tensor_value_info("o3", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, np.float32), "s")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 17),
            helper.make_opsetid("acme.ops", 1),
            helper.make_opsetid("com.microsoft", 1),
        ],
    )
    census = inspect(model)
    assert census.op_counts == {
        "LayerNormalization": 1,
        "acme.ops.FancyNorm": 1,
        "com.microsoft.SkipLayerNormalization": 1,
    }
    assert census.norm_nodes[0].graph.startswith("main/if.then_branch")


def test_unreadable_files_are_user_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x89PNG\r\n not a model")
    with pytest.raises(InputFileError, match=r"bad\.onnx"):
        inspect(bad)
    assert main(["inspect", str(bad)]) == 2
    with pytest.raises(InputFileError, match="does not exist"):
        inspect(tmp_path / "missing.onnx")


def _torchscript(module, x, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with exporter_quiet():
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def test_layernorm_below_opset_17_is_a_confirmed_decomposition():
    ref = models.get("layernorm_chw")
    module = ref.build()
    model = _torchscript(module, ref.inputs(2)[0], 14)
    census = inspect(model, module=module, example_inputs=ref.inputs(2))
    entry = census.entry("1")
    assert entry.representation == DECOMPOSITION
    assert "ReduceMean" in entry.detail and "Sqrt" in entry.detail
    assert census.op_counts[DECOMPOSED_LAYERNORM] == 1
    assert "decomposed-layernorm" in census.lint_codes()
    # fp32 LayerNorm over 2048 values: ~1e-6 measured; 1e-4 is the documented fp32 default.
    assert (
        entry.confirmed
        and entry.vs_oracle.comparison.max_abs < 1e-4
        and entry.vs_torch.comparison.max_abs < 1e-4
    )


def test_confirmation_catches_a_wrong_groupnorm():
    ref = models.get("groupnorm32_cnn")
    module = ref.build()
    with exporter_quiet():
        model = torch.onnx.export(
            module, ref.inputs(2), dynamo=True, opset_version=21,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        ).model_proto  # fmt: skip
    good = inspect(model, module=module, example_inputs=ref.inputs(2))
    assert [e.representation for e in good.entries] == ["GroupNormalization"] * 2
    assert good.passed and all(e.vs_oracle.comparison.max_abs < 1e-4 for e in good.entries)
    # Swap the second GroupNorm's scale for per-group values (what opset-18 semantics would
    # mean): the census must say that module no longer matches PyTorch or the oracle.
    gn = [n for n in model.graph.node if n.op_type == "GroupNormalization"][1]
    init = next(t for t in model.graph.initializer if t.name == gn.input[1])
    scale = numpy_helper.to_array(init).copy()
    scale[::2] = scale[0]
    init.CopyFrom(numpy_helper.from_array(scale, init.name))
    bad = inspect(model, module=module, example_inputs=ref.inputs(2))
    assert bad.entries[0].confirmed and bad.entries[1].confirmed is False
    assert bad.entries[1].vs_oracle.comparison.max_abs > 1e-2 and not bad.passed


def test_cli_inspect_with_module_and_report(tmp_path, capsys):
    ref = models.get("groupnorm_edge_cnn")
    path = tmp_path / "gn.onnx"
    onnx.save(_torchscript(ref.build(), ref.inputs(2)[0], 18), path)
    before = path.read_bytes()
    report = tmp_path / "census.json"
    rc = main(
        ["inspect", str(path), "--module", "groupnorm_edge_cnn", "--report", str(report)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert GROUPNORM_TRICK in text and "confirmed" in text
    data = json.loads(report.read_text())
    assert [e["representation"] for e in data["entries"]] == [GROUPNORM_TRICK] * 2
    assert all(e["confirmed"] for e in data["entries"])
    assert path.read_bytes() == before  # the input is never modified
    assert main(["inspect", str(path), "--format", "markdown"]) == 0
    assert "### Norm census" in capsys.readouterr().out
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out  # without --module: the norm is named from the graph
    assert "norms: 2× GroupNorm as InstanceNormalization+Reshape" in text
    assert text.count("GroupNorm as InstanceNormalization+Reshape") == 3  # summary + 2 rows


class LlamaRMSNorm(torch.nn.Module):
    """A hand-written RMSNorm as Hugging Face models spell it (rsqrt, weight applied last)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.variance_epsilon = eps

    def forward(self, h):
        v = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon))


class TwoRMSNorms(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.norm = torch.nn.RMSNorm(32)
        self.llama = LlamaRMSNorm(32)
        self.head = torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.llama(self.norm(self.fc(x))))


@pytest.mark.parametrize(
    ("opset", "representation"),
    [(18, DECOMPOSITION), (23, "RMSNormalization")],
    ids=["decomposed_18", "native_23"],
)
def test_rmsnorm_modules_are_found_and_confirmed(opset, representation):
    torch.manual_seed(0)
    module = TwoRMSNorms().eval()
    x = torch.randn(2, 5, 32)
    with exporter_quiet():
        model = torch.onnx.export(
            module, (x,), dynamo=True, opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        ).model_proto  # fmt: skip
    census = inspect(model, module=module, example_inputs=(x,))
    assert [(e.module_path, e.kind, e.representation) for e in census.entries] == [
        ("norm", "RMSNorm", representation),
        ("llama", "RMSNorm", representation),
    ]
    # Both confirmed under the tolerance policy (float64 truth); fp32 RMSNorm over 32 values
    # differs from the oracle by ~5e-7, far inside the policy's bound.
    assert all(e.confirmed for e in census.entries), census.to_text()
    torch_norm, llama = census.entries
    assert torch_norm.vs_oracle is not None and torch_norm.vs_oracle.comparison.max_abs < 1e-4
    # A hand-written class may compute something else under the same name (Gemma scales by
    # 1 + weight): it is confirmed against PyTorch only, and says so.
    assert llama.vs_oracle is None and llama.vs_torch is not None
    assert "confirmed against PyTorch only" in llama.note
    kind = DECOMPOSED_RMSNORM if opset == 18 else "RMSNormalization"
    assert census.op_counts == {kind: 2}
    assert ("decomposed-rmsnorm" in census.lint_codes()) is (opset == 18)
    without_module = inspect(model).to_text()
    assert f"2× RMSNorm as {representation}" in without_module


def test_a_wrong_rmsnorm_scale_fails_its_confirmation():
    torch.manual_seed(0)
    module = TwoRMSNorms().eval()
    x = torch.randn(2, 5, 32)
    with exporter_quiet():
        model = torch.onnx.export(
            module, (x,), dynamo=True, opset_version=23,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        ).model_proto  # fmt: skip
    rms = next(n for n in model.graph.node if n.op_type == "RMSNormalization")
    init = next(t for t in model.graph.initializer if t.name == rms.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    census = inspect(model, module=module, example_inputs=(x,))
    assert census.entries[0].confirmed is False and not census.passed
    assert census.entries[1].confirmed


def test_a_norm_subclass_the_oracle_does_not_model_is_confirmed_against_pytorch_only(
    replica_deploys,
):
    """timm's BatchNormAct2d (BatchNorm2d whose forward also applies ReLU): the plain BatchNorm
    oracle would compare a post-ReLU value with a pre-ReLU formula and fail every module."""
    module, (x,) = replicas.densenet_like()
    graph = replica_deploys["densenet_like"][1] / "model.onnx"
    census = inspect(graph, module=module, example_inputs=(x.repeat(2, 1, 1, 1),))
    acts = [e for e in census.entries if e.module_class == "BatchNormAct2d"]
    assert len(acts) == 17 and census.passed
    for entry in acts:
        assert entry.vs_torch is not None and entry.vs_torch.passed and entry.vs_oracle is None
        assert (
            "confirmed against PyTorch only: BatchNormAct2d overrides forward()" in entry.note
        )
    assert "17 modules (features.1, …): confirmed against PyTorch only" in census.to_text()
    assert "ok (PyTorch only)" in census.to_text()


class InPlaceBlock(torch.nn.Module):
    """torchvision's habit: BatchNorm and GroupNorm each followed by ReLU(inplace=True), which
    overwrites the norm's output tensor after the norm module has returned it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn = torch.nn.GroupNorm(4, 8)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.gn(self.conv2(out)))


def test_in_place_activations_after_norms_do_not_fail_the_confirmation():
    """The census captures each norm's output while the forward runs; a capture that shared the
    tensor's memory saw the ReLU's result instead and failed every honest module."""
    torch.manual_seed(0)
    module = InPlaceBlock()
    with torch.no_grad():
        module.bn1.running_mean.uniform_(-1, 1)
        module.bn1.running_var.uniform_(0.5, 2)
    module.eval()
    x = torch.randn(2, 3, 16, 16)
    with exporter_quiet():
        model = torch.onnx.export(
            module, (x,), dynamo=True, opset_version=18,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        ).model_proto  # fmt: skip
    census = inspect(model, module=module, example_inputs=(x,))
    assert [e.module_path for e in census.entries] == ["bn1", "gn"]
    assert census.passed and all(e.confirmed for e in census.entries), census.to_text()
    # fp32 3x3 convs over 3-8 channels: the norms' outputs agree with PyTorch to ~1e-6, where
    # the ReLU-clobbered capture differed by the size of every negative value (~1).
    assert all(e.vs_torch.comparison.max_abs < 1e-4 for e in census.entries)
