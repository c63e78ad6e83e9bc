"""The norm pattern matchers (normdeploy/census/patterns.py): every common spelling of a
decomposed LayerNorm and RMSNorm matches with what a rewrite needs (data input, axes, epsilon,
affine constants, output), and look-alikes do not match, with the reason.

Each test graph is also run in onnxruntime against the float64 numpy oracle
(normdeploy.reference), so a matched graph provably computes the norm it is called.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from norm_graphs import (
    BETA,
    EPS,
    GAMMA,
    RNG,
    ROOTS,
    SHAPE,
    Graph,
    eps_after_root,
    layernorm_graph,
    leading_axis,
    magnitude,
    other_mean,
    rms_feature,
    rmsnorm_graph,
)

from normdeploy.census import DECOMPOSED_LAYERNORM, DECOMPOSED_RMSNORM, inspect
from normdeploy.census.patterns import (
    NoMatch,
    describe_kind,
    match_at,
    match_decomposed_layernorm,
    match_decomposed_rmsnorm,
)
from normdeploy.onnx_graph import GraphIndex
from normdeploy.reference import layer_norm, rms_norm
from normdeploy.verification.runners import OrtRunner

# float32 graph vs float64 oracle on rows of 8-32 values: ~1e-6 measured; a missing eps or
# scale, or normalizing over the wrong axis, is off by > 1e-2.
ATOL = 1e-5


def run(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """The graph on signed inputs shaped like x (EPS for a scalar input); (x, first output)."""
    feeds = {}
    for vi in model.graph.input:
        scalar = not vi.type.tensor_type.shape.dim
        feeds[vi.name] = (
            np.float32(EPS) if scalar else RNG.normal(0.5, 2, SHAPE).astype(np.float32)
        )
    return feeds["x"], OrtRunner(model).infer(feeds)[model.graph.output[0].name]


def only_match(model: onnx.ModelProto):
    index = GraphIndex.of(model.graph)
    found = [m for n in model.graph.node if (m := match_at(index, n)) is not None]
    assert len(found) == 1, [m.kind for m in found]
    return found[0]


# ----------------------------------------------------------------------------- matches


@pytest.mark.parametrize("scale", [True, False], ids=["scale", "no_scale"])
@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("square", ["pow", "mul"])
def test_every_rmsnorm_spelling_matches_with_what_a_rewrite_needs(square, root, scale):
    g, y = rmsnorm_graph(square, root, scale)
    model = g.model(y)
    x, got = run(model)
    np.testing.assert_allclose(got, rms_norm(x, 8, GAMMA if scale else None, EPS), atol=ATOL)

    m = only_match(model)
    assert m.kind == DECOMPOSED_RMSNORM and m.norm == "RMSNorm"
    assert (m.data_input, m.output, m.axes, m.axis) == ("x", y, (-1,), -1)
    assert m.epsilon == pytest.approx(EPS) and m.eps_value == "eps"
    assert m.scale == ("gamma" if scale else None) and m.bias is None
    assert len(m.nodes) == len(model.graph.node)  # every node belongs to the norm
    assert m.rewrite_blocker(GraphIndex.of(model.graph)) is None


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("root", ROOTS)
def test_every_layernorm_spelling_matches_with_what_a_rewrite_needs(root, affine):
    g, y = layernorm_graph("pow", root, affine)
    model = g.model(y)
    x, got = run(model)
    expected = layer_norm(x, 8, GAMMA if affine else None, BETA if affine else None, EPS)
    np.testing.assert_allclose(got, expected, atol=ATOL)

    m = only_match(model)
    assert m.kind == DECOMPOSED_LAYERNORM and (m.data_input, m.output) == ("x", y)
    assert m.axes == (-1,) and m.epsilon == pytest.approx(EPS)
    assert (m.scale, m.bias) == (("gamma", "beta") if affine else (None, None))
    assert len(m.nodes) == len(model.graph.node)


def test_a_bfloat16_rmsnorm_matches_with_its_scale():
    """bfloat16 constants (an ml_dtypes type, numpy kind 'V') are still floats."""
    g, y = rmsnorm_graph(dtype=ml_dtypes.bfloat16)
    m = only_match(g.model(y))
    assert m.kind == DECOMPOSED_RMSNORM and m.scale == "gamma"
    assert m.epsilon == pytest.approx(EPS, rel=1e-2)  # EPS as bfloat16 holds it


@pytest.mark.parametrize(
    ("axes", "opset"), [((1, 2), 18), ((-2, -1), 17)], ids=["positive_axes_18", "attr_axes_17"]
)
def test_trailing_axes_given_positive_or_as_an_attribute_are_counted_from_the_end(axes, opset):
    g, y = layernorm_graph("mul", "sqrt_div", affine=False, axes=axes, opset=opset)
    model = g.model(y, opset=opset)
    x, got = run(model)
    np.testing.assert_allclose(got, layer_norm(x, (4, 8), eps=EPS), atol=ATOL)
    m = only_match(model)
    assert m.axes == (-2, -1) and m.axis == -2


def test_the_layernorm_inside_is_not_also_an_rmsnorm():
    """The variance half of a LayerNorm is an RMSNorm of x - mean(x): counted once, as LN."""
    g, y = layernorm_graph()
    model = g.model(y)
    index = GraphIndex.of(model.graph)
    square = next(n for n in model.graph.node if n.name == "sq")
    why = match_decomposed_rmsnorm(index, square)
    assert not why and "part of a decomposed LayerNorm" in why.reason
    census = inspect(model)
    assert census.op_counts == {DECOMPOSED_LAYERNORM: 1}
    assert [n.describe() for n in census.norm_nodes] == ["LayerNorm as decomposition"]


def test_a_computed_epsilon_still_matches_and_says_why_it_cannot_be_rewritten():
    g = Graph()
    g.input("e", [])
    ms = g.mean(g.square("x", "pow", "sq"), "ms")
    y = g.normalize("x", g.op("Add", ms, "e", out="ve"), "sqrt_div")
    m = only_match(g.model(y))
    assert m.epsilon is None and "'e' is not a constant scalar" in m.epsilon_reason


def test_an_intermediate_read_elsewhere_blocks_a_rewrite_but_not_the_census():
    g, y = rmsnorm_graph(root="sqrt_reciprocal_mul")
    model = g.model(y, extra_outputs=["std"])
    m = only_match(model)
    assert "'std' inside the decomposed RMSNorm is a graph output" in m.rewrite_blocker(
        GraphIndex.of(model.graph)
    )
    g, y = rmsnorm_graph(root="sqrt_reciprocal_mul")
    g.op("Relu", "ms", out="side")
    model = g.model(y, extra_outputs=["side"])
    assert "'ms' inside the decomposed RMSNorm is also read by Relu" in only_match(
        model
    ).rewrite_blocker(GraphIndex.of(model.graph))


# ----------------------------------------------------------------------------- look-alikes


LOOK_ALIKES = {  # builder, the reason one of the matchers gives
    "magnitude": (magnitude, "not averaged by a ReduceMean"),
    "rms_feature": (rms_feature, "not used as sqrt(·) dividing"),
    "leading_axis": (leading_axis, "not the trailing axes"),
    "eps_after_root": (eps_after_root, "no epsilon is added"),
    "sub_of_another_mean": (other_mean, "subtracts the mean of another tensor"),
}


@pytest.mark.parametrize("case", LOOK_ALIKES.values(), ids=list(LOOK_ALIKES))
def test_look_alikes_do_not_match_and_say_why(case):
    build, reason = case
    g, y = build()
    model = g.model(y)
    run(model)  # a valid graph onnxruntime runs
    index = GraphIndex.of(model.graph)
    reasons = [
        r.reason
        for node in model.graph.node
        for matcher in (match_decomposed_rmsnorm, match_decomposed_layernorm)
        if isinstance(r := matcher(index, node), NoMatch)
    ]
    assert any(reason in r for r in reasons), reasons
    census = inspect(model)
    assert census.norm_nodes == () and census.lints == ()
    assert not {DECOMPOSED_RMSNORM, DECOMPOSED_LAYERNORM} & set(census.op_counts)


def test_describe_kind_names_the_norm_and_its_representation():
    assert describe_kind("InstanceNormalization+Reshape") == (
        "GroupNorm as InstanceNormalization+Reshape"
    )
    assert describe_kind(DECOMPOSED_RMSNORM) == "RMSNorm as decomposition"
    assert describe_kind("RMSNormalization") == "RMSNorm as RMSNormalization"
