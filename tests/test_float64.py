"""float64: a float64 copy of a graph where onnxruntime can run one, the reason where not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from normdeploy.verification.compare import compare_graphs
from normdeploy.verification.float64 import NO_DOUBLE_KERNEL, Float64Graph, float64_unfit
from normdeploy.verification.runners import session_options


def mlp_bn() -> onnx.ModelProto:
    """x → Gemm → BatchNormalization → Relu → LayerNormalization (float constants included)."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(f32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(f32), "b"),
        numpy_helper.from_array((rng.random(4) + 0.5).astype(f32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(4).astype(f32), "beta"),
        numpy_helper.from_array(rng.standard_normal(4).astype(f32), "mean"),
        numpy_helper.from_array((rng.random(4) + 0.5).astype(f32), "var"),
        numpy_helper.from_array(np.ones(4, f32), "ln_scale"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["n"]),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["n", "half"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "ln_scale"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def numpy_mlp_bn(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The same graph by its formulas in float64 (the oracle)."""
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = x @ p["w"].T + p["b"]
    n = (h - p["mean"]) / np.sqrt(p["var"] + 1e-5) * p["gamma"] + p["beta"]
    r = np.maximum(n * 0.5, 0)
    mu = r.mean(-1, keepdims=True)
    return (r - mu) / np.sqrt(((r - mu) ** 2).mean(-1, keepdims=True) + 1e-5)


def test_float64_copy_computes_the_formulas_in_float64():
    model = mlp_bn()
    truth = Float64Graph.of(model)
    assert truth.available, truth.reason
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    (y,) = truth.infer({"x": x}).values()
    assert y.dtype == np.float64
    # float64 kernels throughout: 3e-12 measured (float32 epsilon attributes, onnxruntime's
    # variance formula), four orders of magnitude below float32's unit roundoff (6e-8)
    np.testing.assert_allclose(
        y, numpy_mlp_bn(model, x.astype(np.float64)), rtol=0, atol=1e-10
    )


def test_graph_comparison_uses_the_float64_copy_when_there_is_one():
    model = mlp_bn()
    (check, *_) = compare_graphs(model, model, batch_sizes=(2,))
    comp = check.comparison
    assert check and comp.rule == "float64" and comp.floor is not None


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"),
    [
        ("Conv", [("x", [1, 2, 4, 4]), ("w", [2, 2, 3, 3])], {}),
        ("InstanceNormalization", [("x", [1, 2, 4, 4]), ("s", [2]), ("b", [2])], {}),
        ("GlobalAveragePool", [("x", [1, 2, 4, 4])], {}),
        ("Erf", [("x", [2])], {}),
    ],
    ids=["conv", "instancenorm", "gap", "erf"],
)
def test_listed_ops_really_have_no_double_kernel(op, inputs, attrs):
    """NO_DOUBLE_KERNEL is a list of facts about onnxruntime: each must still be true."""
    assert op in NO_DOUBLE_KERNEL
    ins = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, s) for n, s in inputs]
    node = helper.make_node(op, [n for n, _ in inputs], ["y"], **attrs)
    out = [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)]
    model = helper.make_model(
        helper.make_graph([node], "g", ins, out), opset_imports=[helper.make_opsetid("", 18)]
    )
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(
            model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
    assert float64_unfit(model) == f"onnxruntime has no double kernel for {op}"
