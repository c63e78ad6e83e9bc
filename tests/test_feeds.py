"""feeds: nested batch sizes, a static batch, and sizes chosen for free symbolic dims."""

from __future__ import annotations

import numpy as np
import pytest

from normdeploy.budget import memory_limit
from normdeploy.errors import InvalidModelError, ResourceLimitError
from normdeploy.onnx_graph import InputSpec
from normdeploy.shapes import plan_inputs
from normdeploy.verification.feeds import size_free_dims, stress_feed_sets

SEQ_FIRST = InputSpec("src", np.dtype("float32"), (5, "batch", 16))
IMAGE = InputSpec("x", np.dtype("float32"), ("N", 3, 8, 8))
TOKENS = InputSpec("tokens", np.dtype("int64"), ("batch", 6))


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


DETECTOR = InputSpec("x", np.dtype("float32"), ("N", 3, "H", "W"))


def runs_at_multiples_of(step: int):
    """A stand-in for onnxruntime on a detector: fails unless H and W are multiples of step."""
    shapes: list[tuple[int, ...]] = []

    def run(feeds):
        shapes.append(feeds["x"].shape)
        if any(n % step for n in feeds["x"].shape[2:]):
            raise RuntimeError(f"Add: shapes do not broadcast at {feeds['x'].shape}")

    return run, shapes


def test_free_dims_get_the_first_candidate_size_at_which_the_graph_runs():
    run, shapes = runs_at_multiples_of(32)
    plan = size_free_dims(plan_inputs([DETECTOR]), run, "det.onnx")
    assert plan.specs()[0].shape == ("N", 3, 32, 32)
    assert shapes == [(1, 3, 8, 8), (1, 3, 32, 32)]  # smallest first, at batch 1
    assert plan.notes == (
        "symbolic dim(s) H=32, W=32 chosen: det.onnx runs at x[N, 3, H=32, W=32] "
        "(not at x[N, 3, H=8, W=8]); input_shapes (--input-shape) sets them",
    )
    run, shapes = runs_at_multiples_of(64)
    assert size_free_dims(plan_inputs([DETECTOR]), run, "d").specs()[0].shape[2:] == (64, 64)
    # Nothing free: nothing runs.
    sized = plan_inputs([DETECTOR], input_shapes=[(1, 3, 64, 64)])
    assert size_free_dims(sized, run, "d") is sized


def test_a_graph_that_runs_at_no_candidate_size_is_one_line_with_the_shapes_tried():
    run, shapes = runs_at_multiples_of(1000)
    with pytest.raises(InvalidModelError) as info:
        size_free_dims(plan_inputs([DETECTOR]), run, "det.onnx")
    message = str(info.value)
    assert message.startswith(
        "det.onnx: onnxruntime cannot run it at any size tried for its symbolic dim(s) H, W "
        "(x[N, 3, H=8, W=8]; x[N, 3, H=32, W=32]; x[N, 3, H=64, W=64]; "
        "x[N, 3, H=224, W=224]; x[N, 3, H=640, W=640]; last error: "
    )
    assert message.endswith("give the sizes it takes, e.g. input_shapes=1x3x640x640")
    assert len(shapes) == 5 and "\n" not in message


def test_candidate_sizes_over_the_memory_budget_are_not_tried():
    run, shapes = runs_at_multiples_of(1000)
    # 4 MiB: 3×224×224 float32 inputs (3 MB while generated) fit, 3×640×640 (24 MB) do not.
    with memory_limit("4M"), pytest.raises(InvalidModelError, match=r"H=224, W=224\]; last"):
        size_free_dims(plan_inputs([DETECTOR]), run, "det.onnx")
    assert shapes[-1] == (1, 3, 224, 224)  # 640×640 (~20 MB to generate) was not tried
    with memory_limit("1K"), pytest.raises(ResourceLimitError):
        size_free_dims(plan_inputs([DETECTOR]), run, "det.onnx")
