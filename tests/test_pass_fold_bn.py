"""The fold-bn pass (normdeploy/passes/fold_bn.py) on small graphs written as text: op histogram
and fold count, onnx.checker, the caller's model unchanged, numerics against the unfolded graph
run by onnxruntime with optimizations off (the independent oracle), and a ledger reason for
every BatchNormalization kept. Also the pass contract of normdeploy/passes/__init__.py."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
from fold_support import (
    RNG,
    assert_same_outputs,
    bn_params,
    fold_and_check,
    initializer,
    ops,
    parse,
    run,
    w,
)
from onnx import helper, numpy_helper

from normdeploy.errors import InvalidModelError
from normdeploy.folding import fold_bn
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.passes import (
    FOLDED,
    KEPT,
    GraphPass,
    LedgerEntry,
    PassContractError,
    PassResult,
)
from normdeploy.passes.fold_bn import FoldBatchNorm
from normdeploy.verification.feeds import make_feeds
from normdeploy.verification.runners import OrtRunner

CONV_BN = """G (float[2,3,5,5] X{extra_in}) => (float[2,4,3,3] Y{extra_out}) {{
    A = Conv (X, W)
    {bn}
    {more}
}}"""
BN = "Y = BatchNormalization (A, g, b, m, v)"


def conv_bn(bn=BN, extra_in="", extra_out="", more="", drop=(), opset=17, **params):
    """Conv(X, W) → BN: the smallest foldable graph; ``params`` replace W or BN parameters,
    ``drop`` removes initializers (to declare them as graph inputs instead)."""
    p = {"W": w(4, 3, 3, 3), **bn_params(4)}
    p.update(params)
    inits = {k: v for k, v in p.items() if k not in drop}
    graph = CONV_BN.format(bn=bn, extra_in=extra_in, extra_out=extra_out, more=more)
    return parse(graph, inits, opset=opset)


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


CONV_ADD_BN = """G (float[2,3,5,5] X) => (float[2,4,3,3] Y) {
    T = Conv (X, W)
    U = Add (T, C)
    Y = BatchNormalization (U, g, b, m, v)
}"""
BIAS_ADDS = {  # shape of the Add's constant, folded, ledger reason
    "per_channel_folds_both": ((1, 4, 1, 1), 1, ""),
    "broadcast_over_hw_is_left_alone": ((3, 3), 0, "not per-channel"),
}


@pytest.mark.parametrize("case", BIAS_ADDS.values(), ids=list(BIAS_ADDS))
def test_conv_with_bias_as_separate_add(case) -> None:
    c_shape, folded, reason = case
    model = parse(CONV_ADD_BN, {"W": w(4, 3, 3, 3), "C": w(*c_shape), **bn_params(4)})
    result = fold_and_check(model, folded=folded)
    left = Counter({"Conv": 1, "Add": 1, "BatchNormalization": 1 - folded})
    assert ops(result.model) == +left
    assert reason in result.ledger[0].reason


# ----------------------------------------------------------------------------- followers

FOLLOWING_CONV = {  # X, BN attributes, Conv, weight shape, with bias, Y
    "conv1x1_bias_group1": ("2,4,5,5", "", "Conv <group=1>", (6, 4, 1, 1), True, "2,6,5,5"),
    "conv1x1_bias_group2": ("2,4,5,5", "", "Conv <group=2>", (6, 2, 1, 1), True, "2,6,5,5"),
    "conv3x3_stride2_dilation2_zero_pads": (
        "2,4,9,9", "<epsilon=0.01>", "Conv <strides=[2,2], dilations=[2,2], pads=[0,0,0,0]>",
        (5, 4, 3, 3), False, "2,5,3,3",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FOLLOWING_CONV.values(), ids=list(FOLLOWING_CONV))
def test_bn_before_unpadded_conv_folds_into_it(case) -> None:
    x_shape, bn_attrs, conv, w_shape, with_bias, y_shape = case
    inits = {"W": w(*w_shape), **bn_params(4)}
    if with_bias:
        inits["B"] = w(w_shape[0])
    model = parse(
        f"""G (float[{x_shape}] X) => (float[{y_shape}] Y) {{
            T = BatchNormalization {bn_attrs} (X, g, b, m, v)
            Y = {conv} (T, W{", B" if with_bias else ""})
        }}""",
        inits,
    )
    result = fold_and_check(model, folded=1)
    assert result.ledger[0].direction == "following"
    assert ops(result.model) == Counter({"Conv": 1})


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


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
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


# ----------------------------------------------------------------------------- shape-only ops

SHAPE_CHAINS = {  # graph (batch N symbolic), constants, the ops the BN folded through
    # LeViT's LinearNorm: Linear → flatten(0, 1) → BatchNorm1d → reshape_as
    "levit_reshape_bias": (
        """G (float[N,7,16] X) => (float[N,7,32] Y) {
            M = MatMul (X, W)
            A = Add (M, C)
            F = Reshape (A, s1)
            B = BatchNormalization (F, g, b, m, v)
            Y = Reshape (B, s2)
        }""",
        {"W": w(16, 32), "C": w(32), "s1": np.array([-1, 32], np.int64),
         "s2": np.array([-1, 7, 32], np.int64), **bn_params(32)},
        "Reshape",
    ),
    # TorchScript writes flatten(0, 1) as Flatten and reshape_as as Reshape(Shape(x))
    "levit_flatten_shape_reader": (
        """G (float[N,7,16] X) => (float[N,7,32] Y) {
            M = MatMul (X, W)
            F = Flatten <axis=2> (M)
            B = BatchNormalization (F, g, b, m, v)
            S = Shape (M)
            Y = Reshape (B, S)
        }""",
        {"W": w(16, 32), **bn_params(32)},
        "Flatten",
    ),
    # a token MLP: Linear → transpose(1, 2) → BatchNorm1d → transpose(1, 2)
    "token_mlp_transpose": (
        """G (float[N,7,16] X) => (float[N,7,32] Y) {
            M = MatMul (X, W)
            A = Add (C, M)
            T = Transpose <perm=[0,2,1]> (A)
            B = BatchNormalization (T, g, b, m, v)
            Y = Transpose <perm=[0,2,1]> (B)
        }""",
        {"W": w(16, 32), "C": w(32), **bn_params(32)},
        "Transpose",
    ),
    "conv_squeeze": (
        """G (float[N,3,4,4] X) => (float[N,8] Y) {
            A = Conv (X, W, Bc)
            S = Squeeze (A, axes)
            Y = BatchNormalization (S, g, b, m, v)
        }""",
        {"W": w(8, 3, 4, 4), "Bc": w(8), "axes": np.array([2, 3], np.int64), **bn_params(8)},
        "Squeeze",
    ),
    "gemm_unsqueeze_reshape": (
        """G (float[N,5] X) => (float[N,6,1] Y) {
            A = Gemm <transB=1> (X, W, Cg)
            U = Unsqueeze (A, axes)
            R = Reshape (U, s)
            Y = BatchNormalization (R, g, b, m, v)
        }""",
        {"W": w(6, 5), "Cg": w(6), "axes": np.array([2, 3], np.int64),
         "s": np.array([0, 6, 1], np.int64), **bn_params(6)},
        "Unsqueeze",
    ),
    # channels-last detour: Conv → NHWC → tokens (N·H·W, C) → BatchNorm1d
    "conv_nhwc_tokens": (
        """G (float[N,3,6,6] X) => (float[N,16,8] Y) {
            A = Conv (X, W)
            T = Transpose <perm=[0,2,3,1]> (A)
            R = Reshape (T, s)
            B = BatchNormalization (R, g, b, m, v)
            Y = Reshape (B, s2)
        }""",
        {"W": w(8, 3, 3, 3), "s": np.array([-1, 8], np.int64),
         "s2": np.array([-1, 16, 8], np.int64), **bn_params(8)},
        "Transpose",
    ),
    "following_reshape_into_unpadded_conv": (
        """G (float[N,4,16] X) => (float[N,6,4,4] Y) {
            B = BatchNormalization (X, g, b, m, v)
            R = Reshape (B, s)
            Y = Conv (R, W, Bc)
        }""",
        {"W": w(6, 4, 1, 1), "Bc": w(6), "s": np.array([0, 4, 4, 4], np.int64),
         **bn_params(4)},
        "Reshape",
    ),
    "following_unsqueeze_into_gemm_after_flatten": (
        """G (float[N,4] X) => (float[N,3] Y) {
            B = BatchNormalization (X, g, b, m, v)
            U = Unsqueeze (B, axes)
            F = Flatten (U)
            Y = Gemm (F, W)
        }""",
        {"W": w(4, 3), "axes": np.array([2], np.int64), **bn_params(4)},
        "Unsqueeze",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SHAPE_CHAINS.values(), ids=list(SHAPE_CHAINS))
def test_bn_folds_through_shape_only_ops(case) -> None:
    graph, inits, through = case
    model = parse(graph, inits)
    result = fold_and_check(model, folded=1)  # 0 BN left, checker, numerics vs unfolded
    (entry,) = result.ledger
    assert f"through {through}" in entry.reason
    shape_ops = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Shape")
    kept = Counter({k: v for k, v in ops(model).items() if k in shape_ops})
    assert +Counter({k: v for k, v in ops(result.model).items() if k in shape_ops}) == kept


SHAPE_CHAIN_KEPT = {  # graph, constants, ledger reason
    "reshape_merges_tokens_into_channels": (
        """G (float[N,6,16] X) => (float[N,48] Y) {
            M = MatMul (X, W)
            R = Reshape (M, s)
            Y = BatchNormalization (R, g, b, m, v)
        }""",
        {"W": w(16, 8), "s": np.array([-1, 48], np.int64), **bn_params(48)},
        "merges or splits the channel axis",
    ),
    "reshape_splits_channels_into_groups": (
        """G (float[N,16,3,3] X) => (float[N,4,36] Y) {
            A = Conv (X, W)
            R = Reshape (A, s)
            Y = BatchNormalization (R, g, b, m, v)
        }""",
        {"W": w(16, 16, 1, 1), "s": np.array([0, 4, 36], np.int64), **bn_params(4)},
        "merges or splits the channel axis",
    ),
    "transpose_moves_batch_to_channels": (
        """G (float[2,7,16] X) => (float[7,2,32] Y) {
            M = MatMul (X, W)
            T = Transpose <perm=[1,0,2]> (M)
            Y = BatchNormalization (T, g, b, m, v)
        }""",
        {"W": w(16, 32), **bn_params(2)},
        "the BN's channel axis is axis 0 of MatMul's 3-D output; its features are axis 2",
    ),
    "reshape_to_a_computed_shape": (
        """G (float[N,7,16] X, int64[2] s) => (float[?,32] Y) {
            M = MatMul (X, W)
            R = Reshape (M, s)
            Y = BatchNormalization (R, g, b, m, v)
        }""",
        {"W": w(16, 32), **bn_params(32)},
        "has no fixed size",
    ),
    "bn_input_shape_read": (  # the BN input takes the BN output's name: no reader may stay
        """G (float[N,7,16] X) => (float[?,32] Y) {
            M = MatMul (X, W)
            R = Reshape (M, s)
            B = BatchNormalization (R, g, b, m, v)
            S = Shape (R)
            Y = Reshape (B, S)
        }""",
        {"W": w(16, 32), "s": np.array([-1, 32], np.int64), **bn_params(32)},
        "'R' has 2 readers",
    ),
    "reshape_output_read_twice": (
        """G (float[N,7,16] X) => (float[N,32] Y, float[N,32] Z) {
            M = MatMul (X, W)
            R = Reshape (M, s)
            Y = BatchNormalization (R, g, b, m, v)
            Z = Relu (R)
        }""",
        {"W": w(16, 32), "s": np.array([-1, 32], np.int64), **bn_params(32)},
        "'R' has 2 readers",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SHAPE_CHAIN_KEPT.values(), ids=list(SHAPE_CHAIN_KEPT))
def test_bn_behind_shape_ops_that_do_not_map_the_channel_is_kept(case) -> None:
    graph, inits, reason = case
    model = parse(graph, inits)
    before = model.SerializeToString()
    result = fold_bn(model, verify=False)
    (entry,) = result.ledger
    assert not entry.folded and reason in entry.reason, entry.reason
    assert result.model.SerializeToString() == before


def test_folding_through_a_transpose_anyway_would_be_wrong() -> None:
    """The premise of keeping 'transpose_moves_batch_to_channels': scaling the MatMul's
    features by the BN's per-channel factors is not what the graph computes."""
    graph, inits, _ = SHAPE_CHAIN_KEPT["transpose_moves_batch_to_channels"]
    model = parse(graph, inits)
    x = RNG.normal(0, 1, (2, 7, 16)).astype(np.float32)
    expected = OrtRunner(model).infer({"X": x})["Y"]
    s = inits["g"] / np.sqrt(inits["v"] + 1e-5)
    t = inits["b"] - inits["m"] * s
    # the only per-feature reading of 2 channels: the first 2 of the 32 features
    wrong = np.transpose(x @ inits["W"], (1, 0, 2)).copy()
    wrong[..., :2] = wrong[..., :2] * s + t
    assert not np.allclose(wrong, expected, atol=1e-2)


# ----------------------------------------------------------------------------- safety


def test_shared_weight_is_never_changed_under_its_other_readers() -> None:
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
    result = fold_and_check(model, folded=2)  # numerics cover U as well as Y and Z
    np.testing.assert_array_equal(initializer(result.model, "W"), weight)
    all_names = [t.name for t in result.model.graph.initializer]
    assert len(all_names) == len(set(all_names))
    assert "W_bnfold2" in all_names  # fresh name stepped over the existing one
    conv = {n.output[0]: n for n in result.model.graph.node}
    assert list(conv["U"].input) == ["X", "W"]
    assert "W" not in (conv["Y"].input[1], conv["Z"].input[1])
    assert conv["Y"].input[1] != conv["Z"].input[1]


def test_bn_output_as_graph_output_folds_and_keeps_its_name() -> None:
    model = conv_bn(extra_out=", float[2,4,3,3] R", more="R = Relu (Y)")
    result = fold_and_check(model, folded=1)
    assert result.model.graph.node[0].output[0] == "Y"


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
    reasons = {e.node: e.reason for e in result.skipped}
    assert set(reasons) == {"BatchNormalization->Z", "BatchNormalization->Q"}
    assert "com.microsoft.FusedConv is not foldable" in reasons["BatchNormalization->Z"]
    assert "DequantizeLinear is not foldable" in reasons["BatchNormalization->Q"]
    kept = {n.op_type for n in result.model.graph.node}
    assert {"Gelu", "FusedConv", "QLinearConv", "QuantizeLinear"} <= kept
    assert initializer(result.model, "Wq").tobytes() == inits["Wq"].tobytes()


def test_model_metadata_doc_strings_and_opsets_survive() -> None:
    model = conv_bn()
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
    old = conv_bn(opset=7)
    before = old.SerializeToString()
    with pytest.raises(InvalidModelError, match="opset 7"):
        fold_bn(old)
    # the pass itself refuses in `requires`, naming the source, before touching the model
    with pytest.raises(InvalidModelError, match=r"^old\.onnx: opset 7 is older"):
        FoldBatchNorm()(old, "old.onnx")
    assert old.SerializeToString() == before
    broken = conv_bn(drop=("g",))
    with pytest.raises(InvalidModelError, match="reads 'g'"):
        fold_bn(broken)


# ----------------------------------------------------------------------------- dtypes


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
    np.testing.assert_array_equal(initializer(result.model, "W"), expected)  # one rounding


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
    model_w = initializer(model, "W")
    np.testing.assert_array_equal(initializer(result.model, "W"), model_w * s)
    assert model_w.dtype == np.float64


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
    np.testing.assert_array_equal(
        initializer(result.model, "W").astype(np.float64),
        (weight.astype(np.float64) * s).astype(bf16).astype(np.float64),
    )
    try:
        run(model)
    except Exception as exc:  # onnxruntime CPU has no bfloat16 Gemm/BatchNormalization
        pytest.skip(f"onnxruntime cannot run bfloat16 Gemm here: {str(exc)[:80]}")
    # bf16: 7 mantissa bits, a few roundings each side
    assert_same_outputs(model, result.model, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------- whole graphs


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


# ----------------------------------------------------------------------------- kept exactly

SKIP_CASES = {  # graph, ledger reason, invalid (the BN itself computes NaN/inf)
    "producer_two_readers": (
        lambda: conv_bn(extra_out=", float[2,4,3,3] R", more="R = Relu (A)"),
        "'A' has 2 readers",
        False,
    ),
    "producer_graph_output": (
        lambda: conv_bn(extra_out=", float[2,4,3,3] A"),
        "'A' is a graph output",
        False,
    ),
    "mean_is_graph_input": (
        lambda: conv_bn(extra_in=", float[4] m", drop=("m",)),
        "not a constant",
        False,
    ),
    "mean_and_var_are_graph_inputs": (
        lambda: conv_bn(extra_in=", float[4] m, float[4] v", drop=("m", "v")),
        "not a constant",
        False,
    ),
    "training_mode": (
        lambda: conv_bn(
            "Y, rm, rv = BatchNormalization <training_mode=1> (A, g, b, m, v)",
            extra_out=", float[4] rm, float[4] rv",
        ),
        "training_mode=1",
        False,
    ),
    "training_mode_running_stats_unread": (
        lambda: conv_bn("Y, rm, rv = BatchNormalization <training_mode=1> (A, g, b, m, v)"),
        "training_mode=1",
        False,
    ),
    "extra_outputs_used": (
        lambda: conv_bn(
            "Y, rm, rv = BatchNormalization (A, g, b, m, v)", extra_out=", float[4] rm"
        ),
        "extra outputs",
        False,
    ),
    "channel_mismatch": (
        lambda: conv_bn(**{k: v[:3] for k, v in bn_params(4).items()}),
        "4 output channels, BN has 3",
        False,
    ),
    "nonfinite_mean": (
        lambda: conv_bn(m=np.array([0.0, np.nan, 1.0, 2.0], np.float32)),
        "non-finite",
        True,
    ),
    "inf_scale": (
        lambda: conv_bn(g=np.array([1, np.inf, 1, 1], np.float32)),
        "non-finite",
        True,
    ),
    "var_plus_eps_nonpositive": (
        lambda: conv_bn(v=np.array([1.0, -1.0, 0.5, 0.5], np.float32)),
        "var + epsilon <= 0",
        True,
    ),
}


@pytest.mark.parametrize("case", SKIP_CASES.values(), ids=list(SKIP_CASES))
def test_unsafe_fold_is_skipped_and_graph_left_exactly(case) -> None:
    build, reason, invalid = case
    model = build()
    before = model.SerializeToString()
    result = fold_bn(model, verify=False)
    (entry,) = result.ledger
    assert not entry.folded and reason in entry.reason, entry.reason
    assert entry.invalid is invalid
    assert result.model.SerializeToString() == before == model.SerializeToString()
    assert not result.modified


# ----------------------------------------------------------------------------- the pass contract


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class LeavesADanglingInput(GraphPass):
    """Removes the Conv and says it merged it: the BN now reads an undefined value."""

    name = "dangling"

    def call(self, model):
        del model.graph.node[0]
        return PassResult(model, True, (LedgerEntry("A", "main", FOLDED),))


class RenamesACopy(GraphPass):
    """Functional and honest: copies the model, then renames a node of the copy."""

    name = "renames-a-copy"
    in_place = False

    def call(self, model):
        out = _copy(model)
        out.graph.node[0].name = "renamed"
        return PassResult(out, True, (LedgerEntry("A", "main", FOLDED),))


class FunctionalButMutatesItsInput(RenamesACopy):
    """Declared functional, also renames a node of the model it was given."""

    name = "mutating"

    def call(self, model):
        result = super().call(model)
        model.graph.node[0].name = "renamed"
        return result


class InPlaceButReturnsACopy(GraphPass):
    name = "copying"
    in_place = True

    def call(self, model):
        return PassResult(_copy(model), False, ())


class ModifiedWithoutAnAppliedEntry(GraphPass):
    name = "says-modified"

    def call(self, model):
        return PassResult(model, True, (LedgerEntry("Y", "main", KEPT, reason="kept"),))


class AppliedButSaysUnmodified(GraphPass):
    name = "says-unmodified"

    def call(self, model):
        return PassResult(model, False, (LedgerEntry("Y", "main", FOLDED),))


BROKEN_PASSES = {
    "dangling_input": (
        LeavesADanglingInput,
        r"node 'BatchNormalization->Y' reads 'A'.*undefined",
    ),
    "functional_mutates_input": (
        FunctionalButMutatesItsInput,
        "declared functional but changed",
    ),
    "in_place_returns_copy": (InPlaceButReturnsACopy, "declared in place but returned a new"),
    "modified_without_entry": (ModifiedWithoutAnAppliedEntry, "modified=True disagrees"),
    "applied_but_unmodified": (AppliedButSaysUnmodified, "modified=False disagrees"),
}


@pytest.mark.parametrize("case", BROKEN_PASSES.values(), ids=list(BROKEN_PASSES))
def test_a_pass_that_breaks_its_contract_raises(case) -> None:
    broken, message = case
    with pytest.raises(PassContractError, match=message):
        broken()(conv_bn())


def test_a_functional_pass_that_copies_first_keeps_its_contract() -> None:
    model = conv_bn()
    before = model.SerializeToString()
    result = RenamesACopy()(model)
    assert result.model.graph.node[0].name == "renamed"
    assert model.SerializeToString() == before


MIXED = """G (float[2,3,5,5] X) => (float[2,4,3,3] Y, float[2,6,3,3] Z) {
    A = Conv (X, W)
    Y = BatchNormalization (A, g, b, m, v)
    T = BatchNormalization (Y, pg, pb, pm, pv)
    Z = Conv <pads=[1,1,1,1]> (T, V)
}"""


def mixed_model() -> onnx.ModelProto:
    """One BN that folds, one before a padded Conv that is kept."""
    return parse(
        MIXED,
        {"W": w(4, 3, 3, 3), "V": w(6, 4, 3, 3), **bn_params(4), **bn_params(4, prefix="p")},
    )


def test_fold_batch_norm_is_in_place_and_its_ensures_holds() -> None:
    model = mixed_model()
    fold = FoldBatchNorm()
    result = fold(model, "mixed.onnx")
    assert result.model is model and result.modified
    assert result.counts() == Counter({FOLDED: 1, KEPT: 1})
    assert ops(model) == Counter({"Conv": 2, "BatchNormalization": 1})
    fold.ensures(model, result)  # holds when checked again on its own


class ForgetsKeptEntries(FoldBatchNorm):
    def call(self, model):
        done = super().call(model)
        return PassResult(
            done.model, done.modified, tuple(e for e in done.ledger if e.applied)
        )


class ClaimsKeptAsFolded(FoldBatchNorm):
    def call(self, model):
        done = super().call(model)
        ledger = tuple(dataclasses.replace(e, action=FOLDED) for e in done.ledger)
        return PassResult(done.model, done.modified, ledger)


@pytest.mark.parametrize(
    "broken", [ForgetsKeptEntries, ClaimsKeptAsFolded], ids=["forgets_kept", "claims_folded"]
)
def test_fold_batch_norm_ensures_catches_a_ledger_that_hides_a_kept_bn(broken) -> None:
    with pytest.raises(PassContractError, match="1 BatchNormalization left in the graph"):
        broken()(mixed_model())
