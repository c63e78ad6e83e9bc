"""shapes: one description of every input (the graph's dims, the user's shapes, the example's),
the checks on requested shapes, and the export's dynamic dims."""

from __future__ import annotations

import numpy as np
import pytest

from normdeploy.errors import InvalidArgumentError
from normdeploy.onnx_graph import InputSpec
from normdeploy.shapes import (
    EXAMPLE,
    FREE,
    GRAPH,
    USER,
    batch_axes,
    check_input_shapes,
    dynamic_dims,
    other_size,
    parse_axes,
    parse_shape,
    plan_inputs,
    requested_axes,
)

F32, I64 = np.dtype("float32"), np.dtype("int64")
SEQ_FIRST = InputSpec("src", F32, (5, "batch", 16))
IMAGE = InputSpec("x", F32, ("N", 3, 8, 8))
TOKENS = InputSpec("tokens", I64, ("batch", 6))
DETECTOR = InputSpec("x", F32, ("N", 3, "H", "W"))  # PaddleOCR's detector input
IDS = InputSpec("ids", I64, ("batch", "sequence"))
MASK = InputSpec("mask", I64, ("batch", "sequence"))


def test_parse_shape_and_axes():
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("1xax3", "0x3", ""):
        with pytest.raises(InvalidArgumentError, match=r"^input_shapes: "):
            parse_shape(bad)
    assert parse_axes("0,2,3") == (0, 2, 3)
    assert parse_axes("") == ()  # no dynamic axis
    with pytest.raises(InvalidArgumentError, match=r"^dynamic_axes: '0,x' is not"):
        parse_axes("0,x")


def test_the_batch_axis_is_the_dim_named_batch_else_0_else_what_is_given():
    assert batch_axes([SEQ_FIRST, IMAGE]) == {"src": 1, "x": 0}
    assert batch_axes([SEQ_FIRST, IMAGE], 2) == {"src": 2, "x": 2}
    assert batch_axes([SEQ_FIRST, IMAGE], {"x": 1}) == {"src": 1, "x": 1}
    with pytest.raises(InvalidArgumentError, match=r"^batch_axis: no input named 'y'"):
        batch_axes([IMAGE], {"y": 0})
    with pytest.raises(
        InvalidArgumentError, match=r"^batch_axis: input 'x' has rank 4, no axis 4"
    ):
        batch_axes([IMAGE], 4)


def test_a_requested_shape_the_graph_cannot_take_names_the_input_and_dim():
    check_input_shapes([IMAGE, TOKENS], [(4, 3, 8, 8), (4, 6)])  # symbolic dims take anything
    check_input_shapes([IMAGE, TOKENS], {"tokens": (4, 6)})  # NAME=SHAPE: one input
    with pytest.raises(
        InvalidArgumentError,
        match=r"^input_shapes: 1x3x16x16 does not fit the graph: input 'x' dim 2 is fixed at 8 "
        r"\[N, 3, 8, 8\], asked for 16$",
    ):
        check_input_shapes([IMAGE], [(1, 3, 16, 16)])
    with pytest.raises(InvalidArgumentError, match=r"1x40 has rank 2, the graph's input 'x'"):
        check_input_shapes([IMAGE], [(1, 40)])
    with pytest.raises(
        InvalidArgumentError, match=r"1 shape\(s\) given, the graph has 2 input"
    ):
        check_input_shapes([IMAGE, TOKENS], [(1, 3, 8, 8)])
    with pytest.raises(
        InvalidArgumentError,
        match=r"^input_shapes: no input named 'y' \(graph inputs: x, tokens\)$",
    ):
        check_input_shapes([IMAGE, TOKENS], {"y": (1, 6)})


def test_symbolic_dims_take_the_users_size_then_the_examples_else_stay_free():
    ex = np.zeros((2, 3, 64, 96), np.float32)
    plan = plan_inputs([DETECTOR], examples=[ex])
    (x,) = plan.inputs
    assert [(d.size, d.source) for d in x.dims] == [
        (None, FREE), (3, GRAPH), (64, EXAMPLE), (96, EXAMPLE),
    ]  # fmt: skip
    assert plan.batch == 2 and plan.user_batch is None  # an example's batch is not a request
    assert plan.specs()[0].shape == ("N", 3, 64, 96)  # the batch stays symbolic
    assert plan.free() == []

    user = plan_inputs([DETECTOR], input_shapes=[(4, 3, 640, 640)], examples=[ex])
    assert user.specs()[0].shape == ("N", 3, 640, 640) and user.user_batch == 4
    assert user.describe() == "x[N, 3, H=640, W=640]"

    free = plan_inputs([DETECTOR])
    assert [f.label for f in free.free()] == ["H", "W"]
    assert all(f.spatial for f in free.free())
    sized = free.sized({"H": 32, "W": 64}, USER)
    assert sized.specs()[0].shape == ("N", 3, 32, 64) and sized.free() == []


def test_a_dim_name_shared_by_inputs_is_one_dim():
    # The user sizes 'sequence' on the ids: the mask, which shares the name, follows.
    plan = plan_inputs([IDS, MASK], input_shapes={"ids": (2, 24)})
    assert [s.shape for s in plan.specs()] == [("batch", 24), ("batch", 24)]
    assert plan.user_batch == 2
    with pytest.raises(
        InvalidArgumentError,
        match=r"^input_shapes: input 'mask' dim 1 is 'sequence', which input 'ids' sets to 24; "
        r"asked for 25$",
    ):
        plan_inputs([IDS, MASK], input_shapes=[(2, 24), (2, 25)])


def test_dynamic_axes_share_a_dim_where_the_example_sizes_agree():
    names, shapes = ["ids", "mask"], [(2, 6), (2, 6)]
    axes = requested_axes(names, [2, 2], (0, 1), [0, 0])
    dims = dynamic_dims(names, shapes, axes, [0, 0])
    assert [(d.symbol, d.size, d.members, d.batch) for d in dims] == [
        ("batch", 2, ((0, 0), (1, 0)), True),
        ("sequence", 6, ((0, 1), (1, 1)), False),
    ]
    # Another size on one input: two dims, the second named after its input.
    dims = dynamic_dims(names, [(2, 6), (2, 9)], axes, [0, 0])
    assert [d.symbol for d in dims] == ["batch", "sequence", "mask_sequence"]


def test_dynamic_axes_by_name_beyond_rank_and_by_default():
    names, ranks, batch = ["image", "tokens"], [4, 2], [0, 0]
    # 0,2,3 for every input: axes 2 and 3 do not exist on the tokens and are ignored there.
    assert requested_axes(names, ranks, (0, 2, 3), batch) == [(0, 2, 3), (0,)]
    # NAME=AXES for one input; the other keeps the default, its batch axis.
    assert requested_axes(names, ranks, {"tokens": (0, 1)}, batch) == [(0,), (0, 1)]
    assert requested_axes(names, ranks, {"*": (), "tokens": (1,)}, batch) == [(), (1,)]
    assert requested_axes(names, ranks, None, batch) == [(0,), (0,)]
    with pytest.raises(InvalidArgumentError, match=r"^dynamic_axes: no input named 'text'"):
        requested_axes(names, ranks, {"text": (1,)}, batch)
    dims = dynamic_dims(names, [(1, 3, 64, 64), (1, 6)], [(0, 2, 3), (0, 1)], batch)
    assert [d.symbol for d in dims] == ["batch", "height", "width", "sequence"]


@pytest.mark.parametrize(
    ("size", "other"), [(64, 96), (224, 256), (48, 64), (6, 8), (7, 8), (1, 2)]
)
def test_another_size_keeps_the_examples_divisibility(size, other):
    # A multiple of 32 (H/W of a detector) stays one; small sizes keep their power of two.
    assert other_size(size) == other
