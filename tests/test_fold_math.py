"""The fold arithmetic (normdeploy/passes/fold_math.py) against independent oracles: the
BatchNorm formula in numpy float64, and torch's conv / conv_transpose in float64 for every
weight layout (grouped ConvTranspose included)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
from fold_support import RNG, bn_params, w

from normdeploy.passes import fold_math
from normdeploy.passes.fold_math import (
    bn_scale_shift,
    finfo_max,
    fit_reason,
    fold_bias_constant,
    fold_into_producer,
    output_channels,
    scale_conv_input_channels,
    scale_gemm_input_features,
    scale_output_channels,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

EPS = 1e-3
# float64 on both sides: the fold and the oracle differ only by re-association of sums of at
# most 4·3·3·3 terms, ~1e-15 relative; 1e-10 leaves room and still fails a wrong axis at once.
RTOL64, ATOL64 = 1e-10, 1e-10


def bn_oracle(y: np.ndarray, p: dict[str, np.ndarray], axis: int, eps: float = EPS):
    """BatchNorm in eval mode, written out: (y − μ) / √(σ² + ε) · γ + β along ``axis``."""
    shape = [1] * y.ndim
    shape[axis] = -1
    g, b, m, v = (p[k].astype(np.float64).reshape(shape) for k in "gbmv")
    return (y - m) / np.sqrt(v + eps) * g + b


def s_t(p: dict[str, np.ndarray], eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    return bn_scale_shift(p["g"], p["b"], p["m"], p["v"], eps)


def t64(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ----------------------------------------------------------------------------- BN as an affine


def test_bn_scale_shift_equals_the_batchnorm_formula() -> None:
    c = 7
    p = bn_params(c)
    x = RNG.normal(0, 3, (5, c))
    s, t = bn_scale_shift(p["g"], p["b"], p["m"], p["v"], 1e-3)
    expected = bn_oracle(x, p, axis=1, eps=1e-3)
    np.testing.assert_allclose(x * s + t, expected, rtol=1e-12)  # float64 both ways
    assert s.dtype == np.float64 and t.dtype == np.float64


def test_bn_scale_shift_keeps_huge_fp16_variance_finite() -> None:
    var = np.array([65504.0, 6e4], np.float16)  # var + eps overflows if added in fp16
    s, _ = bn_scale_shift(np.ones(2, np.float16), np.zeros(2), np.zeros(2), var, 65504.0)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, 1 / np.sqrt(var.astype(np.float64) + 65504.0), rtol=1e-12)


# ----------------------------------------------------------------------------- into a producer

CONV_LAYOUTS = {  # dims, group, C_in, C_out
    "conv1d": (1, 1, 3, 5),
    "conv2d_group2": (2, 2, 4, 6),
    "conv2d_depthwise_x2": (2, 4, 4, 8),
    "conv3d": (3, 1, 2, 4),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CONV_LAYOUTS.values(), ids=list(CONV_LAYOUTS))
def test_fold_into_conv_equals_bn_after_torch_conv(case, bias) -> None:
    dims, group, c_in, c_out = case
    weight = w(c_out, c_in // group, *(3,) * dims).astype(np.float64)
    b = w(c_out).astype(np.float64) if bias else None
    p = bn_params(c_out)
    x = RNG.normal(0, 1, (2, c_in, *(5,) * dims))
    conv = CONV[dims]
    y = conv(t64(x), t64(weight), None if b is None else t64(b), groups=group).numpy()
    new_w, new_b = fold_into_producer(weight, b, *s_t(p), "Conv", group=group)
    got = conv(t64(x), t64(new_w), t64(new_b), groups=group).numpy()
    np.testing.assert_allclose(got, bn_oracle(y, p, axis=1), rtol=RTOL64, atol=ATOL64)
    assert new_w.dtype == np.float64 and new_w.shape == weight.shape


CONVT_LAYOUTS = {  # dims, group, C_in, C_out/group; weight (C_in, C_out/g, k…)
    "convT1d": (1, 1, 3, 4),
    "convT2d_group2": (2, 2, 4, 3),
    "convT2d_group4": (2, 4, 8, 3),
    "convT3d_group2": (3, 2, 4, 2),
}


@pytest.mark.parametrize("case", CONVT_LAYOUTS.values(), ids=list(CONVT_LAYOUTS))
def test_fold_into_grouped_conv_transpose_equals_bn_after_torch(case) -> None:
    dims, group, c_in, c_out_g = case
    c_out = c_out_g * group
    weight = w(c_in, c_out_g, *(2,) * dims).astype(np.float64)
    b = w(c_out).astype(np.float64)
    p = bn_params(c_out)
    x = RNG.normal(0, 1, (2, c_in, *(3,) * dims))
    conv_t = CONV_T[dims]
    y = conv_t(t64(x), t64(weight), t64(b), stride=2, groups=group).numpy()
    assert output_channels(weight.shape, "ConvTranspose", group=group) == c_out
    new_w, new_b = fold_into_producer(weight, b, *s_t(p), "ConvTranspose", group=group)
    got = conv_t(t64(x), t64(new_w), t64(new_b), stride=2, groups=group).numpy()
    np.testing.assert_allclose(got, bn_oracle(y, p, axis=1), rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("trans_b", [False, True], ids=["transB0", "transB1"])
def test_fold_into_gemm_equals_bn_after_the_product(trans_b) -> None:
    k, n = 4, 6
    b_kn = w(k, n).astype(np.float64)
    weight = b_kn.T.copy() if trans_b else b_kn
    c = w(n).astype(np.float64)
    p = bn_params(n)
    a = RNG.normal(0, 1, (3, k))
    assert output_channels(weight.shape, "Gemm", trans_b=trans_b) == n
    new_w, new_c = fold_into_producer(weight, c, *s_t(p), "Gemm", trans_b=trans_b)
    got = a @ (new_w.T if trans_b else new_w) + new_c
    np.testing.assert_allclose(got, bn_oracle(a @ b_kn + c, p, axis=1), rtol=RTOL64)


def test_matmul_scales_the_last_axis_also_under_a_batched_product() -> None:
    n = 5
    weight = w(4, n).astype(np.float64)
    s = RNG.normal(size=n)
    a = RNG.normal(0, 1, (2, 3, 4))
    got = a @ scale_output_channels(weight, s, "MatMul")
    np.testing.assert_allclose(got, (a @ weight) * s, rtol=1e-12)
    assert output_channels(weight.shape, "MatMul") == n


def test_scale_output_channels_follows_each_layout_elementwise() -> None:
    s = RNG.normal(size=12)
    conv = w(12, 3, 3, 3)
    got = scale_output_channels(conv, s, "Conv")
    for o in range(12):
        np.testing.assert_allclose(got[o], conv[o] * s[o], rtol=1e-12)
    group, c_in, c_out_g = 4, 8, 3  # ConvTranspose weight (C_in, C_out/g, k, k)
    convt = w(c_in, c_out_g, 2, 2)
    got = scale_output_channels(convt, s, "ConvTranspose", group=group)
    for i in range(c_in):
        g = i // (c_in // group)
        for j in range(c_out_g):
            np.testing.assert_allclose(got[i, j], convt[i, j] * s[g * c_out_g + j], rtol=1e-12)
    gemm = w(12, 5)  # transB=1: (N, K)
    np.testing.assert_allclose(
        scale_output_channels(gemm, s, "Gemm", trans_b=True), gemm * s[:, None], rtol=1e-12
    )
    np.testing.assert_allclose(
        scale_output_channels(gemm.T, s, "Gemm"), gemm.T * s[None, :], rtol=1e-12
    )
    mm = w(5, 12)
    np.testing.assert_allclose(scale_output_channels(mm, s, "MatMul"), mm * s, rtol=1e-12)
    with pytest.raises(ValueError, match="no output-channel layout"):
        scale_output_channels(mm, s, "Relu")


def test_scale_output_channels_leaves_its_input_alone() -> None:
    weight = w(4, 3, 3, 3)
    before = weight.copy()
    scale_output_channels(weight, RNG.normal(size=4), "Conv")
    np.testing.assert_array_equal(weight, before)


OUTPUT_CHANNELS = {
    "conv": ((8, 3, 3, 3), "Conv", {}, 8),
    "conv_group2": ((8, 2, 3, 3), "Conv", {"group": 2}, 8),
    "conv_group_does_not_divide": ((6, 1, 3, 3), "Conv", {"group": 4}, None),
    "convT": ((3, 5, 3, 3), "ConvTranspose", {}, 5),
    "convT_group4": ((8, 3, 2, 2), "ConvTranspose", {"group": 4}, 12),
    "convT_group_does_not_divide": ((6, 3, 2, 2), "ConvTranspose", {"group": 4}, None),
    "gemm": ((4, 6), "Gemm", {}, 6),
    "gemm_transB": ((6, 4), "Gemm", {"trans_b": True}, 6),
    "gemm_3d_weight": ((2, 4, 6), "Gemm", {}, None),
    "matmul": ((4, 7), "MatMul", {}, 7),
}


@pytest.mark.parametrize("case", OUTPUT_CHANNELS.values(), ids=list(OUTPUT_CHANNELS))
def test_output_channels_by_layout(case) -> None:
    shape, layout, kw, expected = case
    assert output_channels(shape, layout, **kw) == expected


def test_output_channels_of_an_unknown_layout_is_an_error() -> None:
    with pytest.raises(ValueError, match="no output-channel layout for Relu"):
        output_channels((4, 4), "Relu")


# ----------------------------------------------------------------------------- into a consumer

CONV_INPUT_CASES = {  # dims, group, C_in, C_out, stride, dilation
    "conv2d_stride2_dilation2": (2, 1, 4, 5, 2, 2),
    "conv2d_group2": (2, 2, 4, 6, 1, 1),
    "conv1d_depthwise": (1, 3, 3, 6, 1, 1),
    "conv3d": (3, 1, 2, 3, 1, 1),
}


@pytest.mark.parametrize("case", CONV_INPUT_CASES.values(), ids=list(CONV_INPUT_CASES))
def test_scale_conv_input_channels_equals_torch_conv_of_the_affine_input(case) -> None:
    dims, group, c_in, c_out, stride, dilation = case
    weight = w(c_out, c_in // group, *(3,) * dims).astype(np.float64)
    b = w(c_out).astype(np.float64)
    s, t = RNG.normal(size=c_in), RNG.normal(size=c_in)
    x = RNG.normal(0, 1, (2, c_in, *(9,) * dims))
    conv = CONV[dims]
    kw = {"stride": stride, "dilation": dilation, "groups": group}
    affine = x * s.reshape((1, -1) + (1,) * dims) + t.reshape((1, -1) + (1,) * dims)
    expected = conv(t64(affine), t64(weight), t64(b), **kw).numpy()
    new_w, delta = scale_conv_input_channels(weight, s, t, group)
    got = conv(t64(x), t64(new_w), t64(b + delta), **kw).numpy()
    np.testing.assert_allclose(got, expected, rtol=RTOL64, atol=ATOL64)


def test_scale_conv_input_channels_matches_an_explicit_loop() -> None:
    group, c_in, c_out = 2, 6, 4
    weight = w(c_out, c_in // group, 1, 3).astype(np.float64)
    s, t = RNG.normal(size=c_in), RNG.normal(size=c_in)
    new_w, delta = scale_conv_input_channels(weight, s, t, group)
    for o in range(c_out):
        for j in range(c_in // group):
            ch = (o // (c_out // group)) * (c_in // group) + j
            np.testing.assert_allclose(new_w[o, j], weight[o, j] * s[ch], rtol=1e-12)
    exp_delta = [
        sum(
            weight[o, j].sum() * t[(o // (c_out // group)) * (c_in // group) + j]
            for j in range(c_in // group)
        )
        for o in range(c_out)
    ]
    np.testing.assert_allclose(delta, exp_delta, rtol=1e-12)


def test_scale_gemm_input_features_is_diag_s_times_b() -> None:
    s, t = RNG.normal(size=4), RNG.normal(size=4)
    b = w(4, 3).astype(np.float64)
    a = RNG.normal(size=(2, 4))
    for trans_b in (False, True):
        bw = b.T if trans_b else b
        new_b, delta = scale_gemm_input_features(bw, s, t, trans_b=trans_b, alpha=0.5)
        got = 0.5 * a @ (new_b.T if trans_b else new_b) + delta
        np.testing.assert_allclose(got, 0.5 * (a * s + t) @ b, rtol=1e-12)
        assert new_b.shape == bw.shape


# ----------------------------------------------------------------------------- bias Add constant

BIAS_CONSTANTS = {  # constant shape, channel shape, output rank, folds
    "nchw_1c11": ((1, 4, 1, 1), (4, 1, 1), 4, True),
    "nchw_c11": ((4, 1, 1), (4, 1, 1), 4, True),
    "scalar": ((), (4, 1, 1), 4, True),
    "gemm_c": ((4,), (4,), 2, True),
    "gemm_1c": ((1, 4), (4,), 2, True),
    "spatial_hw": ((3, 3), (4, 1, 1), 4, False),
    "batch_dependent": ((2, 4, 1, 1), (4, 1, 1), 4, False),
    "raises_the_rank": ((1, 1, 4, 1, 1), (4, 1, 1), 4, False),
    "gemm_per_row": ((3, 4), (4,), 2, False),
    "wrong_channel_count": ((5,), (4,), 2, False),
}


@pytest.mark.parametrize("case", BIAS_CONSTANTS.values(), ids=list(BIAS_CONSTANTS))
def test_fold_bias_constant_is_bn_of_the_sum_or_refused(case) -> None:
    c_shape, channel_shape, rank, folds = case
    p = bn_params(4)
    s, t = s_t(p)
    const = RNG.normal(0, 1, c_shape)
    folded = fold_bias_constant(const, s, t, channel_shape, rank)
    if not folds:
        assert folded is None
        return
    assert folded is not None
    y = RNG.normal(0, 1, (2, *channel_shape[:1], *(3,) * (rank - 2)))
    np.testing.assert_allclose(
        y * s.reshape(channel_shape) + folded, bn_oracle(y + const, p, axis=1), rtol=RTOL64
    )


# ----------------------------------------------------------------------------- dtype range


def test_finfo_max_covers_bfloat16() -> None:
    import ml_dtypes

    assert finfo_max(np.dtype(np.float16)) == 65504.0
    assert finfo_max(np.dtype(np.float32)) == float(np.finfo(np.float32).max)
    assert finfo_max(np.dtype(ml_dtypes.bfloat16)) == pytest.approx(3.3895313892515355e38)


FIT_CASES = {  # folded values, shift, dtype, reason fragment (None: fits)
    "fits_fp16": ([np.array([1.0, -2.0])], np.array([3.0]), np.float16, None),
    "nan": ([np.array([1.0, np.nan])], np.zeros(1), np.float32, "not finite"),
    "inf": ([np.array([np.inf])], np.zeros(1), np.float32, "not finite"),
    "overflows_fp16": ([np.array([7e4])], np.zeros(1), np.float16, "overflow float16"),
    "negative_overflow_fp16": (
        [np.array([-7e4])],
        np.zeros(1),
        np.float16,
        "overflow float16",
    ),
    "shift_near_fp16_range": ([np.array([1.0])], np.array([2e3]), np.float16, "max/64"),
    "big_shift_fine_in_fp32": ([np.array([1.0])], np.array([2e3]), np.float32, None),
    "empty": ([np.zeros(0)], np.zeros(0), np.float16, None),
}


@pytest.mark.parametrize("case", FIT_CASES.values(), ids=list(FIT_CASES))
def test_fit_reason(case) -> None:
    values, t, dtype, reason = case
    got = fit_reason(values, t, np.dtype(dtype))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


# ----------------------------------------------------------------------------- purity


def test_fold_math_imports_neither_onnx_nor_torch() -> None:
    tree = ast.parse(inspect.getsource(fold_math))
    imported = {
        alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "numpy" in imported
    assert not {m for m in imported if m.split(".")[0] in ("onnx", "torch", "onnxruntime")}
