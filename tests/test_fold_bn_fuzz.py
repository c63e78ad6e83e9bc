"""Property tests for fold-bn: random small graphs around a BatchNormalization, folded, then run
by onnxruntime (optimizations off) against the unfolded graph. Whether a fold must happen is
decided from the generated structure, independently of the pass."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normdeploy.passes.fold_bn import fold_bn
from normdeploy.runtime import OrtRunner

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
F32 = TensorProto.FLOAT


def _bn_inits(rng: np.random.Generator, c: int, prefix: str) -> list[onnx.TensorProto]:
    """Statistics far from identity: signed scales, var over four decades."""
    sign = np.where(rng.random(c) < 0.3, -1.0, 1.0)
    values = {
        "g": sign * rng.uniform(0.3, 3.0, c),
        "b": rng.normal(0, 1, c),
        "m": rng.normal(0, 1, c),
        "v": 10.0 ** rng.uniform(-2, 2, c),
    }
    return [
        numpy_helper.from_array(v.astype(np.float32), prefix + k) for k, v in values.items()
    ]


def _bn(x: str, y: str, prefix: str, eps: float) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [x] + [prefix + k for k in "gbmv"], [y], epsilon=eps
    )


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, shape)


def _check(model: onnx.ModelProto, must_fold: bool, seed: int) -> None:
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    result = fold_bn(model, verify=False)
    assert len(result.ledger) == n_bn
    if must_fold:
        assert len(result.folded) == 1, result.to_text()
    onnx.checker.check_model(result.model, full_check=True)
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        x = rng.normal(0, 1.5, shape)
        x.reshape(-1)[:: max(1, x.size // 3)] *= 20.0  # outliers
        feeds[vi.name] = x.astype(np.float32)
    expected = OrtRunner(model).infer(feeds)
    actual = OrtRunner(result.model).infer(feeds)
    for name, ref in expected.items():
        # fp32: folding re-rounds each weight once and changes the summation order; the error
        # is a few ulp of Σ|w·x|, so 2e-5 of the output's largest magnitude bounds it.
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(
            actual[name], ref, rtol=1e-4, atol=2e-5 * scale, err_msg=name
        )


@st.composite
def preceding_graphs(draw):
    """Conv / ConvTranspose / Gemm / MatMul → [bias Add] → BN, with sharing and readers."""
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    bias_add = draw(st.booleans())
    shared_weight = draw(st.booleans())
    producer_read_elsewhere = draw(st.integers(0, 4)) == 0
    bn_is_output = draw(st.booleans())
    nodes, inits, outputs = [], [], []
    if op in ("Conv", "ConvTranspose"):
        group = draw(st.integers(1, 3))
        cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        nd = draw(st.integers(1, 2))
        k = draw(st.integers(1, 3))
        size = draw(st.integers(k, 5))
        pad = draw(st.integers(0, 1))
        c_in, c_out = group * cin_g, group * cout_g
        x_shape = [2, c_in] + [size] * nd
        w_shape = [c_out, cin_g] if op == "Conv" else [c_in, cout_g]
        w_shape += [k] * nd
        attrs = {"group": group, "pads": [pad] * (2 * nd)}
        if op == "ConvTranspose":
            attrs["strides"] = [draw(st.integers(1, 2))] * nd
        has_bias = draw(st.booleans())
        c = c_out
        bias_shape = draw(st.sampled_from([[c], [1, c]])) + [1] * nd
        inits.append(
            numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W")
        )
        ins = ["X", "W"]
        if has_bias:
            inits.append(numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "B"))
            ins.append("B")
        nodes.append(helper.make_node(op, ins, ["P"], **attrs))
        if shared_weight and op == "Conv":
            nodes.append(helper.make_node(op, ["X", "W"], ["S"], **attrs))
            outputs.append(_vi("S", None))
    else:
        m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        x_shape, c = [m, k], n
        bias_shape = draw(st.sampled_from([[n], [1, n]]))
        trans_b = draw(st.booleans()) if op == "Gemm" else False
        w_shape = [n, k] if trans_b else [k, n]
        inits.append(
            numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W")
        )
        ins = ["X", "W"]
        attrs = {}
        if op == "Gemm":
            attrs = {
                "transB": int(trans_b),
                "alpha": draw(st.sampled_from([1.0, 0.5, -2.0])),
                "beta": draw(st.sampled_from([1.0, 0.0, 3.0])),
            }
            c_shape = draw(st.sampled_from([None, [n], [1, n], [m, n], [m, 1]]))
            if c_shape is not None:
                c_val = rng.normal(0, 1, c_shape).astype(np.float32)
                inits.append(numpy_helper.from_array(c_val, "C"))
                ins.append("C")
        nodes.append(helper.make_node(op, ins, ["P"], **attrs))
        if shared_weight:
            nodes.append(helper.make_node(op, ins, ["S"], **attrs))
            outputs.append(_vi("S", None))
    bn_in = "P"
    if bias_add:
        inits.append(
            numpy_helper.from_array(rng.normal(0, 1, bias_shape).astype(np.float32), "A")
        )
        nodes.append(helper.make_node("Add", ["P", "A"] if seed % 2 else ["A", "P"], ["Q"]))
        bn_in = "Q"
    inits += _bn_inits(rng, c, "bn_")
    nodes.append(_bn(bn_in, "Y", "bn_", eps))
    outputs.insert(0, _vi("Y", None))
    if not bn_is_output:
        nodes.append(helper.make_node("Relu", ["Y"], ["R"]))
        outputs[0] = _vi("R", None)
    if producer_read_elsewhere:
        outputs.append(_vi("P", None))
    model = _model(nodes, [_vi("X", x_shape)], outputs, inits)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, not producer_read_elsewhere, seed


@settings(max_examples=320, **SETTINGS)
@given(preceding_graphs())
def test_fold_into_preceding_is_exact(case) -> None:
    model, must_fold, seed = case
    _check(model, must_fold, seed)


@st.composite
def following_graphs(draw):
    """BN on a graph input, then a Conv (padded or not) or a Gemm."""
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    op = draw(st.sampled_from(["Conv", "Gemm"]))
    eps = draw(st.sampled_from([1e-5, 1e-2]))
    nodes, inits = [], []
    if op == "Conv":
        group = draw(st.integers(1, 3))
        cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        k, stride, dil = (
            draw(st.integers(1, 3)),
            draw(st.integers(1, 2)),
            draw(st.integers(1, 2)),
        )
        pad = draw(st.integers(0, 4)) == 0
        c = group * cin_g
        size = (k - 1) * dil + 1 + draw(st.integers(0, 3))
        x_shape = [2, c, size, size]
        attrs = {"group": group, "strides": [stride] * 2, "dilations": [dil] * 2}
        if pad:
            attrs["pads"] = [1, 1, 1, 1]
        w_shape = [group * cout_g, cin_g, k, k]
        ins = ["Y", "W"]
        if draw(st.booleans()):
            bias = rng.normal(0, 1, group * cout_g).astype(np.float32)
            inits.append(numpy_helper.from_array(bias, "B"))
            ins.append("B")
        must_fold = not pad
    else:
        m, c, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        x_shape = [m, c]
        trans_b = draw(st.booleans())
        w_shape = [n, c] if trans_b else [c, n]
        attrs = {
            "transB": int(trans_b),
            "alpha": draw(st.sampled_from([1.0, 0.25])),
            "beta": draw(st.sampled_from([1.0, 0.0, 2.0])),
        }
        ins = ["Y", "W"]
        c_shape = draw(st.sampled_from([None, [n], [m, n]]))
        if c_shape is not None:
            inits.append(
                numpy_helper.from_array(rng.normal(0, 1, c_shape).astype(np.float32), "C")
            )
            ins.append("C")
        must_fold = True
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W"))
    inits += _bn_inits(rng, c, "bn_")
    nodes.append(_bn("X", "Y", "bn_", eps))
    nodes.append(helper.make_node(op, ins, ["Z"], **attrs))
    model = _model(nodes, [_vi("X", x_shape)], [_vi("Z", None)], inits)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, must_fold, seed


@settings(max_examples=200, **SETTINGS)
@given(following_graphs())
def test_fold_into_following_is_exact_or_skipped(case) -> None:
    model, must_fold, seed = case
    _check(model, must_fold, seed)
    if not must_fold:
        result = fold_bn(model, verify=False)
        assert not result.folded and "padded Conv" in result.ledger[0].reason
