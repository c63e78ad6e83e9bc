"""The comparator: statistics against hand-computed values, the fixed rule, and the measured-
noise rule (e and f against float64, the bound K·max(f, f_min), nominal and CUDA floors)."""

from __future__ import annotations

import math

import numpy as np

from normdeploy.onnx_graph import InputSpec
from normdeploy.verification import compare
from normdeploy.verification.compare import (
    CUDA_FLOOR,
    FLOOR_MIN,
    NOMINAL_FLOOR,
    K,
    Tolerance,
    TolerancePolicy,
    compare_arrays,
    default_tolerance,
    pair_inputs,
    pooled_floors,
)
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


# ------------------------------------------------------------------ the measured-noise rule


def test_measured_rule_numbers_are_the_scale_relative_errors():
    truth = np.array([1000.0, -3.0, 0.001, 0.0])
    reference = truth + np.array([2e-4, 0.0, 0.0, 0.0])  # f = 2e-4 / 1000 = 2e-7
    actual = truth + np.array([0.0, 1e-3, 0.0, 0.0])  # e = 1e-3 / 1000 = 1e-6
    c = TolerancePolicy().compare("y", reference.astype(np.float32), actual.astype(np.float32),
                                  truth=truth)  # fmt: skip
    f32 = np.float32
    e = np.abs(actual.astype(f32).astype(np.float64) - truth).max() / 1000
    f = np.abs(reference.astype(f32).astype(np.float64) - truth).max() / 1000
    assert c.rule == "float64"
    assert math.isclose(c.error, e) and math.isclose(c.floor, f)
    assert c.floor_used == max(f, FLOOR_MIN["float32"]) and c.bound == K * c.floor_used
    assert math.isclose(c.ratio, e / c.floor_used) and math.isclose(c.margin, c.bound / e)
    assert c.passed == (e <= c.bound)


def test_the_bound_is_k_floors_with_f_min_below_it():
    truth = np.linspace(-1, 1, 101)
    floor = 1e-6
    policy = TolerancePolicy()
    for ratio, ok in ((K * 0.99, True), (K * 1.01, False)):
        actual = truth.copy()
        actual[7] += ratio * floor  # scale max|truth| = 1
        c = policy.compare("y", truth, actual, truth=truth, floor=floor)
        assert c.passed is ok and math.isclose(c.ratio, ratio)
    # An output float32 computes exactly (f = 0) still gets K·f_min, not a zero bound.
    c = policy.compare("y", truth.astype(np.float32), truth.astype(np.float32), truth=truth)
    assert c.floor_used == FLOOR_MIN["float32"] and c.passed


def test_entries_near_zero_beside_thousands_are_judged_by_the_output_scale():
    """Elementwise atol+rtol·|expected| fails entries near zero whose float32 error comes from
    the scale of the big ones; the scale-relative rule does not."""
    truth = np.array([2.6e4, -1.3e4, 1e-3, -2e-3])
    actual = truth + np.array([0.0, 0.0, 9.8e-3, 0.0])  # 3.8e-7 of the scale
    elementwise = compare_arrays("y", truth, actual, Tolerance(1e-4, 1e-4))
    measured = TolerancePolicy().compare("y", truth, actual, truth=truth, floor=2e-7)
    assert not elementwise and measured


def test_without_float64_the_nominal_floor_applies_and_cuda_raises_it():
    e = np.linspace(-1, 1, 50).astype(np.float32)
    a = e + np.float32(5e-6)
    cpu = TolerancePolicy().compare("y", e, a)
    cuda = TolerancePolicy().compare("y", e, a, CUDA)
    assert (cpu.rule, cpu.floor, cpu.floor_used) == ("nominal", None, NOMINAL_FLOOR["float32"])
    assert cpu.passed  # 5e-6 ≤ 10 × 1e-6
    assert cuda.floor_used == CUDA_FLOOR and cuda.passed
    assert not TolerancePolicy().compare("y", e, e + np.float32(2e-5))


def test_overrides_give_named_outputs_a_fixed_bound_and_integers_stay_exact():
    policy = TolerancePolicy(atol={"logits": 1e-3, "*": 1e-5}, rtol={"logits": 0.0})
    assert policy.fixed_tolerance("logits", np.float32) == Tolerance(1e-3, 0.0)
    assert policy.fixed_tolerance("other", np.float32) == Tolerance(1e-5, 1e-4)  # dtype rtol
    assert TolerancePolicy().fixed_tolerance("logits", np.float32) is None
    c = policy.compare("logits@b1", np.zeros(3), np.full(3, 5e-4), output="logits")
    assert c.rule == "fixed" and c.passed and c.bound is None
    ints = TolerancePolicy().compare("ids", np.array([1, 2]), np.array([1, 3]))
    assert ints.rule == "exact" and not ints and ints.margin is None


def test_floors_pool_over_input_sets_and_inputs_pair_by_position_when_only_names_differ():
    t = {"y": np.array([1.0, 2.0])}
    refs = [{"y": np.array([1.0, 2.0 + 2e-7])}, {"y": np.array([1.0 + 6e-7, 2.0])}]
    assert math.isclose(pooled_floors(refs, [t, t])["y"], 3e-7)
    f32 = np.dtype("float32")
    ts = [InputSpec("input.1", f32, ("batch", 8))]
    dyn = [InputSpec("x", f32, ("s0", 8))]
    pairing = pair_inputs(ts, dyn)
    assert pairing.by == "position" and pairing.pairs == (("input.1", "x"),)
    assert "position" in pairing.describe("inputs")
    assert isinstance(pair_inputs(ts, [InputSpec("x", f32, ("s0", 9))]), str)
    assert isinstance(pair_inputs(ts, [InputSpec("x", np.dtype("int64"), ("s0", 8))]), str)


def _oracle_statistics(expected, actual, truth):
    """The comparison's numbers by their definitions, in float64 on whole arrays."""
    e, a, t = (np.asarray(x, np.float64).ravel() for x in (expected, actual, truth))
    judged = np.abs(a - t)
    diff = np.abs(a - e)
    return {
        "error": judged.max() / np.abs(t).max(),
        "floor": np.abs(e - t).max() / np.abs(t).max(),
        "worst": int(np.argmax(judged)),
        "max_abs": diff.max(),
        "mean_abs": diff.mean(),
        "max_rel": (diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)).max(),
        "cosine": e @ a / math.sqrt((e @ e) * (a @ a)),
    }


def test_outputs_larger_than_a_block_give_the_whole_array_numbers():
    """Large outputs are measured block by block (no float64 copy of them): every number is
    the one its definition gives on the whole array, and the worst entry is the first of equal
    worst ones even when they sit in different blocks."""
    rng = np.random.default_rng(3)
    n = 3 * compare.BLOCK + 17
    truth = rng.standard_normal((n // 17, 17)) * 40.0
    reference = (truth + rng.standard_normal(truth.shape) * 1e-5).astype(np.float32)
    actual = (truth + rng.standard_normal(truth.shape) * 1e-5).astype(np.float32)
    flat = actual.reshape(-1)
    tflat = truth.reshape(-1)
    # Two equally bad entries, the first in block 1, the second in block 2.
    for i in (compare.BLOCK + 5, 2 * compare.BLOCK + 9):
        flat[i] = np.float32(tflat[i] + 0.25)
    worst_first = compare.BLOCK + 5
    judged = np.abs(flat.astype(np.float64) - tflat)
    assert judged[worst_first] >= judged[2 * compare.BLOCK + 9]
    c = TolerancePolicy().compare("y", reference, actual, truth=truth)
    want = _oracle_statistics(reference, actual, truth)
    assert math.isclose(c.error, want["error"], rel_tol=1e-15)
    assert math.isclose(c.floor, want["floor"], rel_tol=1e-15)
    assert c.worst_index == tuple(int(i) for i in np.unravel_index(want["worst"], truth.shape))
    assert c.actual_at_worst == float(actual.reshape(-1)[want["worst"]])
    assert math.isclose(c.max_abs, want["max_abs"], rel_tol=1e-15)
    assert math.isclose(c.max_rel, want["max_rel"], rel_tol=1e-15)
    assert math.isclose(c.mean_abs, want["mean_abs"], rel_tol=1e-12)  # summation order
    assert math.isclose(c.cosine, want["cosine"], rel_tol=1e-12)
    assert not c.passed  # 0.25 on a scale of ~160 is far beyond 10 float32 floors


def test_nonfinite_entries_beyond_the_first_block_are_compared_by_place():
    n = 2 * compare.BLOCK + 3
    truth = np.linspace(-1.0, 1.0, n)
    truth[-1] = np.nan
    same = truth.astype(np.float32)
    c = TolerancePolicy().compare("y", same, same.copy(), truth=truth)
    assert c.passed and c.error == c.floor  # the candidate is the reference
    moved = same.copy()
    moved[-1], moved[-2] = moved[-2], np.nan
    assert not TolerancePolicy().compare("y", same, moved, truth=truth).passed


def test_zero_dimensional_outputs_are_compared():
    truth = np.array(2.0)
    c = TolerancePolicy().compare(
        "loss", np.float32(2.0) + np.zeros((), np.float32), np.array(2.5, np.float32),
        truth=truth,
    )  # fmt: skip
    assert c.shape == () and c.worst_index == () and not c.passed
    assert math.isclose(c.error, 0.25)
    nan = np.array(np.nan)
    assert TolerancePolicy().compare("loss", nan, nan.copy(), truth=nan).passed
