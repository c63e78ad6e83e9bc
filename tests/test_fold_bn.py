"""fold-bn on small graphs written as text: op histogram, onnx.checker, and numerics against the
unfolded graph run by onnxruntime with optimizations off (the independent oracle)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from normdeploy.cli import main
from normdeploy.errors import InvalidModelError, OutputPathError, VerificationFailed
from normdeploy.io import save_onnx, sha256_file
from normdeploy.passes import fold_bn as fb
from normdeploy.passes._stream import write_model
from normdeploy.passes.fold_bn import (
    bn_scale_shift,
    fold_bn,
    fold_bn_file,
    scale_conv_input_channels,
    scale_gemm_input_features,
    scale_output_channels,
)
from normdeploy.runtime import OrtRunner, graph_input_specs, make_feeds

# fp32 graphs here are tiny (≤ 3×3×8 accumulations); folding only re-rounds each weight once
# (relative 6e-8), so 1e-5 is ~100× the expected difference and far below a wrong fold's error.
RTOL32, ATOL32 = 1e-5, 1e-5
RNG = np.random.default_rng(1234)


def parse(graph: str, inits: dict[str, np.ndarray] | None = None, opset: int = 17, **kw):
    """A model from onnx.parser text plus numpy initializers."""
    imports = f'"" : {opset}' + "".join(
        f', "{d}" : {v}' for d, v in kw.get("domains", {}).items()
    )
    model = onnx.parser.parse_model(f"<ir_version: 8, opset_import: [{imports}]>\n{graph}")
    for name, value in (inits or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def bn_params(c: int, dtype=np.float32, prefix: str = "") -> dict[str, np.ndarray]:
    """BatchNorm parameters far from identity (signed scale, shifted mean, var in [0.1, 3])."""
    sign = np.where(RNG.random(c) < 0.3, -1.0, 1.0)
    return {
        f"{prefix}g": (sign * RNG.uniform(0.5, 2.0, c)).astype(dtype),
        f"{prefix}b": RNG.normal(0, 1, c).astype(dtype),
        f"{prefix}m": RNG.normal(0, 1, c).astype(dtype),
        f"{prefix}v": RNG.uniform(0.1, 3.0, c).astype(dtype),
    }


def w(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.normal(0, 0.5, shape).astype(dtype)


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def run(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = make_feeds(graph_input_specs(model), batch_size=2, seed=seed)
    return OrtRunner(model).infer(feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, rtol=RTOL32, atol=ATOL32):
    ra, rb = run(a), run(b)
    assert list(ra) == list(rb)
    for name in ra:
        np.testing.assert_allclose(rb[name], ra[name], rtol=rtol, atol=atol, err_msg=name)


def fold_and_check(model: onnx.ModelProto, folded: int, rtol=RTOL32, atol=ATOL32):
    """Fold (no built-in verify), then: BN count, checker, caller's model untouched, numerics."""
    before = model.SerializeToString()
    result = fold_bn(model, verify=False)
    assert model.SerializeToString() == before, "fold_bn mutated the caller's ModelProto"
    assert len(result.folded) == folded, result.to_text()
    assert len(result.ledger) == sum(
        n.op_type == "BatchNormalization" for n in model.graph.node
    )
    onnx.checker.check_model(result.model, full_check=True)
    onnx.shape_inference.infer_shapes(result.model, check_type=True, strict_mode=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert_same_outputs(model, result.model, rtol, atol)
    return result


# ----------------------------------------------------------------------------- arithmetic


def test_bn_scale_shift_equals_the_batchnorm_formula() -> None:
    c = 7
    p = bn_params(c)
    x = RNG.normal(0, 3, (5, c))
    s, t = bn_scale_shift(p["g"], p["b"], p["m"], p["v"], 1e-3)
    g, b, m, v = (p[k].astype(np.float64) for k in "gbmv")
    expected = (x - m) / np.sqrt(v + 1e-3) * g + b
    np.testing.assert_allclose(x * s + t, expected, rtol=1e-12)  # float64 both ways
    assert s.dtype == np.float64 and t.dtype == np.float64


def test_bn_scale_shift_keeps_huge_fp16_variance_finite() -> None:
    var = np.array([65504.0, 6e4], np.float16)  # var + eps overflows if added in fp16
    s, _ = bn_scale_shift(np.ones(2, np.float16), np.zeros(2), np.zeros(2), var, 65504.0)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, 1 / np.sqrt(var.astype(np.float64) + 65504.0), rtol=1e-12)


def test_scale_output_channels_follows_each_layout() -> None:
    s = RNG.normal(size=12)
    conv = w(12, 3, 3, 3)
    got = scale_output_channels(conv, s, "Conv")
    for o in range(12):
        np.testing.assert_allclose(got[o], conv[o] * s[o], rtol=1e-12)
    group, c_in, c_out_g = 4, 8, 3  # ConvTranspose weight (C_in, C_out/g, k, k)
    convt = w(c_in, c_out_g, 2, 2)
    got = scale_output_channels(convt, s, "ConvTranspose", group=group)
    for i in range(c_in):
        g = i // (c_in // group)
        for j in range(c_out_g):
            np.testing.assert_allclose(got[i, j], convt[i, j] * s[g * c_out_g + j], rtol=1e-12)
    gemm = w(12, 5)  # transB=1: (N, K)
    np.testing.assert_allclose(
        scale_output_channels(gemm, s, "Gemm", trans_b=True), gemm * s[:, None], rtol=1e-12
    )
    np.testing.assert_allclose(
        scale_output_channels(gemm.T, s, "Gemm"), gemm.T * s[None, :], rtol=1e-12
    )
    mm = w(5, 12)
    np.testing.assert_allclose(scale_output_channels(mm, s, "MatMul"), mm * s, rtol=1e-12)
    with pytest.raises(ValueError, match="no output-channel layout"):
        scale_output_channels(mm, s, "Relu")


def test_scale_conv_input_channels_matches_an_explicit_loop() -> None:
    group, c_in, c_out = 2, 6, 4
    weight = w(c_out, c_in // group, 1, 3).astype(np.float64)
    s, t = RNG.normal(size=c_in), RNG.normal(size=c_in)
    new_w, delta = scale_conv_input_channels(weight, s, t, group)
    for o in range(c_out):
        for j in range(c_in // group):
            ch = (o // (c_out // group)) * (c_in // group) + j
            np.testing.assert_allclose(new_w[o, j], weight[o, j] * s[ch], rtol=1e-12)
    exp_delta = [
        sum(
            weight[o, j].sum() * t[(o // (c_out // group)) * (c_in // group) + j]
            for j in range(c_in // group)
        )
        for o in range(c_out)
    ]
    np.testing.assert_allclose(delta, exp_delta, rtol=1e-12)


def test_scale_gemm_input_features_is_diag_s_times_b() -> None:
    s, t = RNG.normal(size=4), RNG.normal(size=4)
    b = w(4, 3).astype(np.float64)
    a = RNG.normal(size=(2, 4))
    for trans_b in (False, True):
        bw = b.T if trans_b else b
        new_b, delta = scale_gemm_input_features(bw, s, t, trans_b=trans_b, alpha=0.5)
        got = 0.5 * a @ (new_b.T if trans_b else new_b) + delta
        np.testing.assert_allclose(got, 0.5 * (a * s + t) @ b, rtol=1e-12)


# ----------------------------------------------------------------------------- producers

CONV_CASES = {
    "conv2d_bias": ("float[2,3,6,6] X", "Conv <pads=[1,1,1,1]> (X, W, B)", (8, 3, 3, 3), 8, 1, "2,8,6,6"),
    "conv2d_nobias": ("float[2,3,6,6] X", "Conv <strides=[2,2]> (X, W)", (8, 3, 3, 3), 8, 1, "2,8,2,2"),
    "conv1d": ("float[2,3,9] X", "Conv <pads=[1,1]> (X, W, B)", (5, 3, 3), 5, 1, "2,5,9"),
    "conv1d_nobias_stride2": ("float[2,3,9] X", "Conv <strides=[2]> (X, W)", (5, 3, 3), 5, 1, "2,5,4"),
    "conv2d_dilation2": ("float[2,3,7,7] X", "Conv <dilations=[2,2]> (X, W, B)", (6, 3, 3, 3), 6, 1, "2,6,3,3"),
    "conv3d": ("float[2,2,4,4,4] X", "Conv (X, W, B)", (4, 2, 3, 3, 3), 4, 1, "2,4,2,2,2"),
    "conv3d_nobias_group2": ("float[2,4,4,4,4] X", "Conv <group=2> (X, W)", (6, 2, 2, 2, 2), 6, 2, "2,6,3,3,3"),
    "conv_group2": ("float[2,4,6,6] X", "Conv <group=2> (X, W, B)", (6, 2, 3, 3), 6, 2, "2,6,4,4"),
    "depthwise": ("float[2,4,6,6] X", "Conv <group=4, pads=[1,1,1,1]> (X, W)", (4, 1, 3, 3), 4, 4, "2,4,6,6"),
    "convT_bias": ("float[2,3,4,4] X", "ConvTranspose <strides=[2,2]> (X, W, B)", (3, 5, 3, 3), 5, 1, "2,5,9,9"),
    "convT_nobias_group1": ("float[2,3,4,4] X", "ConvTranspose (X, W)", (3, 4, 2, 2), 4, 1, "2,4,5,5"),
    "convT_bias_group2": ("float[2,4,4,4] X", "ConvTranspose <group=2> (X, W, B)", (4, 3, 2, 2), 6, 2, "2,6,5,5"),
    "convT_bias_outpad": (
        "float[2,3,3,3] X", "ConvTranspose <strides=[2,2], output_padding=[1,1]> (X, W, B)",
        (3, 2, 3, 3), 2, 1, "2,2,8,8",
    ),
    "convT1d_bias_group4": ("float[2,8,5] X", "ConvTranspose <group=4> (X, W, B)", (8, 2, 3), 8, 4, "2,8,7"),
    "convT_bias_group4": ("float[2,8,4,4] X", "ConvTranspose <group=4> (X, W, B)", (8, 3, 2, 2), 12, 4, "2,12,5,5"),
    "convT_nobias_group2_outpad": (
        "float[2,4,3,3] X",
        "ConvTranspose <group=2, strides=[2,2], output_padding=[1,1]> (X, W)",
        (4, 2, 3, 3), 4, 2, "2,4,8,8",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=list(CONV_CASES))
def test_bn_folds_into_preceding_conv(case) -> None:
    x_decl, conv, w_shape, c, _, y_shape = case
    inits = {"W": w(*w_shape), "B": w(c), **bn_params(c)}
    model = parse(
        f"""G ({x_decl}) => (float[{y_shape}] Y) {{
            T = {conv}
            Y = BatchNormalization <epsilon=0.001> (T, g, b, m, v)
        }}""",
        inits,
    )
    if "(X, W)" in conv:
        del model.graph.initializer[1]  # no bias
    result = fold_and_check(model, folded=1)
    assert "BatchNormalization" not in ops(result.model)
    (entry,) = result.ledger
    assert entry.direction == "preceding" and entry.target_op == conv.split()[0]
    # every BN parameter is gone; the weight kept its name (rewritten in place)
    names = {t.name for t in result.model.graph.initializer}
    assert names.isdisjoint({"g", "b", "m", "v"}) and "W" in names


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "with_c"),
    [(0, 0, 1.0, 1.0, True), (0, 1, 1.0, 1.0, True), (0, 1, 0.5, 2.0, True),
     (0, 0, 1.0, 0.0, True), (0, 1, 1.0, 1.0, False), (1, 0, -1.5, 0.5, True),
     (1, 1, 2.0, 1.0, False)],
    ids=["transB0", "transB1", "alpha_beta", "beta0", "noC", "transA_alpha_beta",
         "transA_transB_noC"],
)  # fmt: skip
def test_bn_folds_into_preceding_gemm(trans_a, trans_b, alpha, beta, with_c) -> None:
    weight = w(6, 4) if trans_b else w(4, 6)
    inits = {"W": weight, **bn_params(6)}
    c_in = ", C" if with_c else ""
    if with_c:
        inits["C"] = w(6)
    x_decl = "float[4,3] X" if trans_a else "float[3,4] X"
    model = parse(
        f"""G ({x_decl}) => (float[3,6] Y) {{
            T = Gemm <transA={trans_a}, transB={trans_b}, alpha={alpha}, beta={beta}> (X, W{c_in})
            Y = BatchNormalization (T, g, b, m, v)
        }}""",
        inits,
    )
    fold_and_check(model, folded=1)


def test_matmul_with_bias_add_folds_and_without_keeps_an_add() -> None:
    inits = {"W": w(4, 6), "C": w(6), **bn_params(6)}
    with_add = parse(
        """G (float[3,4] X) => (float[3,6] Y) {
            M = MatMul (X, W)
            T = Add (C, M)
            Y = BatchNormalization (T, g, b, m, v)
        }""",
        inits,
    )
    result = fold_and_check(with_add, folded=1)
    assert ops(result.model) == Counter({"MatMul": 1, "Add": 1})
    bare = parse(
        """G (float[3,4] X) => (float[3,6] Y) {
            M = MatMul (X, W)
            Y = BatchNormalization (M, g, b, m, v)
        }""",
        {k: v for k, v in inits.items() if k != "C"},
    )
    result = fold_and_check(bare, folded=1)
    assert ops(result.model) == Counter({"MatMul": 1, "Add": 1})
    assert "shift kept as an Add" in result.ledger[0].reason


def test_matmul_on_3d_input_is_skipped_with_a_reason() -> None:
    model = parse(
        """G (float[2,3,4] X) => (float[2,3,6] Y) {
            M = MatMul (X, W)
            Y = BatchNormalization (M, g, b, m, v)
        }""",
        {"W": w(4, 6), **bn_params(3)},
    )
    result = fold_and_check(model, folded=0)
    assert "3-D" in result.ledger[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_conv_with_bias_as_separate_add_folds_both() -> None:
    inits = {"W": w(4, 3, 3, 3), "C": w(1, 4, 1, 1), **bn_params(4)}
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
            T = Conv (X, W)
            U = Add (T, C)
            Y = BatchNormalization (U, g, b, m, v)
        }""",
        inits,
    )
    result = fold_and_check(model, folded=1)
    assert ops(result.model) == Counter({"Conv": 1, "Add": 1})


def test_add_that_is_not_per_channel_is_left_alone() -> None:
    inits = {"W": w(4, 3, 3, 3), "C": w(3, 3), **bn_params(4)}  # broadcasts over H, W
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
            T = Conv (X, W)
            U = Add (T, C)
            Y = BatchNormalization (U, g, b, m, v)
        }""",
        inits,
    )
    result = fold_and_check(model, folded=0)
    assert "not per-channel" in result.ledger[0].reason


# ----------------------------------------------------------------------------- followers


@pytest.mark.parametrize("group", [1, 2])
def test_bn_before_unpadded_conv_folds_into_it(group) -> None:
    inits = {"W": w(6, 4 // group, 1, 1), "B": w(6), **bn_params(4)}
    model = parse(
        f"""G (float[2,4,5,5] X) => (float[2,6,5,5] Y) {{
            T = BatchNormalization (X, g, b, m, v)
            Y = Conv <group={group}> (T, W, B)
        }}""",
        inits,
    )
    result = fold_and_check(model, folded=1)
    assert result.ledger[0].direction == "following"


def test_bn_before_padded_conv_is_skipped() -> None:
    inits = {"W": w(6, 4, 3, 3), **bn_params(4)}
    model = parse(
        """G (float[2,4,5,5] X) => (float[2,6,5,5] Y) {
            T = BatchNormalization (X, g, b, m, v)
            Y = Conv <pads=[1,1,1,1]> (T, W)
        }""",
        inits,
    )
    result = fold_and_check(model, folded=0)
    assert "padded Conv" in result.ledger[0].reason
    assert "input is not produced by a node" in result.ledger[0].reason


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm_folds_into_it(trans_b) -> None:
    inits = {"W": w(3, 4) if trans_b else w(4, 3), **bn_params(4)}
    model = parse(
        f"""G (float[5,4] X) => (float[5,3] Y) {{
            T = BatchNormalization (X, g, b, m, v)
            Y = Gemm <transB={trans_b}, alpha=0.7> (T, W)
        }}""",
        inits,
    )
    fold_and_check(model, folded=1)


# ----------------------------------------------------------------------------- safety


def test_shared_weight_is_never_changed_under_its_other_reader() -> None:
    weight = w(4, 3, 3, 3)
    inits = {"W": weight, **bn_params(4, prefix="p"), **bn_params(4, prefix="q")}
    inits["W_bnfold"] = w(4)  # an existing name the fresh-name logic must step over
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y, float[2,4,3,3] Z, float[2,4,3,3] U) {
            A = Conv (X, W)
            Y = BatchNormalization (A, pg, pb, pm, pv)
            B = Conv (X, W, W_bnfold)
            Z = BatchNormalization (B, qg, qb, qm, qv)
            U = Conv (X, W)
        }""",
        inits,
    )
    result = fold_and_check(model, folded=2)
    tensors = {t.name: t for t in result.model.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(tensors["W"]), weight)
    all_names = [t.name for t in result.model.graph.initializer]
    assert len(all_names) == len(set(all_names))
    assert "W_bnfold2" in all_names  # fresh name stepped over the existing one


def test_bn_output_as_graph_output_folds_and_keeps_its_name() -> None:
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y, float[2,4,3,3] R) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
            R = Relu (Y)
        }""",
        {"W": w(4, 3, 3, 3), **bn_params(4)},
    )
    result = fold_and_check(model, folded=1)
    assert result.model.graph.node[0].output[0] == "Y"


def test_producer_output_read_elsewhere_is_skipped() -> None:
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y, float[2,4,3,3] A) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": w(4, 3, 3, 3), **bn_params(4)},
    )
    result = fold_and_check(model, folded=0)
    assert "'A' is a graph output" in result.ledger[0].reason


def test_training_mode_and_extra_outputs_are_skipped() -> None:
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
            A = Conv (X, W)
            Y, rm, rv = BatchNormalization <training_mode=1> (A, g, b, m, v)
        }""",
        {"W": w(4, 3, 3, 3), **bn_params(4)},
    )
    result = fold_bn(model, verify=False)
    assert not result.folded and "training_mode=1" in result.ledger[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_non_constant_statistics_are_skipped() -> None:
    model = parse(
        """G (float[2,3,5,5] X, float[4] m) => (float[2,4,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": w(4, 3, 3, 3), **{k: v for k, v in bn_params(4).items() if k != "m"}},
    )
    result = fold_bn(model, verify=False)
    assert "not a constant" in result.ledger[0].reason


def test_constant_node_and_transposed_weights_fold_and_leave_no_dead_nodes() -> None:
    p = bn_params(6)
    consts = "\n".join(
        f"{k} = Constant <value = float[6] {{{', '.join(map(str, v.tolist()))}}}> ()"
        for k, v in p.items()
    )
    model = parse(
        f"""G (float[3,4] X) => (float[3,6] Y) {{
            {consts}
            Wt = Transpose <perm=[1,0]> (W)
            T = MatMul (X, Wt)
            Y = BatchNormalization (T, g, b, m, v)
        }}""",
        {"W": w(6, 4)},
    )
    result = fold_and_check(model, folded=1)
    assert ops(result.model) == Counter({"MatMul": 1, "Add": 1})


def test_fp16_with_huge_running_var_folds_in_float64() -> None:
    p = bn_params(4, np.float16)
    p["v"] = np.array([6e4, 65504.0, 3e4, 0.5], np.float16)
    weight = w(4, 3, 3, 3, dtype=np.float16)
    model = parse(
        """G (float16[2,3,5,5] X) => (float16[2,4,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization <epsilon=0.01> (A, g, b, m, v)
        }""",
        {"W": weight, **p},
    )
    # fp16: 10 mantissa bits; both graphs round inputs/weights once more or less.
    result = fold_and_check(model, folded=1, rtol=1e-2, atol=1e-2)
    s = p["g"].astype(np.float64) / np.sqrt(p["v"].astype(np.float64) + 0.01)
    expected = (weight.astype(np.float64) * s[:, None, None, None]).astype(np.float16)
    folded_w = numpy_helper.to_array(
        next(t for t in result.model.graph.initializer if t.name == "W")
    )
    np.testing.assert_array_equal(folded_w, expected)  # one rounding from float64


def test_fp16_overflow_is_refused() -> None:
    p = bn_params(2, np.float16)
    p["g"] = np.array([6e4, 1.0], np.float16)
    p["v"] = np.array([1e-4, 1.0], np.float16)
    model = parse(
        """G (float16[2,3,5,5] X) => (float16[2,2,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization <epsilon=1e-7> (A, g, b, m, v)
        }""",
        {"W": np.full((2, 3, 3, 3), 100.0, np.float16), **p},
    )
    result = fold_bn(model, verify=False)
    assert not result.folded and "overflow float16" in result.ledger[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_bn_inside_if_subgraph_is_left_and_listed() -> None:
    inits = {"W": w(4, 3, 3, 3), **bn_params(4)}
    model = parse(
        """G (float[2,3,5,5] X, bool c) => (float[2,4,3,3] Y) {
            Y = If (c) <
                then_branch = T () => (float[2,4,3,3] y1) {
                    a1 = Conv (X, W)
                    y1 = BatchNormalization (a1, g, b, m, v)
                },
                else_branch = E () => (float[2,4,3,3] y2) {
                    y2 = Conv (X, W)
                }
            >
        }""",
        inits,
    )
    result = fold_bn(model, verify=False)
    (entry,) = result.ledger
    assert not entry.folded and "If subgraph" in entry.reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_contrib_and_quantized_ops_are_left_exactly() -> None:
    inits = {
        "W": w(4, 3, 3, 3), "Wq": RNG.integers(-5, 5, (4, 4, 1, 1)).astype(np.int8),
        "xs": np.array(0.05, np.float32), "xz": np.array(0, np.int8),
        "ws": np.array(0.1, np.float32), "wz": np.array(0, np.int8),
        "ys": np.array(0.2, np.float32), "yz": np.array(0, np.int8),
        **bn_params(4), **bn_params(4, prefix="q"), **bn_params(4, prefix="r"),
    }  # fmt: skip
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y, float[2,4,3,3] Z, float[2,4,3,3] Q) {
            A = Conv (X, W)
            B = BatchNormalization (A, g, b, m, v)
            Y = com.microsoft.Gelu (B)
            F = com.microsoft.FusedConv <activation="Relu"> (X, W)
            Z = BatchNormalization (F, qg, qb, qm, qv)
            xq = QuantizeLinear (B, xs, xz)
            cq = QLinearConv (xq, xs, xz, Wq, ws, wz, ys, yz)
            cd = DequantizeLinear (cq, ys, yz)
            Q = BatchNormalization (cd, rg, rb, rm, rv)
        }""",
        inits,
        domains={"com.microsoft": 1},
    )
    result = fold_and_check(model, folded=1)
    reasons = {e.node or "": e.reason for e in result.ledger}
    assert any("com.microsoft.FusedConv is not foldable" in r for r in reasons.values())
    assert any("DequantizeLinear is not foldable" in r for r in reasons.values())
    kept = {n.op_type for n in result.model.graph.node}
    assert {"Gelu", "FusedConv", "QLinearConv", "QuantizeLinear"} <= kept
    assert (
        numpy_helper.to_array(
            next(t for t in result.model.graph.initializer if t.name == "Wq")
        ).tobytes()
        == inits["Wq"].tobytes()
    )


def test_model_metadata_doc_strings_and_opsets_survive() -> None:
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": w(4, 3, 3, 3), **bn_params(4)},
    )
    model.doc_string, model.producer_name = "a doc", "tests"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "me", "license": "x"})
    result = fold_and_check(model, folded=1)
    out = result.model
    assert (out.doc_string, out.producer_name, out.graph.doc_string) == (
        "a doc", "tests", "graph doc",
    )  # fmt: skip
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "x"}
    assert list(out.opset_import) == list(model.opset_import)


def test_old_opset_and_broken_graph_are_user_errors() -> None:
    graph = """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
        A = Conv (X, W)
        Y = BatchNormalization (A, g, b, m, v)
    }"""
    old = parse(graph, {"W": w(4, 3, 3, 3), **bn_params(4)}, opset=7)
    with pytest.raises(InvalidModelError, match="opset 7"):
        fold_bn(old)
    broken = parse(graph, {"W": w(4, 3, 3, 3)})
    with pytest.raises(InvalidModelError, match="reads 'g'"):
        fold_bn(broken)


def test_inplace_mutates_and_default_verify_reports_numbers() -> None:
    model = parse(
        """G (float[N,3,5,5] X) => (float[N,4,3,3] Y) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": w(4, 3, 3, 3), **bn_params(4)},
    )
    result = fold_bn(model, inplace=True)
    assert result.model is model and ops(model) == Counter({"Conv": 1})
    assert result.verified is True and bool(result)
    assert {c.name for c in result.verification} == {"Y@b1", "Y@b2"}
    assert all(c.max_abs < 1e-4 for c in result.verification)


# ----------------------------------------------------------------------------- files and CLI


def _conv_bn_file(path: Path, external: bool = False) -> onnx.ModelProto:
    model = parse(
        """G (float[N,3,8,8] X) => (float[N,16,6,6] Y) {
            A = Conv (X, W, B)
            Y = BatchNormalization (A, g, b, m, v)
        }""",
        {"W": w(16, 3, 3, 3), "B": w(16), **bn_params(16)},
    )
    save_onnx(model, path, external_data=external)
    return model


def test_stream_writer_is_byte_identical_to_serialize(tmp_path) -> None:
    model = _conv_bn_file(tmp_path / "m.onnx")
    model.graph.value_info.add().name = "extra"
    helper.set_model_props(model, {"k": "v"})
    path = tmp_path / "s.onnx"
    with open(path, "wb") as f:
        write_model(model, f)
    assert path.read_bytes() == model.SerializeToString()


def test_fold_file_writes_output_and_reports(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    original = _conv_bn_file(src)
    digest = sha256_file(src)
    result = fold_bn_file(src, out, report=tmp_path / "r.json")
    assert sha256_file(src) == digest
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert ops(folded) == Counter({"Conv": 1})
    assert_same_outputs(original, folded)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["folded"] == 1 and report["verified"] is True
    assert report["ledger"][0]["direction"] == "preceding"
    assert result.timings["fold"] >= 0
    with pytest.raises(OutputPathError, match="exists"):
        fold_bn_file(src, out)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        fold_bn_file(src, src, overwrite=True)


def test_external_data_is_kept_and_input_untouched(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    original = _conv_bn_file(src, external=True)
    data = tmp_path / "in.onnx.data"
    digests = sha256_file(src), sha256_file(data)
    fold_bn_file(src, out)
    assert (sha256_file(src), sha256_file(data)) == digests
    assert (tmp_path / "out.onnx.data").is_file()
    header = onnx.load_model(str(out), load_external_data=False)
    assert any(
        onnx.external_data_helper.uses_external_data(t) for t in header.graph.initializer
    )
    original = onnx.load(str(src))
    assert_same_outputs(original, onnx.load(str(out)))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_wrong_fold_fails_verification_and_writes_nothing(tmp_path, monkeypatch) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _conv_bn_file(src)

    exact = fb.scale_output_channels

    def off_by_one_percent(w_, s, op, **kw):
        return exact(w_, s * 1.01, op, **kw)

    monkeypatch.setattr(fb, "scale_output_channels", off_by_one_percent)
    with pytest.raises(VerificationFailed, match="not written") as info:
        fold_bn_file(src, out, report=tmp_path / "r.md")
    assert not out.exists() and info.value.result.verified is False
    assert "FAIL" in (tmp_path / "r.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "r.md"]
    assert main(["fold-bn", str(src), "-o", str(out)]) == 1
    # --no-verify writes the (wrong) graph: that is what the flag means, and it says so.
    assert main(["fold-bn", str(src), "-o", str(out), "--no-verify"]) == 0 and out.exists()


def test_cli_fold_bn(tmp_path, capsys) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _conv_bn_file(src)
    assert main(["fold-bn", str(src), "-o", str(out), "--report", str(tmp_path / "r.md")]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 BatchNormalization folded" in text and "PASS" in text
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("## fold-bn") and "| BatchNormalization |" in md
    assert main(["fold-bn", str(tmp_path / "missing.onnx"), "-o", str(out), "-f"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.onnx" in err and "does not exist" in err
    assert main(["fold-bn", str(src), "-o", str(out)]) == 2  # exists without --force
    assert "--force" in capsys.readouterr().err
    assert main(["fold-bn", str(src), "-o", str(out), "-f", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["folded"] == 1


def test_ledger_renders_every_bn_in_text_json_and_markdown() -> None:
    model = parse(
        """G (float[2,4,5,5] X) => (float[2,6,5,5] Y) {
            T = BatchNormalization (X, g, b, m, v)
            Y = Conv <pads=[1,1,1,1]> (T, W)
        }""",
        {"W": w(6, 4, 3, 3), **bn_params(4)},
    )
    model.graph.node[0].name = "bn_kept"
    result = fold_bn(model)
    assert "bn_kept" in result.to_text() and "| bn_kept |" in result.to_markdown()
    d = result.to_dict()
    assert d["kept"] == 1 and d["ledger"][0]["node"] == "bn_kept"
    assert "nothing folded" in result.to_text()


# ----------------------------------------------------------------------------- reference models


@pytest.mark.parametrize(
    "name", ["resnet_mini", "mobilenet_mini", "decoder_convt", "mlp_bn1d", "cnn1d", "cnn3d"]
)
def test_reference_models_exported_without_folding(name, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    import models

    ref = models.get(name)
    module = ref.build().eval()
    (x,) = ref.inputs(2)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        module, (x,), str(path), dynamo=False, do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
        dynamic_axes={"x": {0: "b"}}, opset_version=17,
    )  # fmt: skip
    exported = onnx.load(str(path))
    n_bn = ops(exported)["BatchNormalization"]
    assert n_bn > 0, "the exporter folded BN itself; this test needs it kept"
    result = fold_bn(exported)  # verifies against the unfolded graph on onnxruntime
    assert result.verified and len(result.ledger) == n_bn
    assert not result.skipped, result.to_text()  # every BN in these models folds exactly
    assert "BatchNormalization" not in ops(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    with torch.no_grad():
        expected = module(x).numpy()
    got = OrtRunner(result.model).infer({"x": x.numpy()})
    # fp32, PyTorch vs onnxruntime kernels on small nets: see compare.py's fp32 default.
    np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-4, atol=1e-4)
    assert re.search(r"\d+ of \d+ BatchNormalization folded", result.to_text())


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path) -> None:
    model = _conv_bn_file(tmp_path / "tmp.onnx")
    src = tmp_path / "in.onnx"
    onnx.save_model(
        model, str(src), save_as_external_data=True, location="out.onnx.data", size_threshold=0
    )
    digest = sha256_file(tmp_path / "out.onnx.data")
    with pytest.raises(OutputPathError, match=r"external data file 'out\.onnx\.data'"):
        fold_bn_file(src, tmp_path / "out.onnx")
    assert sha256_file(tmp_path / "out.onnx.data") == digest


# ----------------------------------------------------------------------------- kept exactly

CONV_BN = """G (float[2,3,5,5] X{extra_in}) => (float[2,4,3,3] Y{extra_out}) {{
    A = Conv (X, W)
    {bn}
    {more}
}}"""


def _skip_case(bn: str, extra_in="", extra_out="", more="", drop=(), **params):
    def build() -> onnx.ModelProto:
        p = {"W": w(4, 3, 3, 3), **bn_params(4)}
        p.update(params)
        inits = {k: v for k, v in p.items() if k not in drop}
        graph = CONV_BN.format(bn=bn, extra_in=extra_in, extra_out=extra_out, more=more)
        return parse(graph, inits)

    return build


BN = "Y = BatchNormalization (A, g, b, m, v)"
SKIP_CASES = {
    "producer_two_readers": (
        _skip_case(BN, extra_out=", float[2,4,3,3] R", more="R = Relu (A)"),
        "'A' has 2 readers",
    ),
    "producer_graph_output": (
        _skip_case(BN, extra_out=", float[2,4,3,3] A"),
        "'A' is a graph output",
    ),
    "stats_are_graph_inputs": (
        _skip_case(BN, extra_in=", float[4] m, float[4] v", drop=("m", "v")),
        "not a constant",
    ),
    "training_mode": (
        _skip_case(
            "Y, rm, rv = BatchNormalization <training_mode=1> (A, g, b, m, v)",
            extra_out=", float[4] rm, float[4] rv",
        ),
        "training_mode=1",
    ),
    "extra_outputs_used": (
        _skip_case(
            "Y, rm, rv = BatchNormalization (A, g, b, m, v)", extra_out=", float[4] rm"
        ),
        "extra outputs",
    ),
    "channel_mismatch": (
        _skip_case(BN, **{k: v[:3] for k, v in bn_params(4).items()}),
        "4 output channels, BN has 3",
    ),
    "nonfinite_mean": (
        _skip_case(BN, m=np.array([0.0, np.nan, 1.0, 2.0], np.float32)),
        "non-finite",
    ),
    "inf_scale": (_skip_case(BN, g=np.array([1, np.inf, 1, 1], np.float32)), "non-finite"),
    "var_plus_eps_nonpositive": (
        _skip_case(BN, v=np.array([1.0, -1.0, 0.5, 0.5], np.float32)),
        "var + epsilon <= 0",
    ),
}


@pytest.mark.parametrize("case", SKIP_CASES.values(), ids=list(SKIP_CASES))
def test_unsafe_fold_is_skipped_and_graph_left_exactly(case) -> None:
    build, reason = case
    model = build()
    result = fold_bn(model, verify=False)
    (entry,) = result.ledger
    assert not entry.folded and reason in entry.reason, entry.reason
    assert result.model.SerializeToString() == model.SerializeToString()
    assert not result.modified


def test_bn_before_gemm_with_trans_a_is_kept() -> None:
    model = parse(
        """G (float[4,5] X) => (float[5,3] Y) {
            T = BatchNormalization (X, g, b, m, v)
            Y = Gemm <transA=1> (T, W)
        }""",
        {"W": w(4, 3), **bn_params(5)},
    )
    result = fold_bn(model, verify=False)
    assert "transA=1" in result.ledger[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_bn_before_unpadded_3x3_conv_with_stride_and_dilation_folds() -> None:
    model = parse(
        """G (float[2,4,9,9] X) => (float[2,5,3,3] Y) {
            T = BatchNormalization <epsilon=0.01> (X, g, b, m, v)
            Y = Conv <strides=[2,2], dilations=[2,2], pads=[0,0,0,0]> (T, W)
        }""",
        {"W": w(5, 4, 3, 3), **bn_params(4)},
    )
    result = fold_and_check(model, folded=1)
    assert result.ledger[0].direction == "following"
    assert ops(result.model) == Counter({"Conv": 1})


def test_weights_and_statistics_in_constant_nodes_fold() -> None:
    p = bn_params(4)
    weight = w(4, 3, 3, 3)
    consts = "\n".join(
        f"{k} = Constant <value = float[{','.join(map(str, v.shape))}] "
        f"{{{', '.join(map(str, v.reshape(-1).tolist()))}}}> ()"
        for k, v in {**p, "W": weight}.items()
    )
    model = parse(
        f"""G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {{
            {consts}
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
        }}""",
    )
    result = fold_and_check(model, folded=1)
    assert ops(result.model) == Counter({"Conv": 1})  # the Constant nodes went with the BN


def test_shared_weight_other_conv_unchanged() -> None:
    weight = w(4, 3, 3, 3)
    model = parse(
        """G (float[2,3,5,5] X) => (float[2,4,3,3] Y, float[2,4,3,3] U) {
            A = Conv (X, W)
            Y = BatchNormalization (A, g, b, m, v)
            U = Conv (X, W)
        }""",
        {"W": weight, **bn_params(4)},
    )
    result = fold_and_check(model, folded=1)  # numerics cover U as well as Y
    tensors = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(tensors["W"], weight)
    other = next(n for n in result.model.graph.node if n.output[0] == "U")
    assert list(other.input) == ["X", "W"]
    folded = next(n for n in result.model.graph.node if n.output[0] == "Y")
    assert folded.input[1] != "W"


def _conv_bn_fp16(c=8, k=3, c_in=8):
    rng = np.random.default_rng(7)
    weight = (rng.normal(0, 1, (c, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float16)
    p = {
        "g": rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1),
        "b": rng.normal(0, 1, c),
        "m": rng.normal(0, 2, c),
        "v": 10.0 ** rng.uniform(-2, 1, c),
    }
    p16 = {k_: v.astype(np.float16) for k_, v in p.items()}
    model = parse(
        f"""G (float16[2,{c_in},6,6] X) => (float16[2,{c},4,4] Y) {{
            A = Conv (X, W)
            Y = BatchNormalization <epsilon=0.001> (A, g, b, m, v)
        }}""",
        {"W": weight, **p16},
    )
    return model, weight, p16


def test_fp16_fold_error_is_within_the_unfolded_graphs_own_error() -> None:
    torch = pytest.importorskip("torch")
    model, weight, p = _conv_bn_fp16()
    # Loose: fp16 outputs; the float64 oracle comparison below is the real check.
    result = fold_and_check(model, folded=1, rtol=2e-2, atol=2e-2)
    x = make_feeds(graph_input_specs(model), batch_size=2, seed=3)["X"]
    unfolded = OrtRunner(model).infer({"X": x})["Y"].astype(np.float64)
    folded = OrtRunner(result.model).infer({"X": x})["Y"].astype(np.float64)
    # float64 oracle from the same fp16 parameters and input
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(weight.astype(np.float64))
    ).numpy()
    g, b, m, v = (p[k].astype(np.float64).reshape(1, -1, 1, 1) for k in "gbmv")
    oracle = (conv - m) / np.sqrt(v + np.float64(np.float32(0.001))) * g + b
    err_unfolded = np.abs(unfolded - oracle).max()
    err_folded = np.abs(folded - oracle).max()
    # Both graphs round to fp16 a handful of times (weights, accumulator, output); the fold
    # replaces BN's own roundings by one rounding of W·s. Factor 2 allows a different but
    # equally sized rounding pattern; a fold done in fp16 arithmetic or a wrong scale fails.
    assert err_folded <= 2.0 * err_unfolded, (err_folded, err_unfolded)
    assert err_folded <= 1e-2 * np.abs(oracle).max()


def test_float64_gemm_and_matmul_graph() -> None:
    p = bn_params(6, np.float64)
    q = bn_params(6, np.float64, prefix="q")
    model = parse(
        """G (double[3,4] X) => (double[3,6] Y, double[3,6] Z) {
            T = Gemm <transB=1, alpha=0.5> (X, W, C)
            Y = BatchNormalization (T, g, b, m, v)
            M = MatMul (X, V)
            Z = BatchNormalization (M, qg, qb, qm, qv)
        }""",
        {"W": w(6, 4, dtype=np.float64), "C": w(6, dtype=np.float64),
         "V": w(4, 6, dtype=np.float64), **p, **q},
    )  # fmt: skip
    # float64 end to end: the only difference is re-association of a 4-term sum (~1e-16).
    result = fold_and_check(model, folded=2, rtol=1e-12, atol=1e-12)
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in result.model.graph.initializer)


def test_bfloat16_gemm_folds_once_from_float64() -> None:
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    p = bn_params(6, np.float32)
    weight = w(4, 6).astype(bf16)
    model = parse(
        """G (bfloat16[3,4] X) => (bfloat16[3,6] Y) {
            T = Gemm (X, W)
            Y = BatchNormalization (T, g, b, m, v)
        }""",
        {"W": weight, **{k: v.astype(bf16) for k, v in p.items()}},
    )
    result = fold_bn(model, verify=False)
    assert len(result.folded) == 1, result.to_text()
    onnx.checker.check_model(result.model, full_check=True)
    g, v = (p[k].astype(bf16).astype(np.float64) for k in "gv")
    s = g / np.sqrt(v + np.float64(np.float32(1e-5)))
    tensors = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(
        tensors["W"].astype(np.float64),
        (weight.astype(np.float64) * s).astype(bf16).astype(np.float64),
    )
    try:
        run(model)
    except Exception as exc:  # onnxruntime CPU has no bfloat16 Gemm/BatchNormalization
        pytest.skip(f"onnxruntime cannot run bfloat16 Gemm here: {str(exc)[:80]}")
    # bf16: 7 mantissa bits, a few roundings each side
    assert_same_outputs(model, result.model, rtol=5e-2, atol=5e-2)


def test_numeric_names_in_a_large_graph_stay_unique() -> None:
    rng = np.random.default_rng(5)
    nodes, inits, counter = [], [], iter(range(10**6))
    c = 3

    def name() -> str:
        return str(next(counter))

    x = "input"
    shared = name()  # one weight read by every third Conv: forces fresh names
    inits.append(
        numpy_helper.from_array(rng.normal(0, 0.5, (c, c, 1, 1)).astype(np.float32), shared)
    )
    for i in range(70):
        weight = shared if i % 3 == 0 else name()
        if weight != shared:
            inits.append(
                numpy_helper.from_array(
                    rng.normal(0, 0.5, (c, c, 1, 1)).astype(np.float32), weight
                )
            )
        stats = [name() for _ in range(4)]
        for k, s in zip("gbmv", stats, strict=True):
            value = rng.uniform(0.2, 2.0, c) if k in "gv" else rng.normal(0, 1, c)
            inits.append(numpy_helper.from_array(value.astype(np.float32), s))
        conv_out, bn_out, relu_out = name(), name(), name()
        nodes += [
            helper.make_node("Conv", [x, weight], [conv_out], name=name()),
            helper.make_node("BatchNormalization", [conv_out, *stats], [bn_out], name=name()),
            helper.make_node("Relu", [bn_out], [relu_out], name=name()),
        ]
        x = relu_out
    # names an implementation might invent from counters are already taken
    inits.append(numpy_helper.from_array(np.zeros(1, np.float32), f"{shared}_bnfold"))
    graph = helper.make_graph(
        nodes, "numeric",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [2, c, 4, 4])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [2, c, 4, 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert len(model.graph.node) >= 200
    # fp32, 70 layers of 3-channel 1×1 convs: re-rounding compounds, outputs of order 10
    result = fold_and_check(model, folded=70, rtol=1e-4, atol=1e-4)
    g = result.model.graph
    outputs = [o for n in g.node for o in n.output]
    init_names = [t.name for t in g.initializer]
    assert len(outputs) == len(set(outputs))
    assert len(init_names) == len(set(init_names))
    assert set(outputs).isdisjoint(init_names)
    node_names = [n.name for n in g.node]
    assert len(node_names) == len(set(node_names))


def test_folding_twice_is_folding_once() -> None:
    model = parse(
        """G (float[2,3,6,6] X, float[3,4] Xm) => (float[2,5,4,4] Y, float[3,6] Z) {
            A = Conv (X, W)
            B = BatchNormalization (A, g, b, m, v)
            C = Relu (B)
            D = BatchNormalization (C, pg, pb, pm, pv)
            Y = Conv (D, W2)
            M = MatMul (Xm, V)
            Z = BatchNormalization (M, qg, qb, qm, qv)
        }""",
        {"W": w(4, 3, 3, 3), "W2": w(5, 4, 1, 1), "V": w(4, 6), **bn_params(4),
         **bn_params(4, prefix="p"), **bn_params(6, prefix="q")},
    )  # fmt: skip
    once = fold_and_check(model, folded=3)
    twice = fold_bn(once.model, verify=False)
    assert not twice.folded and not twice.ledger
    assert twice.model.SerializeToString() == once.model.SerializeToString()


def test_cli_writes_json_and_markdown_reports(tmp_path, capsys) -> None:
    src = tmp_path / "in.onnx"
    _conv_bn_file(src)
    digest = sha256_file(src)
    for suffix in ("json", "md"):
        out = tmp_path / f"out_{suffix}.onnx"
        report = tmp_path / f"r.{suffix}"
        assert main(["fold-bn", str(src), "-o", str(out), "--report", str(report)]) == 0
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    capsys.readouterr()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["folded"] == 1 and data["kept"] == 0 and data["verified"] is True
    assert all(c["passed"] for c in data["verification"])
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("## fold-bn: 1 of 1") and "Verification: PASS" in md
    assert sha256_file(src) == digest


def test_no_verify_writes_without_running_a_check(tmp_path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    original = _conv_bn_file(src)
    result = fold_bn_file(src, out, verify=False)
    assert result.verified is None and "verify" not in result.timings
    assert "not verified" in result.to_text()
    assert_same_outputs(original, onnx.load(str(out)))


def test_planted_weight_corruption_raises_and_writes_nothing(tmp_path, monkeypatch) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _conv_bn_file(src, external=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    exact = fb._apply

    def corrupt(graph, index, names, edits, bn, plan):
        exact(graph, index, names, edits, bn, plan)
        tensor = index.init[plan.target.input[1]]
        value = numpy_helper.to_array(tensor).copy()
        value.reshape(-1)[0] += 0.5
        fb._overwrite_tensor(tensor, value)

    monkeypatch.setattr(fb, "_apply", corrupt)
    with pytest.raises(VerificationFailed, match="not written"):
        fold_bn_file(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp files


def test_default_epsilon_is_the_float32_default() -> None:
    # Found by the fuzz test: the pass used the double 1e-5 when the attribute was absent,
    # while ONNX's default is float32(1e-5); float64 graphs then differed by ~1e-12.
    p = bn_params(3, np.float64)
    p["v"] = np.array([1e-4, 2e-5, 0.05])  # small variances make eps matter
    model = parse(
        """G (double[2,4] X) => (double[2,3] Y) {
            T = Gemm (X, W)
            Y = BatchNormalization (T, g, b, m, v)
        }""",
        {"W": w(4, 3, dtype=np.float64), **p},
    )
    result = fold_and_check(model, folded=1, rtol=1e-13, atol=1e-13)  # float64 throughout
    s = p["g"] / np.sqrt(p["v"] + np.float64(np.float32(1e-5)))
    folded_w = numpy_helper.to_array(result.model.graph.initializer[0])
    np.testing.assert_array_equal(folded_w, model_w := numpy_helper.to_array(
        model.graph.initializer[0]) * s)  # fmt: skip
    assert model_w.dtype == np.float64


def test_fp16_shift_near_the_range_is_kept() -> None:
    # Found by the fuzz test: mean 300 with scale ~100 folds to a shift of ~3e4; the folded fp16
    # Conv then sums terms of that size (overflow to inf, or 100x the unfolded graph's error).
    model, _, _ = _conv_bn_fp16()
    for tensor in model.graph.initializer:
        if tensor.name == "m":
            tensor.CopyFrom(numpy_helper.from_array(np.full(8, 3e2, np.float16), "m"))
        if tensor.name == "v":
            tensor.CopyFrom(numpy_helper.from_array(np.full(8, 1e-3, np.float16), "v"))
    result = fold_bn(model, verify=False)
    assert "could overflow or lose precision" in result.ledger[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()
