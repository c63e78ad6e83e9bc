"""fuse-norms (normdeploy/passes/fuse_norms.py through normdeploy.fuse_norms): every spelling of
a decomposed LayerNorm/RMSNorm becomes one native op at the opsets that have it, opset
conversion on request, and everything that only looks like a norm is left exactly as it was.

Each fused graph is checked three ways: its op histogram, ``onnx.checker`` (full check), and
its outputs against the unfused graph (onnxruntime, optimizations off) and against the float64
NumPy oracle (normdeploy.reference).
"""

from __future__ import annotations

import io
from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from fold_support import ops, run
from norm_graphs import (
    BETA,
    EPS,
    GAMMA,
    ROOTS,
    Graph,
    layernorm_graph,
    leading_axis,
    magnitude,
    rmsnorm_graph,
)
from onnx import TensorProto, helper

import normdeploy
from normdeploy.census import inspect
from normdeploy.exporting import exporter_quiet
from normdeploy.folding import run_pass
from normdeploy.onnx_graph import default_opset, graph_input_specs
from normdeploy.passes import FUSED, KEPT
from normdeploy.passes.fuse_norms import Confirmation, FuseNorms
from normdeploy.reference import layer_norm, rms_norm
from normdeploy.verification.feeds import make_feeds
from normdeploy.verification.runners import OrtRunner

# Fused vs unfused graph. fp32: rows of 8 values, the two differ by re-rounding only (~1e-7
# measured); 1e-5 is far below what a lost epsilon (EPS=1e-3) or scale would cost. fp16: the
# native op keeps its statistics in float32 where the decomposition rounds each step to fp16;
# outputs of size ≤ 4 differ by a few fp16 ulps (~2e-3), inside the documented fp16 1e-2.
TOL = {np.float32: (1e-5, 1e-5), np.float16: (1e-2, 1e-2)}
# Fused graph vs the float64 oracle: fp32 ~2e-7 measured; fp16 output rounding (ulp 2e-3 at 4).
ORACLE_ATOL = {np.float32: 1e-5, np.float16: 1e-2}
NATIVE = {"LayerNorm": "LayerNormalization", "RMSNorm": "RMSNormalization"}


def oracle(kind: str, x: np.ndarray, affine: bool, k: int = 1) -> np.ndarray:
    normalized = x.shape[-k:]
    if kind == "LayerNorm":
        return layer_norm(
            x, normalized, GAMMA if affine else None, BETA if affine else None, EPS
        )
    return rms_norm(x, normalized, GAMMA if affine else None, EPS)


def fuse_and_check(
    model: onnx.ModelProto,
    fused: int,
    *,
    opset: int | None = None,
    dtype=np.float32,
    expect: Counter | None = None,
):
    """fuse_norms (with its own checks), then: the caller's model untouched, the fused count,
    every kept entry with a reason, the op histogram, the full checker, and numerics against
    the unfused graph."""
    before = model.SerializeToString()
    result = normdeploy.fuse_norms(model, opset=opset)
    assert model.SerializeToString() == before, "fuse_norms mutated the caller's ModelProto"
    assert sum(e.action == FUSED for e in result.ledger) == fused, result.to_text()
    assert all(e.reason for e in result.ledger), result.to_text()
    if expect is not None:
        assert ops(result.model) == expect, result.to_text()
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    rtol, atol = TOL[dtype]
    ra, rb = run(model), run(result.model)
    for name in ra:
        np.testing.assert_allclose(rb[name], ra[name], rtol=rtol, atol=atol, err_msg=name)
    return result


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def x_feed(model: onnx.ModelProto) -> np.ndarray:
    """The stress input fold_support.run feeds (seeded), to give the oracle the same x."""
    return make_feeds(graph_input_specs(model), batch_size=2, seed=0)["x"]


# ----------------------------------------------------------------------------- every spelling


DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])


@DTYPES
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_every_layernorm_spelling_becomes_one_layernormalization(square, root, affine, dtype):
    g, y = layernorm_graph(square, root, affine, dtype=dtype)
    model = g.model(y, opset=18)
    result = fuse_and_check(model, 1, dtype=dtype, expect=Counter({"LayerNormalization": 1}))
    native = result.model.graph.node[0]
    attrs = attributes(native)
    # the epsilon the decomposition adds, as its dtype holds it (fp16: 0.0010004)
    assert attrs["axis"] == -1 and attrs["epsilon"] == float(np.float32(dtype(EPS)))
    assert attrs["stash_type"] == TensorProto.FLOAT  # fp16 statistics in float32
    assert len(native.input) == (3 if affine else 2)
    entry = result.ledger[0]
    assert (entry.node, entry.target, entry.target_op) == (
        "mean",
        native.name,
        "LayerNormalization",
    )
    assert "confirmed: e = " in entry.reason and "max |Δ|" in entry.reason
    got = run(result.model)[y]
    np.testing.assert_allclose(
        got, oracle("LayerNorm", x_feed(model), affine), atol=ORACLE_ATOL[dtype]
    )


@DTYPES
@pytest.mark.parametrize("scale", [True, False], ids=["scale", "plain"])
@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_every_rmsnorm_spelling_becomes_one_rmsnormalization(square, root, scale, dtype):
    g, y = rmsnorm_graph(square, root, scale, opset=18, dtype=dtype)
    model = g.model(y, opset=23)
    result = fuse_and_check(model, 1, dtype=dtype, expect=Counter({"RMSNormalization": 1}))
    native = result.model.graph.node[0]
    assert native.input[0] == "x" and native.output[0] == y
    got = run(result.model)[y]
    np.testing.assert_allclose(
        got, oracle("RMSNorm", x_feed(model), scale), atol=ORACLE_ATOL[dtype]
    )


@pytest.mark.parametrize(
    ("axes", "opset"), [((-2, -1), 18), ((1, 2), 17)], ids=["negative_18", "positive_attr_17"]
)
def test_a_layernorm_over_two_trailing_axes_gets_axis_minus_2_and_a_2d_scale(axes, opset):
    g = Graph()
    mean = g.mean("x", "mean", axes, opset)
    d = g.op("Sub", "x", mean, out="d")
    ve = g.op("Add", g.mean(g.square(d, "mul", "sq"), "var", axes, opset),
              g.const("eps", EPS), out="ve")  # fmt: skip
    gamma = (np.random.default_rng(3).random((4, 8)) + 0.5).astype(np.float32)
    y = g.op("Mul", g.normalize(d, ve, "sqrt_div"), g.const("gamma", gamma), out="y")
    model = g.model(y, opset=opset)
    result = fuse_and_check(model, 1, expect=Counter({"LayerNormalization": 1}))
    native = result.model.graph.node[0]
    assert attributes(native)["axis"] == -2
    # the (4, 8) gamma is exactly the normalized shape: reused as it is, no copy
    assert native.input[1] == "gamma"
    expected = layer_norm(x_feed(model), (4, 8), gamma, None, EPS)
    np.testing.assert_allclose(run(result.model)["y"], expected, atol=1e-5)


def test_affine_constants_with_leading_ones_are_reshaped_to_the_normalized_shape():
    g = Graph()
    mean = g.mean("x", "mean")
    d = g.op("Sub", "x", mean, out="d")
    ve = g.op("Add", g.mean(g.square(d, "pow", "sq"), "var"), g.const("eps", EPS), out="ve")
    y = g.op("Mul", g.normalize(d, ve, "sqrt_div"), g.const("gamma", GAMMA.reshape(1, 1, 8)),
             out="scaled")  # fmt: skip
    y = g.op("Add", y, g.const("beta", np.float32(0.25)), out="y")  # a scalar bias
    model = g.model(y)
    result = fuse_and_check(model, 1, expect=Counter({"LayerNormalization": 1}))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    native = result.model.graph.node[0]
    assert inits[native.input[1]].shape == (8,) and inits[native.input[2]].shape == (8,)
    np.testing.assert_array_equal(inits[native.input[2]], np.full(8, 0.25, np.float32))
    assert set(inits) == {native.input[1], native.input[2]}  # the old constants are gone


def test_a_per_row_mul_after_the_norm_is_not_its_scale_and_stays():
    """Mul by a (4, 1) constant scales along a non-normalized axis: the norm fuses without
    it, and the Mul stays where it was."""
    g, y = rmsnorm_graph(scale=False)
    rows = np.arange(1, 5, dtype=np.float32).reshape(4, 1)
    y = g.op("Mul", y, g.const("rows", rows), out="y")
    model = g.model(y, opset=23)
    result = fuse_and_check(model, 1, expect=Counter({"RMSNormalization": 1, "Mul": 1}))
    expected = rms_norm(x_feed(model), 8, None, EPS) * rows
    np.testing.assert_allclose(run(result.model)["y"], expected, atol=1e-5)


# ----------------------------------------------------------------------------- opsets


OPSET_CASES = {
    # id: (norm, model opset, opset asked for, fused)
    "ln_12": ("LayerNorm", 12, None, 0),
    "ln_12_to_17": ("LayerNorm", 12, 17, 1),
    "ln_17": ("LayerNorm", 17, None, 1),
    "ln_18": ("LayerNorm", 18, None, 1),
    "ln_23": ("LayerNorm", 23, None, 1),
    "rms_12_to_23": ("RMSNorm", 12, 23, 1),
    "rms_18": ("RMSNorm", 18, None, 0),
    "rms_18_to_23": ("RMSNorm", 18, 23, 1),
    "rms_23": ("RMSNorm", 23, None, 1),
}


@pytest.mark.parametrize("case", OPSET_CASES.values(), ids=list(OPSET_CASES))
def test_fuses_at_the_opsets_that_have_the_op_and_converts_only_when_asked(case):
    norm, model_opset, asked, fused = case
    build = layernorm_graph if norm == "LayerNorm" else rmsnorm_graph
    g, y = build(opset=model_opset)
    model = g.model(y, opset=model_opset)
    expect = Counter({NATIVE[norm]: 1}) if fused else ops(model)
    result = fuse_and_check(model, fused, opset=asked, expect=expect)
    final = default_opset(result.model)
    assert final == (asked or model_opset)  # the opset changes only when asked
    if asked is None:
        assert result.conversion is None
    else:
        assert result.conversion.to_opset == asked and result.conversion.verified is True
        assert result.conversion.from_opset == model_opset
        assert "converted vs input" in result.to_text()
    if not fused:
        needed = 17 if norm == "LayerNorm" else 23
        (note,) = result.notes
        assert f"{NATIVE[norm]} needs opset >= {needed}" in note
        assert (
            f"imports opset {model_opset}" in note
            and f"converting the model to opset {needed} fuses them" in note
        )
        assert result.ledger[0].action == KEPT and "needs opset" in result.ledger[0].reason
        assert result.model.SerializeToString() == model.SerializeToString()
    else:
        assert result.notes == ()
        np.testing.assert_allclose(
            run(result.model)[y], oracle(norm, x_feed(model), True), atol=1e-5
        )


def test_inplace_conversion_rewrites_the_callers_model_and_checks_against_what_it_was():
    g, y = layernorm_graph(opset=12)
    model = g.model(y, opset=12)
    x = x_feed(model)
    before = OrtRunner(model.SerializeToString()).infer({"x": x})[y]
    result = normdeploy.fuse_norms(model, opset=17, inplace=True)
    assert result.model is model and default_opset(model) == 17
    assert ops(model) == {"LayerNormalization": 1}
    assert result.conversion.verified and result.verified  # both against the opset-12 graph
    # fp32 LayerNorm over 8 values: ~1e-7 measured
    np.testing.assert_allclose(OrtRunner(model).infer({"x": x})[y], before, atol=1e-5)
    again = normdeploy.fuse_norms(model, opset=17)  # already there: nothing to convert
    assert again.conversion is None and not again.modified


# ----------------------------------------------------------------------------- refusals


def _intermediate_is_an_output():
    g, y = layernorm_graph(root="sqrt_reciprocal_mul")
    return g.model(
        y, extra_outputs=["std"]
    ), "'std' inside the decomposed LayerNorm is a graph output"


def _intermediate_read_elsewhere():
    g, y = rmsnorm_graph()
    side = g.op("Relu", "ms", out="side")
    return g.model(
        y, opset=23, extra_outputs=[side]
    ), "'ms' inside the decomposed RMSNorm is also read by Relu"


def _eps_not_a_scalar():
    g = Graph()
    ms = g.mean(g.square("x", "pow", "sq"), "ms")
    ve = g.op("Add", ms, g.const("eps", np.full((1, 1, 8), EPS)), out="ve")
    return g.model(
        g.normalize("x", ve, "sqrt_div"), opset=23
    ), "epsilon 'eps' is not a constant scalar"


def _eps_computed():
    g = Graph()
    e = g.input("e", [1])
    ms = g.mean(g.square("x", "pow", "sq"), "ms")
    ve = g.op("Add", ms, e, out="ve")
    return g.model(
        g.normalize("x", ve, "sqrt_div"), opset=23
    ), "epsilon 'e' is not a constant scalar"


def _normalized_dim_not_static():
    g, y = layernorm_graph()
    g.x_shape = ["N", 4, "D"]
    return g.model(y), "normalized dims ['D'] of 'x' are not static"


def _constant_grows_the_rank():
    g = Graph()
    ms = g.mean(g.square("x", "pow", "sq"), "ms")
    ve = g.op("Add", ms, g.const("eps", np.full((1, 1, 1, 1), EPS)), out="ve")
    model = g.model(g.normalize("x", ve, "sqrt_div"), opset=23)
    model.graph.output[0].type.tensor_type.shape.dim.add()  # the output really is 4-D
    return model, "the constant 'eps' has 4 dims, the input 3"


REFUSED = {
    "intermediate_is_a_graph_output": _intermediate_is_an_output,
    "intermediate_read_elsewhere": _intermediate_read_elsewhere,
    "eps_not_a_scalar": _eps_not_a_scalar,
    "eps_computed": _eps_computed,
    "normalized_dim_not_static": _normalized_dim_not_static,
    "constant_grows_the_rank": _constant_grows_the_rank,
}


@pytest.mark.parametrize("build", REFUSED.values(), ids=list(REFUSED))
def test_a_match_that_is_not_provably_exact_is_kept_with_the_reason(build):
    model, reason = build()
    result = fuse_and_check(model, 0, expect=ops(model))
    (entry,) = result.ledger
    assert entry.action == KEPT and reason in entry.reason, entry.reason
    assert not result.modified and result.verification == ()
    assert result.model.SerializeToString() == model.SerializeToString()


def _channels_first_layernorm():
    """ConvNeXt's channels-first LayerNorm: mean and variance over axis 1 of (N, C, H, W)."""
    g = Graph(x_shape=("N", 4, 3, 5))
    mean = g.mean("x", "mean", (1,))
    d = g.op("Sub", "x", mean, out="d")
    ve = g.op("Add", g.mean(g.square(d, "pow", "sq"), "var", (1,)), g.const("eps", EPS),
              out="ve")  # fmt: skip
    y = g.normalize(d, ve, "sqrt_div")
    model = g.model(y)
    model.graph.output[0].type.tensor_type.shape.dim.add()
    return model


def _mean_without_keepdims():
    """keepdims=0 on (8, 8, 8): the (8, 8) root broadcasts along the last axis, dividing
    x[n, i, j] by the root of sample i's row j — a valid graph, not a norm."""
    g = Graph(x_shape=(8, 8, 8))
    ms = g.mean(g.square("x", "mul", "sq"), "ms", keepdims=0)
    ve = g.op("Add", ms, g.const("eps", EPS), out="ve")
    return g.model(g.normalize("x", ve, "sqrt_div"), opset=23)


LOOK_ALIKES = {  # model, what the ledger says
    "magnitude": (lambda: magnitude()[0].model("y"), "look-alike (Pow/Add/Sqrt): the square is not averaged by a ReduceMean"),
    "rms_over_a_leading_axis": (lambda: leading_axis()[0].model("normed", opset=23), "look-alike (Pow/ReduceMean/Add/Sqrt): ReduceMean over axes [-2]: not the trailing axes"),
    "mean_without_keepdims": (_mean_without_keepdims, "look-alike (Mul/ReduceMean/Add/Sqrt): ReduceMean with keepdims=0 cannot broadcast back over its input"),
    "channels_first_layernorm": (_channels_first_layernorm, "look-alike (Pow/ReduceMean/Add/Sqrt): ReduceMean over axes [-3]: not the trailing axes"),
}  # fmt: skip


@pytest.mark.parametrize("case", LOOK_ALIKES.values(), ids=list(LOOK_ALIKES))
def test_look_alikes_are_left_exactly_as_they_were_and_the_ledger_says_why(case):
    build, reason = case
    model = build()
    result = fuse_and_check(model, 0, expect=ops(model))
    (entry,) = result.ledger
    assert entry.action == KEPT and entry.reason.startswith(reason), entry.reason
    assert result.model.SerializeToString() == model.SerializeToString()


def layernorm_graph_into(g: Graph, x: str, prefix: str) -> str:
    """A decomposed affine LayerNorm of ``x`` added to ``g``, its values prefixed."""
    mean = g.mean(x, f"{prefix}.mean")
    d = g.op("Sub", x, mean, out=f"{prefix}.d")
    sq = g.op("Mul", d, d, out=f"{prefix}.sq")
    ve = g.op(
        "Add", g.mean(sq, f"{prefix}.var"), g.const(f"{prefix}.eps", EPS), out=f"{prefix}.ve"
    )
    normed = g.op("Div", d, g.op("Sqrt", ve, out=f"{prefix}.std"), out=f"{prefix}.normed")
    scaled = g.op("Mul", normed, g.const(f"{prefix}.gamma", GAMMA), out=f"{prefix}.scaled")
    return g.op("Add", scaled, g.const(f"{prefix}.beta", BETA), out=f"{prefix}.y")


def test_a_per_norm_confirmation_that_fails_keeps_that_norm_and_fuses_the_others():
    """Two LayerNorms; the confirmation (the pass's seam for the caller's numerics) rejects the
    first: it stays decomposed, the second fuses, and the ledger gives the numbers."""
    g = Graph()
    first = g.op("Relu", layernorm_graph_into(g, "x", "a"), out="a.out")
    y = layernorm_graph_into(g, first, "b")
    model = g.model(y)

    def reject_first(reference, candidate):
        names = [o.name for o in candidate.graph.output]
        assert len(names) == 2 and len(reference.graph.node) > len(candidate.graph.node)
        return {
            names[0]: Confirmation(False, "max |Δ| 0.5"),
            names[1]: Confirmation(True, "ok"),
        }

    result = run_pass(FuseNorms(reject_first), model)
    assert [e.action for e in result.ledger] == [KEPT, FUSED], result.to_text()
    assert "not confirmed against its decomposition: max |Δ| 0.5" in result.ledger[0].reason
    assert ops(result.model)["LayerNormalization"] == 1 and ops(result.model)["Sqrt"] == 1
    assert result.verified  # the whole graph still computes what it did
    silent = run_pass(FuseNorms(lambda reference, candidate: {}), model)
    assert [e.action for e in silent.ledger] == [KEPT, KEPT]  # no answer is no confirmation
    assert all("returned no comparison" in e.reason for e in silent.ledger)


def test_a_norm_onnxruntime_cannot_confirm_is_kept_unless_no_check_was_asked_for():
    """bfloat16: onnxruntime's CPU provider has no bfloat16 Pow, so the fused norm cannot be
    compared with its decomposition: refused. Without verification it is fused, and the
    ledger says it was not confirmed."""
    g, y = rmsnorm_graph(dtype=ml_dtypes.bfloat16)
    model = g.model(y, opset=23)
    checked = normdeploy.fuse_norms(model)
    (entry,) = checked.ledger
    assert entry.action == KEPT and "onnxruntime cannot run the pair" in entry.reason
    assert checked.model.SerializeToString() == model.SerializeToString()
    unchecked = normdeploy.fuse_norms(model, verify=False)
    (entry,) = unchecked.ledger
    assert entry.action == FUSED and "not confirmed per norm" in entry.reason
    assert ops(unchecked.model) == {"RMSNormalization": 1}
    onnx.checker.check_model(unchecked.model, full_check=True)
    native = unchecked.model.graph.node[0]
    assert attributes(native)["stash_type"] == TensorProto.FLOAT


def test_a_norm_inside_a_subgraph_is_left_as_it_was():
    body, y = layernorm_graph()
    branch = helper.make_graph(
        body.nodes, "then", [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        body.inits,
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_copy"])], "else", [],
        [helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, None)],
    )  # fmt: skip
    g = Graph()
    flag = g.input("flag", [])
    g.extra_inputs[-1].type.tensor_type.elem_type = TensorProto.BOOL
    g.nodes.append(
        helper.make_node("If", [flag], ["y"], then_branch=branch, else_branch=other)
    )
    model = g.model("y")
    result = normdeploy.fuse_norms(model)
    (entry,) = result.ledger
    assert entry.action == KEPT and "inside a subgraph: left as it was" in entry.reason
    assert result.model.SerializeToString() == model.SerializeToString()


# ----------------------------------------------------------------------------- exported models


class HandWrittenLayerNorm(torch.nn.Module):
    """A LayerNorm written out, as PaddleOCR-style recognizers and older code bases do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / torch.sqrt(s + 1e-6) * self.weight + self.bias


class SequenceMixer(torch.nn.Module):
    """Linear → LayerNorm → GELU → Linear → LayerNorm over (N, T, 48) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(48, 48)
        self.norm1 = HandWrittenLayerNorm(48)
        self.fc2 = torch.nn.Linear(48, 48)
        self.norm2 = torch.nn.LayerNorm(48)
        with torch.no_grad():
            self.norm2.weight.uniform_(0.5, 1.5)
            self.norm2.bias.normal_()

    def forward(self, x):
        return self.norm2(self.fc2(torch.nn.functional.gelu(self.norm1(self.fc1(x)))))


def test_a_torchscript_opset_12_export_fuses_at_17_and_the_census_maps_the_modules():
    """PP-OCR-style: TorchScript at opset 12 writes both LayerNorms decomposed. With opset=17
    they become LayerNormalization under the modules' names, and the output is PyTorch's."""

    torch.manual_seed(0)
    module = SequenceMixer().eval()
    x = torch.randn(2, 10, 48)
    buf = io.BytesIO()
    with exporter_quiet():
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=12,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    model = onnx.load_from_string(buf.getvalue())
    assert ops(model)["Sqrt"] == 2
    result = fuse_and_check(model, 2, opset=17)
    assert ops(result.model)["LayerNormalization"] == 2 and "Sqrt" not in ops(result.model)
    assert [e.target for e in result.ledger] == [
        "/norm1/LayerNormalization",
        "/norm2/LayerNormalization",
    ]
    # nn.LayerNorm is a module the census knows: mapped by the new node's name, confirmed
    census = inspect(result.model, module=module, example_inputs=(x,))
    assert [(e.module_path, e.representation, e.confirmed) for e in census.entries] == [
        ("norm2", "LayerNormalization", True)
    ]
    assert census.op_counts == {"LayerNormalization": 2} and not census.lint_codes()
    sess = OrtRunner(result.model)
    got = sess.infer({"x": x.numpy()})[result.model.graph.output[0].name]
    with torch.no_grad():
        want = module(x).numpy()
    # fp32, two LayerNorms over 48 values after Linear layers: ~1e-6 measured; 1e-4 is the
    # documented fp32 default.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
