"""The BatchNorm fold arithmetic: pure float64 functions, no ONNX and no torch.

With scale γ, bias β, running mean μ, running variance σ² and epsilon ε, per channel::

    s = γ / √(σ² + ε)        t = β − μ · s        BN(x) = x · s + t

*Into the preceding producer* P (``BN(P(x))``): scale P's weight along its output-channel axis,
``W' = W · s``, and ``b' = b · s + t``. The axis comes from the op's documented layout:

- Conv ``(C_out, C_in/g, k…)`` (and torch Linear ``(out, in)``): axis 0;
- ConvTranspose ``(C_in, C_out/g, k…)``: output channel ``g·C_out/g + j`` is column ``j`` of
  group ``g``'s rows — axis 1 *within each group*;
- Gemm ``B``: the output-feature axis, 0 with ``transB=1``, else 1;
- MatMul ``B``: the last axis.

*Into the following consumer* C (``C(BN(x))``): a Conv scales its input-channel axis by ``s`` and
adds ``Σ W·t`` to its bias (exact only without padding: padded borders see zeros, not ``t``); a
Gemm scales the rows of ``B`` that multiply each input feature and adds ``alpha · t·B``.

The ONNX pass (:mod:`normdeploy.passes.fold_bn`) and the module fold
(:mod:`normdeploy.torch_fold`) both call these functions: one formula, one layout table.
"""

from __future__ import annotations

import numpy as np

# Weight layouts by producer op: which axis holds the output channels.
PRODUCER_LAYOUTS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# 16-bit floats: refuse a fold whose shift |t| exceeds max/SHIFT_HEADROOM (see fit_reason)
SHIFT_HEADROOM = 64


def bn_scale_shift(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = x·s + t per channel, in float64."""
    scale, bias, mean, var = (
        np.asarray(a, np.float64).reshape(-1) for a in (scale, bias, mean, var)
    )
    s = scale / np.sqrt(var + np.float64(eps))
    return s, bias - mean * s


def output_channels(
    shape: tuple[int, ...], layout: str, *, group: int = 1, trans_b: bool = False
) -> int | None:
    """How many output channels a weight of ``shape`` has in ``layout``; None if it cannot hold
    ``group`` groups (ConvTranspose's input channels must split evenly)."""
    if layout == "Conv":
        return shape[0] if shape and shape[0] % group == 0 else None
    if layout == "ConvTranspose":
        if len(shape) < 2 or group < 1 or shape[0] % group:
            return None
        return shape[1] * group
    if layout == "Gemm":
        return (shape[0] if trans_b else shape[1]) if len(shape) == 2 else None
    if layout == "MatMul":
        return shape[-1] if shape else None
    raise ValueError(f"no output-channel layout for {layout}")


def scale_output_channels(
    w: np.ndarray, s: np.ndarray, layout: str, *, group: int = 1, trans_b: bool = False
) -> np.ndarray:
    """Multiply producer weight ``w`` by ``s`` along its output channels (float64 result)."""
    w = np.array(w, np.float64)  # a float64 copy, scaled in place
    s = np.asarray(s, np.float64)
    if layout == "Conv":
        w *= s.reshape((-1,) + (1,) * (w.ndim - 1))
        return w
    if layout == "ConvTranspose":
        c_in, c_out_g = w.shape[:2]
        grouped = w.reshape((group, c_in // group, c_out_g, *w.shape[2:]))
        sg = s.reshape((group, 1, c_out_g) + (1,) * (w.ndim - 2))
        return (grouped * sg).reshape(w.shape)
    if layout == "Gemm":
        return w * (s[:, None] if trans_b else s[None, :])
    if layout == "MatMul":
        return w * s
    raise ValueError(f"no output-channel layout for {layout}")


def fold_into_producer(
    w: np.ndarray,
    b: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    layout: str,
    *,
    group: int = 1,
    trans_b: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(W', b') = (W·s along the output channels, b·s + t); a missing bias counts as 0."""
    new_w = scale_output_channels(w, s, layout, group=group, trans_b=trans_b)
    base = np.zeros(len(s)) if b is None else np.asarray(b, np.float64).reshape(-1)
    return new_w, base * s + t


def scale_conv_input_channels(
    w: np.ndarray, s: np.ndarray, t: np.ndarray, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight (C_out, C_in/g, k…) after a per-input-channel affine x·s + t: (W', Δb)."""
    w = np.asarray(w, np.float64)
    c_out, c_in_g = w.shape[:2]
    out_g = c_out // group
    # input channel of weight [o, j] is (o // out_g) * c_in_g + j
    idx = (np.arange(c_out)[:, None] // out_g) * c_in_g + np.arange(c_in_g)[None, :]
    sw = s[idx].reshape((c_out, c_in_g) + (1,) * (w.ndim - 2))
    tw = t[idx].reshape((c_out, c_in_g) + (1,) * (w.ndim - 2))
    return w * sw, (w * tw).reshape(c_out, -1).sum(axis=1)


def scale_gemm_input_features(
    w: np.ndarray, s: np.ndarray, t: np.ndarray, *, trans_b: bool = False, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm ``B`` after a per-feature affine of ``A``: (B', Δ) with Y' = A·B' + Δ (float64)."""
    wk = np.asarray(w, np.float64)
    wk = wk.T if trans_b else wk  # (K, N)
    scaled = wk * np.asarray(s, np.float64)[:, None]
    return (scaled.T if trans_b else scaled), alpha * (np.asarray(t, np.float64) @ wk)


def fold_bias_constant(
    const: np.ndarray, s: np.ndarray, t: np.ndarray, channel_shape: tuple[int, ...], rank: int
) -> np.ndarray | None:
    """The constant of ``Add(P(x), c)`` after folding, ``c·s + t``; None unless ``c`` is
    per-channel (broadcasts to ``channel_shape`` with only leading 1s, within ``rank``)."""
    const = np.asarray(const, np.float64)
    try:
        shape = np.broadcast_shapes(const.shape, channel_shape)
    except ValueError:
        return None
    k = len(channel_shape)
    lead = shape[: len(shape) - k]
    if (
        len(shape) > rank
        or tuple(shape[len(shape) - k :]) != channel_shape
        or any(d != 1 for d in lead)
    ):
        return None
    return const * s.reshape(channel_shape) + t.reshape(channel_shape)


def finfo_max(dtype: np.dtype) -> float:
    """The largest finite value of a float dtype (bfloat16 and friends through ml_dtypes)."""
    try:
        return float(np.finfo(dtype).max)
    except ValueError:
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)


def fit_reason(values: list[np.ndarray], t: np.ndarray, dtype: np.dtype) -> str | None:
    """Why folded ``values`` cannot be stored in ``dtype``, or None when they fit.

    Non-finite results are refused. In a 16-bit float the folded producer computes
    ``s·P(x) + t``: when ``|t|`` (≈ |mean·s|) nears the dtype's range its partial sums overflow,
    or cancel with the precision of ``|t|`` where the BatchNorm subtracted the mean first.
    """
    limit = finfo_max(dtype)
    for value in values:
        if value.size and not np.isfinite(value).all():
            return "folded values are not finite (NaN/inf in the weights or statistics)"
        # max/min propagate NaN, so one comparison also refuses NaN and inf
        if value.size and not max(value.max(), -value.min()) <= limit:
            return f"folded values overflow {dtype.name}"
    if dtype.itemsize <= 2 and t.size and np.abs(t).max() > limit / SHIFT_HEADROOM:
        return (
            f"BN shift |t| up to {np.abs(t).max():.3g} exceeds {dtype.name} max/"
            f"{SHIFT_HEADROOM}: the folded graph could overflow or lose precision"
        )
    return None
