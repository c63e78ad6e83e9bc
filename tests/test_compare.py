"""The comparator: statistics against hand-computed values, and the pass rule."""

from __future__ import annotations

import math

import numpy as np

from normdeploy.verification.compare import Tolerance, compare_arrays, default_tolerance
from normdeploy.verification.runners import CPU, CUDA


def test_statistics_match_hand_computation():
    e = np.array([[1.0, -2.0], [4.0, 0.5]], np.float32)
    a = np.array([[1.0, -2.5], [4.0, 0.5]], np.float32)
    c = compare_arrays("y", e, a, Tolerance(1e-3, 1e-3))
    assert not c.passed
    assert c.max_abs == 0.5 and c.worst_index == (0, 1)
    assert c.expected_at_worst == -2.0 and c.actual_at_worst == -2.5
    assert math.isclose(c.max_rel, 0.25)
    assert math.isclose(c.mean_abs, 0.125)
    e64, a64 = e.astype(np.float64).ravel(), a.astype(np.float64).ravel()
    cos = float(e64 @ a64 / (np.linalg.norm(e64) * np.linalg.norm(a64)))
    assert math.isclose(c.cosine, cos, rel_tol=1e-12)
    # the atol that would have passed, given rtol=1e-3: 0.5 - 1e-3 * 2
    assert math.isclose(c.needed_atol, 0.5 - 2e-3, rel_tol=1e-9)


def test_pass_rule_is_allclose():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((5, 7))
    for scale in (1e-6, 1e-4, 1e-2):
        a = e + scale * rng.standard_normal(e.shape)
        tol = Tolerance(1e-4, 1e-4)
        assert compare_arrays("y", e, a, tol).passed == np.allclose(a, e, rtol=1e-4, atol=1e-4)


def test_shape_and_nan_mismatches_fail():
    assert not compare_arrays("y", np.zeros(3), np.zeros(4), Tolerance(1, 1)).passed
    e = np.array([1.0, np.nan])
    assert compare_arrays("y", e, e.copy(), Tolerance(0, 0)).passed
    assert not compare_arrays("y", e, np.array([1.0, 2.0]), Tolerance(1, 1)).passed


def test_default_tolerances_are_ordered_by_precision():
    f64, f32, f16 = (
        default_tolerance(np.dtype(d), CPU) for d in ("float64", "float32", "float16")
    )
    assert f64.atol < f32.atol < f16.atol
    assert default_tolerance(np.dtype("float32"), CUDA).rtol > f32.rtol
    assert default_tolerance(np.dtype("int64")) == Tolerance(0.0, 0.0)
