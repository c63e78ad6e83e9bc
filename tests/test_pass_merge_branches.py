"""Branch merging (normdeploy/passes/merge_branches.py) inside fold-bn, on small graphs written as
text: op histogram, one ledger entry per BatchNormalization (folded / merged / kept with a
reason) and per sum, onnx.checker (full), the caller's model unchanged, and numerics against the
unmerged graph run by onnxruntime with optimizations off (the independent oracle). Also the
RepVGG-A0 goal: 61 BatchNormalization → 0, 22 Conv, equal to PyTorch eval under verify()."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from fold_support import branch, graph, identity, initializer, ops, run, w

from normdeploy.folding import fold_bn
from normdeploy.passes import KEPT, MERGED
from normdeploy.passes.merge_branches import MergeParallelBranches

# Merging re-associates each output's float32 sum (≤ 8·3·3 products per branch, 3-5 branches):
# rounding of order √n·eps ≈ 1e-6 of the output's scale. 1e-5 of that scale leaves ~10× margin;
# a tap one position off, a wrong scale or a lost bias is off by ~10⁻¹ of it.
REL32 = 1e-5
# float16 weights and activations: eps 1e-3, the same ~10 products per partial sum → 1e-2.
REL16 = 1e-2


def assert_close_to_scale(reference: onnx.ModelProto, merged: onnx.ModelProto, rel: float):
    ra, rb = run(reference), run(merged)
    assert list(ra) == list(rb)
    for name in ra:
        expected = ra[name].astype(np.float64)
        scale = float(np.abs(expected).max())
        err = float(np.abs(rb[name].astype(np.float64) - expected).max())
        assert err <= rel * scale, f"{name}: max |Δ| {err:.3g} > {rel:g} × scale {scale:.3g}"


def merge_and_check(model: onnx.ModelProto, expect_ops: dict[str, int], rel: float = REL32):
    """fold-bn with merging (no built-in verify), then every check of the module docstring."""
    before = model.SerializeToString()
    result = fold_bn(model, verify=False)
    assert model.SerializeToString() == before, "fold_bn mutated the caller's ModelProto"
    assert ops(result.model) == Counter(expect_ops), result.to_text()
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert len([e for e in result.ledger if not e.op]) == n_bn  # one entry per BN
    assert len(result.skipped) == ops(result.model)["BatchNormalization"]
    assert all(e.reason for e in result.ledger if e.action == KEPT), result.to_text()
    onnx.checker.check_model(result.model, full_check=True)
    onnx.shape_inference.infer_shapes(result.model, check_type=True, strict_mode=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert_close_to_scale(model, result.model, rel)
    return result


def entry(result, op: str = ""):
    """The ledger's single entry for a sum (``op``) or the single merged BatchNormalization."""
    found = [e for e in result.ledger if e.op == op and (op or e.action == MERGED)]
    assert len(found) == 1, result.to_text()
    return found[0]


# ----------------------------------------------------------------------------- merged blocks


@pytest.mark.parametrize("group", [1, 2, 8], ids=["dense", "group2", "depthwise"])
def test_repvgg_block_becomes_one_conv(group) -> None:
    """conv3×3+BN + conv1×1+BN + BN(x), summed in timm's order ((1×1 + 3×3) + identity)."""
    model = graph(
        "float[N,8,6,6] X", "float[N,8,6,6] Y",
        branch("k", "X", 3, 8, 8, group=group), branch("p", "X", 1, 8, 8, group=group),
        identity("i", "X", 8),
        body="s = Add (p, k)\nt = Add (s, i)\nY = Relu (t)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1, "Relu": 1})
    assert len(result.folded) == 2 and len(result.merged) == 1 and not result.skipped
    bn = entry(result)
    assert bn.node == "BatchNormalization->i" and bn.target_op == "Conv"
    assert "identity BN merged into Conv" in bn.reason and "3 branches" in bn.reason
    add = entry(result, "Add")
    assert add.action == MERGED and add.target == bn.target
    assert "Conv 'Conv->p'" in add.reason  # labelled by its output after the fold
    text = result.to_text()
    assert "2 of 3 BatchNormalization folded, 1 merged, 0 kept" in text
    assert "1 of 1 sums of parallel branches merged" in text
    data = result.to_dict()
    assert (data["folded"], data["merged"], data["kept"], data["sums_merged"]) == (2, 1, 0, 1)
    # --no-merge: the identity BN stays, with fold-bn's reason
    kept = fold_bn(model, verify=False, merge=False)
    assert ops(kept.model) == Counter(
        {"Conv": 2, "BatchNormalization": 1, "Add": 2, "Relu": 1}
    )
    assert not any(e.op for e in kept.ledger) and len(kept.skipped) == 1


def test_stride2_block_without_identity_merges_its_two_convs() -> None:
    model = graph(
        "float[N,4,7,7] X", "float[N,8,4,4] Y",
        branch("k", "X", 3, 4, 8, "pads=[1,1,1,1], strides=[2,2]"),
        branch("p", "X", 1, 4, 8, "strides=[2,2]"),
        body="s = Add (p, k)\nY = Relu (s)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1, "Relu": 1})
    assert len(result.folded) == 2 and not result.merged
    assert entry(result, "Add").action == MERGED


@pytest.mark.parametrize("form", ["add_chain", "sum"])
def test_mobileone_block_kxk_branches_scale_and_identity_depthwise(form) -> None:
    """MobileOne's depthwise block: three 3×3 branches, a 1×1 "scale" branch and an identity,
    all group=C, as timm writes it (a chain of Adds) and as one Sum."""
    c = 6
    parts = [
        *(branch(f"k{i}", "X", 3, c, c, group=c) for i in range(3)),
        branch("sc", "X", 1, c, c, group=c),
        identity("i", "X", c),
    ]
    if form == "add_chain":
        body = "a = Add (sc, i)\nb = Add (a, k0)\nd = Add (b, k1)\nY = Add (d, k2)\n"
    else:
        body = "Y = Sum (sc, i, k0, k1, k2)\n"
    model = graph("float[N,6,5,5] X", "float[N,6,5,5] Y", *parts, body=body)
    result = merge_and_check(model, {"Conv": 1})
    assert len(result.folded) == 4 and len(result.merged) == 1
    assert "5 branches" in entry(result).reason


def test_conv_with_the_bare_input_merges_as_an_identity_of_scale_one() -> None:
    model = graph(
        "float[N,4,5,5] X",
        "float[N,4,5,5] Y",
        branch("k", "X", 3, 4, 4),
        body="Y = Add (k, X)\n",
    )
    result = merge_and_check(model, {"Conv": 1})
    assert "identity 'X'" in entry(result, "Add").reason


def test_aligned_taps_off_centre_merge_too() -> None:
    """A 2×2 kernel padded (1, 0) reads the top-left taps of a 3×3 padded 1: exact, merged."""
    model = graph(
        "float[N,4,6,6] X", "float[N,4,6,6] Y",
        branch("k", "X", 3, 4, 4), branch("q", "X", 2, 4, 4, "pads=[1,1,0,0]"),
        body="Y = Add (k, q)\n",
    )  # fmt: skip
    merge_and_check(model, {"Conv": 1})


@pytest.mark.parametrize(
    ("auto_pad", "strides", "merges"),
    [("SAME_UPPER", 1, True), ("SAME_LOWER", 1, True), ("SAME_UPPER", 2, False)],
    ids=["same_upper", "same_lower", "same_upper_stride2"],
)
def test_auto_pad_same_merges_at_stride_1_only(auto_pad, strides, merges) -> None:
    attrs = f'auto_pad="{auto_pad}", strides=[{strides},{strides}]'
    out = "6,6" if strides == 1 else "3,3"
    model = graph(
        "float[N,4,6,6] X", f"float[N,4,{out}] Y",
        branch("k", "X", 3, 4, 4, attrs), branch("p", "X", 1, 4, 4, f"strides=[{strides},{strides}]"),
        body="Y = Add (k, p)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1} if merges else {"Conv": 2, "Add": 1})
    if not merges:
        assert "auto_pad=SAME_UPPER with a stride" in entry(result, "Add").reason


def test_float16_block_merges_in_float64_and_casts_once() -> None:
    f16 = np.float16
    model = graph(
        "float16[N,4,5,5] X", "float16[N,4,5,5] Y",
        branch("k", "X", 3, 4, 4, dtype=f16), branch("p", "X", 1, 4, 4, dtype=f16),
        identity("i", "X", 4, f16),
        body="s = Add (k, p)\nY = Add (s, i)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1}, rel=REL16)
    conv = result.model.graph.node[0]
    assert initializer(result.model, conv.input[1]).dtype == f16


def test_shared_weight_is_not_rewritten_in_place() -> None:
    """The 3×3 weight is also read by a conv outside the block: it keeps its values there and
    the merged conv gets a fresh initializer."""
    k_text, k_inits = branch("k", "X", 3, 4, 4)
    model = graph(
        "float[N,4,5,5] X, float[N,4,5,5] Z", "float[N,4,5,5] Y, float[N,4,5,5] V",
        (k_text, k_inits), branch("p", "X", 1, 4, 4), identity("i", "X", 4),
        body="s = Add (k, p)\nY = Add (s, i)\nV = Conv <pads=[1,1,1,1]> (Z, k_W)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 2})
    np.testing.assert_array_equal(initializer(result.model, "k_W"), k_inits["k_W"])
    merged = next(n for n in result.model.graph.node if n.input[0] == "X")
    assert merged.input[1] != "k_W"


# ----------------------------------------------------------------------------- kept, with reasons


def test_branch_whose_padding_does_not_line_up_is_kept_and_the_rest_merges() -> None:
    """A second 3×3 padded (0, 2) reads two pixels up-left of the first (same output size):
    no tap of the base kernel reads there. The first conv and the identity still merge."""
    model = graph(
        "float[N,4,6,6] X", "float[N,4,6,6] Y",
        branch("k", "X", 3, 4, 4), branch("s", "X", 3, 4, 4, "pads=[0,0,2,2]"),
        identity("i", "X", 4),
        body="a = Add (k, s)\nY = Add (a, i)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 2, "Add": 1})
    assert len(result.merged) == 1
    add = entry(result, "Add")
    assert add.action == MERGED
    assert "kept Conv 'Conv->s': padding does not line up" in add.reason


def test_two_convs_that_do_not_line_up_keep_the_sum() -> None:
    model = graph(
        "float[N,4,6,6] X", "float[N,4,6,6] Y",
        branch("k", "X", 3, 4, 4), branch("s", "X", 3, 4, 4, "pads=[0,0,2,2]"),
        body="Y = Add (k, s)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 2, "Add": 1})
    add = entry(result, "Add")
    assert add.action == KEPT and "padding does not line up" in add.reason
    assert "0 of 1 sums of parallel branches merged" in result.to_text()
    assert not result.skipped  # a kept sum is not a kept BatchNormalization


def test_different_dilations_are_kept() -> None:
    model = graph(
        "float[N,4,8,8] X", "float[N,4,8,8] Y",
        branch("k", "X", 3, 4, 4), branch("d", "X", 3, 4, 4, "pads=[2,2,2,2], dilations=[2,2]"),
        body="Y = Add (k, d)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 2, "Add": 1})
    assert "dilations 2×2 differ from the base's 1×1" in entry(result, "Add").reason


def test_non_linear_operand_stays_in_the_sum() -> None:
    model = graph(
        "float[N,4,5,5] X", "float[N,4,5,5] Y",
        branch("k", "X", 3, 4, 4), branch("p", "X", 1, 4, 4),
        body="r = Relu (X)\nY = Sum (k, p, r)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1, "Relu": 1, "Add": 1})
    assert "kept Relu 'Relu->r': not a linear branch" in entry(result, "Sum").reason


def test_a_sum_without_parallel_linear_branches_is_not_a_candidate() -> None:
    """A ResNet-style residual (conv of another tensor + x) and conv(x) + sigmoid(x): no group
    of two linear branches on one tensor, so no ledger entry and nothing changed."""
    model = graph(
        "float[N,4,5,5] X", "float[N,4,5,5] Y, float[N,4,5,5] V",
        branch("k", "X", 3, 4, 4), branch("r", "k", 3, 4, 4),
        body="Y = Add (r, X)\ng = Sigmoid (X)\nV = Add (k2, g)\nk2 = Conv <pads=[1,1,1,1]> (X, k_W)\n",
    )  # fmt: skip
    model.graph.node.sort(key=lambda n: n.output[0] == "V")  # k2 before its reader
    result = merge_and_check(model, {"Conv": 3, "Add": 2, "Sigmoid": 1})
    assert not any(e.op for e in result.ledger)


@pytest.mark.parametrize("reader", ["graph_output", "another_reader"])
def test_branch_with_another_reader_is_kept(reader) -> None:
    outputs = "float[N,4,5,5] Y" + (
        ", float[N,4,5,5] p" if reader == "graph_output" else ", float[N,4,5,5] R"
    )
    body = "s = Add (k, p)\nY = Add (s, i)\n" + (
        "R = Relu (p)\n" if reader != "graph_output" else ""
    )
    model = graph(
        "float[N,4,5,5] X", outputs,
        branch("k", "X", 3, 4, 4), branch("p", "X", 1, 4, 4), identity("i", "X", 4), body=body,
    )  # fmt: skip
    expected = {"Conv": 2, "Add": 1} | ({"Relu": 1} if reader != "graph_output" else {})
    result = merge_and_check(model, expected)
    words = "is a graph output" if reader == "graph_output" else "has 2 readers"
    assert f"kept Conv 'Conv->p': 'p' {words}" in entry(result, "Add").reason


def test_an_intermediate_sum_with_another_reader_ends_the_chain() -> None:
    """(k + p) is also a graph output: it merges on its own; the outer Add keeps the identity
    BN, whose only same-input partner is now that sum (not a Conv)."""
    model = graph(
        "float[N,4,5,5] X", "float[N,4,5,5] Y, float[N,4,5,5] s",
        branch("k", "X", 3, 4, 4), branch("p", "X", 1, 4, 4), identity("i", "X", 4),
        body="s = Add (k, p)\nY = Add (s, i)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1, "Add": 1, "BatchNormalization": 1})
    sums = [e for e in result.ledger if e.op]
    assert [(e.node, e.action) for e in sums] == [("Add->s", MERGED)]


def test_identity_needs_as_many_input_as_output_channels() -> None:
    """conv 4→1 + x broadcasts in the Add; an identity kernel cannot express it: kept."""
    model = graph(
        "float[N,4,5,5] X", "float[N,4,5,5] Y",
        branch("k", "X", 3, 4, 1), branch("p", "X", 1, 4, 1), body="s = Add (k, p)\nY = Add (s, X)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1, "Add": 1})
    assert (
        "an identity needs as many input as output channels (4→1)"
        in entry(result, "Add").reason
    )


def test_non_constant_weight_is_kept_with_the_identity_bn() -> None:
    model = graph(
        "float[N,4,5,5] X, float[4,4,3,3] Wk", "float[N,4,5,5] Y", identity("i", "X", 4),
        body="k = Conv <pads=[1,1,1,1]> (X, Wk)\nY = Add (k, i)\n",
    )  # fmt: skip
    result = merge_and_check(model, {"Conv": 1, "Add": 1, "BatchNormalization": 1})
    (bn,) = result.skipped
    assert "not merged" in bn.reason and "weight is not a constant" in bn.reason


def test_identity_bn_with_broken_statistics_stays_flagged_invalid() -> None:
    """The merge's entry replaces fold-bn's for the identity BN: it must keep the flag that
    makes the file flow refuse a model that computes NaN."""
    ident = identity("i", "X", 4)
    ident[1]["iv"][0] = -1.0
    model = graph(
        "float[N,4,5,5] X", "float[N,4,5,5] Y", branch("k", "X", 3, 4, 4), ident,
        body="Y = Add (k, i)\n",
    )  # fmt: skip
    result = fold_bn(model, verify=False)
    (bn,) = result.skipped
    assert bn.invalid and "var + epsilon <= 0" in bn.reason


def test_merge_pass_alone_reports_sums_and_identities() -> None:
    """The pass on its own (no fold first): the branch BNs stay, so only k and the identity,
    both on X, merge."""
    model = graph(
        "float[N,4,5,5] X", "float[N,4,5,5] Y", identity("i", "X", 4),
        body="Y = Add (k, i)\nk = Conv <pads=[1,1,1,1]> (X, kW)\n",
    )  # fmt: skip
    model.graph.node.sort(key=lambda n: n.op_type != "Conv")
    model.graph.initializer.append(onnx.numpy_helper.from_array(w(4, 4, 3, 3), "kW"))
    done = MergeParallelBranches()(model)
    assert done.modified and ops(done.model) == Counter({"Conv": 1})
    assert [(e.op, e.action) for e in done.ledger] == [("", MERGED), ("Add", MERGED)]


# ----------------------------------------------------------------------------- RepVGG-A0


def _export_keep_bn(module, x, path) -> None:
    """TorchScript export in eval mode without constant folding: every BatchNorm stays a node."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(path), dynamo=False, do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17,
        )  # fmt: skip


def test_repvgg_a0_loses_every_batchnorm_and_matches_pytorch_eval(tmp_path) -> None:
    """The goal: timm repvgg_a0's layout exported with its 61 BatchNormalization (17 identity
    branches, which no folder removes) becomes 22 Conv and 0 BatchNormalization, verified
    against the graph by fold-bn and against PyTorch eval by verify()."""
    import torch

    from models.reparam import repvgg_a0
    from normdeploy import verify
    from normdeploy.folding import fold_bn_file

    module = repvgg_a0()
    src, out = tmp_path / "a0.onnx", tmp_path / "a0.merged.onnx"
    _export_keep_bn(module, torch.randn(1, 3, 64, 64), src)
    before = ops(onnx.load(src))
    assert before["BatchNormalization"] == 61 and before["Conv"] == 44
    kept = fold_bn(src, verify=False, merge=False)
    assert len(kept.skipped) == 17  # the identity branches: no fold removes them
    result = fold_bn_file(src, out)
    assert result.verified, result.to_text()
    after = ops(onnx.load(out))
    assert after["BatchNormalization"] == 0 and after["Conv"] == 22 and after["Add"] == 0
    assert (len(result.folded), len(result.merged), len(result.skipped)) == (44, 17, 0)
    report = verify(module, out, input_shapes=[(1, 3, 64, 64)], batch_sizes=(1, 2))
    assert report, report.to_text()
