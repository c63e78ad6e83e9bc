"""Read-only graph helpers (normdeploy/onnx_graph.py): constants through Identity/Transpose
chains and Constant nodes, declared dtypes, sole readers with their reasons, rank propagation,
scope labels, undefined inputs, graph input specs, and the small attribute/opset helpers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normdeploy.onnx_graph import (
    GraphIndex,
    InputSpec,
    NotLoadedError,
    attr,
    default_opset,
    graph_input_specs,
    inferred_value_infos,
    model_constants,
    node_label,
    scopes,
    undefined_input,
    weight_bytes,
)

RNG = np.random.default_rng(99)


def parse(text: str, opset: int = 17, domains: str = "") -> onnx.ModelProto:
    return onnx.parser.parse_model(
        f'<ir_version: 8, opset_import: ["" : {opset}{domains}]>\n{text}'
    )


def index_of(model: onnx.ModelProto, **inits: np.ndarray) -> GraphIndex:
    for name, value in inits.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return GraphIndex.of(model.graph)


def const(name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], **attrs)


# ----------------------------------------------------------------------------- constants


def test_const_array_follows_identity_and_transpose_chains_in_order() -> None:
    weight = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    index = index_of(
        parse("""G (float[1] X) => (float[2,3,4] T3) {
            T1 = Transpose <perm=[1,2,0]> (W)
            I1 = Identity (T1)
            T2 = Transpose <perm=[1,0,2]> (I1)
            I2 = Identity (T2)
            T3 = Transpose (I2)
        }"""),
        W=weight,
    )
    t1 = np.transpose(weight, (1, 2, 0))
    t2 = np.transpose(t1, (1, 0, 2))
    t3 = np.transpose(t2)  # no perm: reverse the axes
    expected = {"W": weight, "T1": t1, "I1": t1, "T2": t2, "I2": t2, "T3": t3}
    for name, value in expected.items():
        got = index.const_array(name)
        assert got is not None and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)
        assert index.const_dtype(name) == TensorProto.FLOAT


def test_a_3000_node_identity_chain_is_followed_without_recursion() -> None:
    n = 3000
    nodes = [helper.make_node("Identity", [f"v{i}"], [f"v{i + 1}"]) for i in range(n)]
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    graph = helper.make_graph(
        nodes, "chain", [], [helper.make_tensor_value_info(f"v{n}", TensorProto.FLOAT16, None)],
        [numpy_helper.from_array(weight, "v0")],
    )  # fmt: skip
    index = GraphIndex.of(graph)
    np.testing.assert_array_equal(index.const_array(f"v{n}"), weight)
    assert index.const_dtype(f"v{n}") == TensorProto.FLOAT16
    assert undefined_input(graph) is None


def test_an_identity_cycle_is_not_a_constant_and_does_not_hang() -> None:
    index = index_of(
        parse("""G (float[1] X) => (float[1] A) {
            A = Identity (B)
            B = Identity (A)
        }""")
    )
    assert index.const_array("A") is None and index.const_dtype("A") is None


CONSTANT_NODES = {  # attributes, value, dtype, TensorProto type
    "value_tensor_fp16": (
        {"value": numpy_helper.from_array(np.array([1.5, -2.0], np.float16))},
        np.array([1.5, -2.0]), np.float16, TensorProto.FLOAT16,
    ),
    "value_float": ({"value_float": 1.5}, np.array(1.5), np.float32, TensorProto.FLOAT),
    "value_floats": (
        {"value_floats": [1.0, 2.5]}, np.array([1.0, 2.5]), np.float32, TensorProto.FLOAT,
    ),
    "value_int": ({"value_int": 7}, np.array(7), np.int64, TensorProto.INT64),
    "value_ints": ({"value_ints": [1, 2, 3]}, np.array([1, 2, 3]), np.int64, TensorProto.INT64),
}  # fmt: skip


@pytest.mark.parametrize("case", CONSTANT_NODES.values(), ids=list(CONSTANT_NODES))
def test_constant_nodes_are_constants_also_through_an_identity(case) -> None:
    attrs, value, dtype, tensor_type = case
    graph = helper.make_graph(
        [const("k", **attrs), helper.make_node("Identity", ["k"], ["y"])], "g", [], []
    )
    index = GraphIndex.of(graph)
    for name in ("k", "y"):
        got = index.const_array(name)
        assert got is not None and got.dtype == dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value)
        assert index.const_dtype(name) == tensor_type


def test_what_is_not_a_constant() -> None:
    model = parse("""G (float[4] X, float[4] W) => (float[4] Y) {
        R = Relu (X)
        S = Constant <value_string = "hi"> ()
        C = custom.Constant <value_float = 1.0> ()
        T = Transpose (R)
        Y = Identity (W)
    }""", domains=', "custom" : 1')  # fmt: skip
    # W is an initializer listed as a graph input: a caller may feed another value
    index = index_of(model, W=np.ones(4, np.float32))
    for name in ("X", "R", "S", "C", "T", "W", "Y", "nothing"):
        assert index.const_array(name) is None, name
    for name in ("X", "R", "T", "nothing"):
        assert index.const_dtype(name) is None, name


def test_an_initializer_in_unloaded_external_data_says_so() -> None:
    model = parse("""G (float[1] X) => (float[4] Y) {
        Y = Identity (W)
    }""")
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "W")
    onnx.external_data_helper.set_external_data(tensor, location="w.bin")
    tensor.ClearField("raw_data")
    model.graph.initializer.append(tensor)
    index = GraphIndex.of(model.graph)
    with pytest.raises(NotLoadedError, match="'W' is in external data"):
        index.const_array("Y")
    assert index.const_dtype("Y") == TensorProto.FLOAT  # the type is known without the data
    assert weight_bytes(model) == 16  # from dims and type, no data read


# ----------------------------------------------------------------------------- readers

READERS = """G (float[2,3] X, bool c) => (float[2,3] O, float[2,3] S, float[2,3] Z) {
    A = Relu (X)
    B = Neg (A)
    C = Abs (A)
    O = Relu (B)
    P = Relu (O)
    D = Relu (X)
    E = Neg (D)
    S = If (c) <
        then_branch = T () => (float[2,3] s1) { s1 = Abs (D) },
        else_branch = F () => (float[2,3] s2) { s2 = Neg (C) }
    >
    Z = Add (E, P)
}"""


def test_sole_reader_says_why_not() -> None:
    index = index_of(parse(READERS))
    node = {n.output[0]: n for n in index.nodes}
    assert index.sole_reader("O", node["P"]) == "'O' is a graph output"
    assert index.sole_reader("A", node["B"]) == "'A' has 2 readers"
    assert index.sole_reader("D", node["E"]) == "'D' is also read inside a subgraph"
    assert index.sole_reader("B", node["O"]) is None
    assert index.sole_reader("B", node["E"]) == "'B' has 1 readers"  # not that node's
    assert index.sole_reader("unread", node["E"]) == "'unread' has 0 readers"
    assert {"D", "C"} <= index.subgraph_uses


# ----------------------------------------------------------------------------- ranks

RANKS = """G (float[2,3,4,5] X, float[5] v, float[3,1,1] u, float[N,4] M, bool[5] k) => (float[2] Y) {
    R = Relu (X)
    L = LeakyRelu (R)
    N = BatchNormalization (L, s, s, s, s)
    A = Add (v, u)
    B = Mul (N, A)
    Wh = Where (k, A, v)
    G = Gemm (M, Wg)
    F = Flatten (X)
    Mm = MatMul (X, Wm)
    Sh = Shape (X)
    Re = Reshape (X, Sh)
    K = Relu (Re)
    Q = Add (R, Re)
    Cu = custom.Relu (X)
    Cr = Relu (Cu)
}"""


def test_rank_is_propagated_through_rank_keeping_and_broadcasting_ops() -> None:
    model = parse(RANKS, domains=', "custom" : 1')
    index = index_of(
        model, s=np.ones(3, np.float32), Wg=np.ones((4, 6), np.float32),
        Wm=np.ones((5, 6), np.float32),
    )  # fmt: skip
    expected = {
        "X": 4, "R": 4, "L": 4, "N": 4, "A": 3, "B": 4, "Wh": 3, "G": 2, "F": 2, "Mm": 4,
        "Wm": 2, "s": 1, "Re": None, "K": None, "Q": None, "Cu": None, "Cr": None,
        "nothing": None,
    }  # fmt: skip
    assert {name: index.rank(name) for name in expected} == expected
    assert index.shape("M") == ("N", 4) and index.shape("Wg") == (4, 6)
    assert index.shape("R") is None


def test_a_declared_shape_wins_over_propagation() -> None:
    model = parse(RANKS, domains=', "custom" : 1')
    model.graph.value_info.append(
        helper.make_tensor_value_info("Re", TensorProto.FLOAT, [2, 3, 4, 5, 1])
    )
    index = GraphIndex.of(model.graph)
    assert (index.rank("Re"), index.rank("K"), index.rank("Q")) == (5, 5, 5)


INFERRED = """G (float[N,7,16] X) => (float[N,7,32] Y) {
    M = MatMul (X, W)
    R = Reshape (M, s)
    T = Transpose <perm=[1,0]> (R)
    S = Shape (M)
    Y = Reshape (T, S)
}"""


def test_inferred_shapes_come_from_the_graph_not_from_stale_declarations() -> None:
    model = parse(INFERRED)
    big = RNG.normal(size=(16, 32)).astype(np.float32)  # 512 elements: a typed input only
    model.graph.initializer.extend([
        numpy_helper.from_array(big, "W"),
        numpy_helper.from_array(np.array([-1, 32], np.int64), "s"),  # a shape constant
    ])  # fmt: skip
    # a stale declaration the inference must not take for the truth
    model.graph.value_info.append(
        helper.make_tensor_value_info("R", TensorProto.FLOAT, [5, 6])
    )
    before = model.SerializeToString()
    inferred = inferred_value_infos(model)
    assert model.SerializeToString() == before
    index = GraphIndex.of(model.graph)
    index.inferred = inferred
    assert index.shape("M") == ("N", 7, 32)
    r = index.shape("R")
    assert r is not None and r[1] == 32 and r[0] != 5  # from the constant [-1, 32]
    assert index.shape("T")[0] == 32
    index.inferred = {}
    assert index.shape("R") == (5, 6)  # without inference, the declaration is all there is


def test_a_shape_reader_is_not_a_second_reader_when_asked() -> None:
    index = index_of(parse(INFERRED), W=np.ones((16, 32), np.float32))
    reshape = next(n for n in index.nodes if n.output[0] == "R")
    assert index.sole_reader("M", reshape) == "'M' has 2 readers"
    assert index.sole_reader("M", reshape, shape_reads=True) is None


def test_matmul_with_a_1d_operand_drops_an_axis() -> None:
    model = parse("""G (float[4] v, float[4] u) => (float[5] R, float T) {
        Z2 = MatMul (W, v)
        S = MatMul (v, u)
        R = Relu (Z2)
        T = Neg (S)
    }""")
    index = index_of(model, W=np.ones((5, 4), np.float32))
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    assert {vi.name: len(vi.type.tensor_type.shape.dim) for vi in inferred} == {
        "Z2": 1,
        "S": 0,
    }
    assert (index.rank("Z2"), index.rank("S")) == (1, 0)


# ----------------------------------------------------------------------------- scopes


def _graph(name: str, nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [])


def test_scopes_label_every_subgraph_and_local_function() -> None:
    body = _graph("body", [helper.make_node("Identity", ["c"], ["c_out"])])
    loop = helper.make_node("Loop", ["M", "c"], ["out"], body=body)  # unnamed
    then = _graph("then", [loop])
    other = _graph("else", [helper.make_node("Relu", ["X"], ["y"])])
    branch = helper.make_node(
        "If", ["c"], ["Y"], name="branch", then_branch=then, else_branch=other
    )
    multi = helper.make_node("Multi", [], ["Z"], name="multi", domain="custom")
    multi.attribute.append(
        helper.make_attribute("branches", [_graph("b0", []), _graph("b1", [])])
    )
    fn_if = helper.make_node(
        "If", ["c"], ["r"], name="fi",
        then_branch=_graph("ft", []), else_branch=_graph("fe", []),
    )  # fmt: skip
    fn = helper.make_function(
        "local", "f", ["c"], ["r"], [fn_if], [helper.make_opsetid("", 17)]
    )
    model = helper.make_model(
        _graph("main", [branch, multi]), functions=[fn],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )  # fmt: skip
    found = [(s.label, s.kind) for s in scopes(model)]
    assert found[0] == ("main", "main")
    assert sorted(found) == sorted(
        [
            ("main", "main"),
            ("main/branch.then_branch", "subgraph"),
            ("main/branch.else_branch", "subgraph"),
            ("main/multi.branches[0]", "subgraph"),
            ("main/multi.branches[1]", "subgraph"),
            ("main/branch.then_branch/Loop#0.body", "subgraph"),
            ("function local::f", "function"),
            ("function local::f/fi.then_branch", "subgraph"),
            ("function local::f/fi.else_branch", "subgraph"),
        ]
    )
    by_label = {s.label: s for s in scopes(model)}
    assert list(by_label["main/branch.then_branch/Loop#0.body"].nodes) == list(body.node)
    assert by_label["function local::f"].graph is None
    assert by_label["main/branch.else_branch"].graph.name == "else"


def test_model_constants_collects_constant_nodes_in_every_scope() -> None:
    inner = _graph("t", [const("eps_t", value=numpy_helper.from_array(np.float32(1e-3)))])
    branch = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    fn = helper.make_function(
        "local", "f", [], ["k"],
        [const("k", value=numpy_helper.from_array(np.int64(2))), const("kf", value_float=1.0)],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    graph = _graph("main", [branch])
    graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "W"))
    model = helper.make_model(graph, functions=[fn])
    consts = model_constants(model)
    assert set(consts) == {"W", "eps_t", "k"}  # a value_float is no tensor: not listed
    assert numpy_helper.to_array(consts["k"]) == 2


# ----------------------------------------------------------------------------- graph checks


def test_undefined_input_finds_the_first_read_before_definition() -> None:
    good = parse("""G (float[2] X) => (float[2] Y) {
        A = Relu (X)
        Y = Add (A, W)
    }""")
    good.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "W"))
    assert undefined_input(good.graph) is None
    optional = helper.make_node("Clip", ["A", "", "hi"], ["C"])  # "" is an omitted input
    good.graph.node.append(optional)
    good.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(np.ones(1, np.float32), "hi"),
            numpy_helper.from_array(np.zeros(1, np.int64), "hi_idx"),
            [1],
        )
    )
    assert undefined_input(good.graph) is None
    swapped = parse("""G (float[2] X) => (float[2] Y) {
        Y = Neg (A)
        A = Relu (X)
        Z = Abs (B)
    }""")
    node, name = undefined_input(swapped.graph)
    assert (node.op_type, name) == ("Neg", "A")


def test_graph_input_specs_skip_initializers_listed_as_inputs() -> None:
    model = parse("""G (float[N,3,?,8] X, float[4] W, int64[2,5] ids, float S) => (float[2] Y) {
        Y = Identity (X)
    }""")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "W"))
    del model.graph.input[3].type.tensor_type.shape.dim[:]
    model.graph.input[3].type.tensor_type.ClearField("shape")
    assert graph_input_specs(model) == [
        InputSpec("X", np.dtype("float32"), ("N", 3, None, 8)),
        InputSpec("ids", np.dtype("int64"), (2, 5)),
        InputSpec("S", np.dtype("float32"), ()),
    ]


# ----------------------------------------------------------------------------- small helpers


def test_attr_default_opset_and_node_label() -> None:
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1], auto_pad="NOTSET", alpha=0.5
    )
    assert attr(node, "group") == 2 and attr(node, "pads") == [1, 1, 1, 1]
    assert attr(node, "alpha") == 0.5 and attr(node, "auto_pad") == b"NOTSET"
    assert attr(node, "strides", "none") == "none"
    assert node_label(node) == "Conv->y"
    node.name = "conv1"
    assert node_label(node) == "conv1"
    assert node_label(helper.make_node("Print", ["x"], [])) == "Print->?"
    assert default_opset(parse("G (float[1] X) => (float[1] X) {}", opset=13)) == 13
    aliased = helper.make_model(
        _graph("g", []),
        opset_imports=[helper.make_opsetid("custom", 3), helper.make_opsetid("ai.onnx", 18)],
    )
    assert default_opset(aliased) == 18
    del aliased.opset_import[1]
    assert default_opset(aliased) is None


def test_weight_bytes_counts_every_initializer_by_type() -> None:
    graph = _graph("g", [])
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ones((2, 3), np.float32), "a"),  # 24
            numpy_helper.from_array(np.ones(4, np.float16), "b"),  # 8
            numpy_helper.from_array(np.float64(1.0), "c"),  # scalar: 8
            numpy_helper.from_array(np.ones((2, 2), np.int8), "d"),  # 4
        ]
    )
    assert weight_bytes(helper.make_model(graph)) == 44


def test_a_model_without_its_weight_data_keeps_everything_else():
    from onnx import TensorProto, helper, numpy_helper

    from normdeploy.onnx_graph import tensor_value, without_weight_data

    w = np.arange(512, dtype=np.float32).reshape(8, 64)
    shape = np.array([4, 128], np.int64)
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                helper.make_node("Reshape", ["h", "shape"], ["y"], name="r"),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(shape, "shape")],
            value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 64])],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
        producer_name="p",
    )
    helper.set_model_props(model, {"k": "v"})
    slim = without_weight_data(model)
    big, small = slim.graph.initializer
    assert (big.name, list(big.dims), big.data_type) == ("w", [8, 64], TensorProto.FLOAT)
    assert tensor_value(big) is None  # the 2 KiB weight's data is gone
    np.testing.assert_array_equal(tensor_value(small), shape)  # a shape constant is kept
    assert slim.graph.node == model.graph.node and slim.graph.input == model.graph.input
    assert slim.graph.output == model.graph.output
    assert slim.graph.value_info == model.graph.value_info
    assert (
        slim.opset_import == model.opset_import and slim.metadata_props == model.metadata_props
    )
    assert slim.producer_name == "p" and slim.ir_version == model.ir_version
    assert np.array_equal(
        tensor_value(model.graph.initializer[0]), w
    )  # the original is intact
