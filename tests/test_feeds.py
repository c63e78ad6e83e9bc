"""feeds: the batch axis (named 'batch', axis 0, or given), nested batch sizes, and requested
input shapes the graph cannot take."""

from __future__ import annotations

import numpy as np
import pytest

from normdeploy.errors import InvalidArgumentError
from normdeploy.onnx_graph import InputSpec
from normdeploy.verification.feeds import batch_axes, check_input_shapes, stress_feed_sets

SEQ_FIRST = InputSpec("src", np.dtype("float32"), (5, "batch", 16))
IMAGE = InputSpec("x", np.dtype("float32"), ("N", 3, 8, 8))
TOKENS = InputSpec("tokens", np.dtype("int64"), ("batch", 6))


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


def test_smaller_batches_are_the_leading_samples_of_the_largest():
    sets, notes = stress_feed_sets([SEQ_FIRST, TOKENS], (1, 3), seeds=2)
    assert [(fs.label, fs.batch_size) for fs in sets] == [
        ("b1/seed0", 1), ("b1/seed1", 1), ("b3/seed0", 3), ("b3/seed1", 3),
    ]  # fmt: skip
    by_label = {fs.label: fs.feeds for fs in sets}
    assert by_label["b3/seed0"]["src"].shape == (5, 3, 16)
    np.testing.assert_array_equal(
        by_label["b1/seed0"]["src"], by_label["b3/seed0"]["src"][:, :1]
    )
    np.testing.assert_array_equal(
        by_label["b1/seed1"]["tokens"], by_label["b3/seed1"]["tokens"][:1]
    )
    assert not np.array_equal(by_label["b3/seed0"]["src"], by_label["b3/seed1"]["src"])
    assert notes == []


def test_a_static_batch_runs_once_and_says_so():
    static = InputSpec("x", np.dtype("float32"), (2, 3))
    sets, notes = stress_feed_sets([static], (1, 3))
    assert [fs.label for fs in sets] == ["b2/seed0"]
    assert notes == ["input(s) x have a static batch dimension: ran batch 2 only"]


def test_a_requested_shape_the_graph_cannot_take_names_the_input_and_dim():
    check_input_shapes([IMAGE, TOKENS], [(4, 3, 8, 8), (4, 6)])  # symbolic dims take anything
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
