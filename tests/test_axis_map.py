"""The axis proof behind folding through shape-only ops (normdeploy/passes/axis_map.py),
against numpy: an axis "maps" only when the elements along it are exactly those along the
source axis, in order."""

from __future__ import annotations

import numpy as np

from normdeploy.passes.axis_map import (
    ShapeStep,
    source_axis,
    target_axis,
    trace_back,
    trace_forward,
)


def _coordinate_along(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """An array of ``shape`` whose every element is its own index along ``axis``."""
    idx = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return np.broadcast_to(idx, shape).copy()


def _random_reshape(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two groupings of the same factors: a reshape that merges and splits axes."""
    factors = [int(f) for f in rng.choice([1, 2, 3, 4, 5], size=rng.integers(2, 6))]

    def group() -> tuple[int, ...]:
        n_cuts = rng.integers(0, len(factors))
        cuts = sorted(rng.choice(range(1, len(factors)), size=n_cuts, replace=False))
        return tuple(int(np.prod(p)) for p in np.split(np.array(factors), cuts))

    return group(), group()


def test_a_mapped_reshape_axis_carries_exactly_the_source_coordinate() -> None:
    rng = np.random.default_rng(0)
    mapped = 0
    for _ in range(300):
        src, dst = _random_reshape(rng)
        for k in range(len(dst)):
            found = source_axis(ShapeStep("Reshape", src, dst), k)
            # ground truth: input axes whose coordinate every element keeps along k
            truths = [
                j
                for j in range(len(src))
                if src[j] == dst[k]
                and np.array_equal(
                    _coordinate_along(src, j).reshape(dst), _coordinate_along(dst, k)
                )
            ]
            if found.axis is None:
                assert not [j for j in truths if dst[k] > 1], (src, dst, k, found.reason)
            else:
                mapped += 1
                assert found.axis in truths, (src, dst, k)
                back = target_axis(ShapeStep("Reshape", src, dst), found.axis).axis
                assert back == k or dst[k] == 1  # size-1 axes are interchangeable
    assert mapped > 100  # the sample exercises the mapped case, not only refusals


def test_symbolic_dims_cancel_only_themselves() -> None:
    # (b, 7, 32) → (7*b, 32): the feature axis survives, the token axis does not
    step = ShapeStep("Reshape 'view'", ("b", 7, 32), ("7*b", 32))
    assert source_axis(step, 1).axis == 2
    assert "has no fixed size" in source_axis(step, 0).reason
    assert (
        "merges or splits" in source_axis(ShapeStep("Reshape", (2, 7, 32), (14, 32)), 0).reason
    )
    back = ShapeStep("Reshape 'view_1'", ("7*b", 32), ("b", 7, 32))
    assert target_axis(back, 1).axis == 2
    # (N, 6, 8) → (M, 8): the trailing 8 maps whatever N and M are
    assert source_axis(ShapeStep("Reshape", ("N", 6, 8), ("M", 8)), 1).axis == 2
    # a channel axis of unknown size proves nothing
    assert source_axis(ShapeStep("Reshape", ("N", 6, 8), ("M", None)), 1).axis is None


def test_permutations_compose_and_invert() -> None:
    steps = [
        ShapeStep("Transpose a", None, None, (0, 2, 3, 1)),  # NCHW → NHWC
        ShapeStep("Reshape", ("N", 4, 4, 8), ("N", 16, 8)),
        ShapeStep("Transpose b", None, None, (0, 2, 1)),  # → (N, 8, 16)
    ]
    assert trace_back(steps, 1).axis == 1  # the BN channel is the conv channel
    assert trace_back(steps, 2).axis is None  # the 16 tokens are H and W merged
    assert target_axis(steps[0], 1).axis == 3


def test_a_merge_then_a_split_back_keeps_the_axis() -> None:
    steps = [
        ShapeStep("Reshape a", (2, 7, 32), (2, 224)),
        ShapeStep("Reshape b", (2, 224), (2, 7, 32)),
    ]
    assert source_axis(steps[1], 2).axis is None  # one step alone cannot see it
    assert trace_back(steps, 2).axis == 2
    assert trace_forward(steps, 2).axis == 2
