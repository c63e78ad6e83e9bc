"""NumPy oracles for the five normalizations, written from their formulas in float64.

These are the independent reference the tests and ``inspect``'s numerical confirmation compare
against. Layout is channels-first: ``x`` has shape (N, C, *spatial) for batch, group and instance
norm; layer norm normalizes the trailing ``len(normalized_shape)`` dimensions.

    BatchNorm (inference): y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta
    BatchNorm (training):  mean, var over (N, *spatial); var is the biased (1/n) variance
    LayerNorm:             mean, var over the trailing dims
    GroupNorm:             channels split into G groups; mean, var over (C/G, *spatial) per sample
    InstanceNorm:          mean, var over (*spatial) per sample and channel
    RMSNorm:               y = x / sqrt(mean(x²) + eps) * gamma, mean over the trailing dims
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    import torch

Array = np.ndarray


def _channel_shape(x: Array, axis: int = 1) -> tuple[int, ...]:
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _affine(
    y: Array, weight: Array | None, bias: Array | None, shape: tuple[int, ...]
) -> Array:
    """``y * weight + bias``, in place: ``y`` is a fresh float64 array of the caller's."""
    if weight is not None:
        y *= np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(shape)
    return y


def batch_norm_inference(
    x: Array,
    running_mean: Array,
    running_var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> Array:
    """BatchNorm with running statistics (eval mode), channel axis 1."""
    x = np.asarray(x)
    shape = _channel_shape(x)
    mean = np.asarray(running_mean, np.float64).reshape(shape)
    var = np.asarray(running_var, np.float64).reshape(shape)
    y = np.subtract(x, mean, dtype=np.float64)  # (x - mean) / sqrt(var + eps), in float64
    y /= np.sqrt(var + eps)
    return _affine(y, weight, bias, shape)


def batch_norm_training(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> tuple[Array, Array, Array]:
    """BatchNorm with batch statistics (train mode). Returns (y, batch_mean, biased batch_var)."""
    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(_channel_shape(x))) ** 2).mean(axis=axes)
    y = batch_norm_inference(x, mean, var, weight, bias, eps)
    return y, mean, var


def layer_norm(
    x: Array,
    normalized_shape: Sequence[int] | int,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> Array:
    """LayerNorm over the trailing dims given by ``normalized_shape``."""
    x = np.asarray(x, np.float64)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[-len(ns) :]) != ns:
        raise ValueError(f"input shape {x.shape} does not end with normalized_shape {ns}")
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(ns)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(ns)
    return y


def rms_norm(
    x: Array,
    normalized_shape: Sequence[int] | int,
    weight: Array | None = None,
    eps: float | None = None,
) -> Array:
    """RMSNorm over the trailing dims given by ``normalized_shape`` (no mean subtraction).

    ``eps=None`` is PyTorch's default: the machine epsilon of ``x``'s own float dtype.
    """
    x = np.asarray(x)
    if eps is None:
        eps = float(np.finfo(x.dtype if x.dtype.kind == "f" else np.float32).eps)
    x = x.astype(np.float64)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[-len(ns) :]) != ns:
        raise ValueError(f"input shape {x.shape} does not end with normalized_shape {ns}")
    axes = tuple(range(x.ndim - len(ns), x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(ns)
    return y


def group_norm(
    x: Array,
    num_groups: int,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> Array:
    """GroupNorm: statistics per sample over each group of C/G channels and all spatial positions.

    ``weight``/``bias`` are per channel (PyTorch and ONNX opset 21 semantics).
    """
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"{c} channels are not divisible into {num_groups} groups")
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return _affine(y, weight, bias, _channel_shape(x))


def instance_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    running_mean: Array | None = None,
    running_var: Array | None = None,
) -> Array:
    """InstanceNorm: per sample and channel over spatial dims, or with running stats if given."""
    x = np.asarray(x, np.float64)
    if running_mean is not None and running_var is not None:
        return batch_norm_inference(x, running_mean, running_var, weight, bias, eps)
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return _affine((x - mean) / np.sqrt(var + eps), weight, bias, _channel_shape(x))


NORM_KINDS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm")


def norm_kind(module: object) -> str | None:
    """'BatchNorm', 'LayerNorm', 'GroupNorm', 'InstanceNorm', 'RMSNorm' for torch norm modules
    (RMSNorm also for hand-written classes named ``…RMSNorm``, like LlamaRMSNorm), else None.

    Only torch's own classes count for the others: a hand-written ``LayerNorm`` (ConvNeXt's
    channels-first one, PaddleOCR's) has none of nn.LayerNorm's attributes.
    """
    for base in type(module).__mro__:
        bname = base.__name__
        if bname.lower().endswith("rmsnorm"):
            return "RMSNorm"
        if not base.__module__.startswith("torch."):
            continue
        if bname.startswith("_BatchNorm") or bname.startswith("BatchNorm"):
            return "BatchNorm"
        if bname.startswith("_InstanceNorm") or bname.startswith("InstanceNorm"):
            return "InstanceNorm"
        if bname in ("LayerNorm", "GroupNorm"):
            return bname
    return None


def oracle_gap(module: object) -> str | None:
    """Why :func:`module_oracle` does not model ``module`` exactly, or None when it does.

    The oracle implements torch's own norm classes. A subclass that overrides ``forward`` (timm's
    ``BatchNormAct2d`` also applies an activation) or a class outside torch that merely carries a
    norm-like name computes something else: it can be confirmed against PyTorch only.
    """
    if norm_kind(module) is None:
        return f"{type(module).__name__} is not a normalization layer"
    cls = type(module)
    base = next((c for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules.")), None)
    if base is None:
        return f"{cls.__name__} is not a torch norm class"
    if cls is not base and getattr(cls, "forward", None) is not getattr(base, "forward", None):
        return f"{cls.__name__} overrides forward() of {base.__name__}"
    return None


def _param(module: torch.nn.Module, name: str) -> Array | None:
    t = getattr(module, name, None)
    return None if t is None else t.detach().cpu().double().numpy()


def module_oracle(module: torch.nn.Module, x: Array) -> Array:
    """Eval-mode output of a torch norm module, computed by the formulas above in float64."""
    from torch import nn

    kind = norm_kind(module)
    w, b = _param(module, "weight"), _param(module, "bias")
    if kind == "BatchNorm":
        bn = cast(nn.modules.batchnorm._BatchNorm, module)
        if bn.track_running_stats and bn.running_mean is not None:
            rm, rv = _param(bn, "running_mean"), _param(bn, "running_var")
            assert rm is not None and rv is not None
            return batch_norm_inference(x, rm, rv, w, b, bn.eps)
        return batch_norm_training(x, w, b, bn.eps)[0]
    if kind == "LayerNorm":
        ln = cast(nn.LayerNorm, module)
        return layer_norm(x, tuple(ln.normalized_shape), w, b, ln.eps)
    if kind == "GroupNorm":
        gn = cast(nn.GroupNorm, module)
        return group_norm(x, gn.num_groups, w, b, gn.eps)
    if kind == "InstanceNorm":
        inorm = cast(nn.modules.instancenorm._InstanceNorm, module)
        x = np.asarray(x, np.float64)
        unbatched = x.ndim == inorm._get_no_batch_dim()
        xb = x[None] if unbatched else x
        if inorm.track_running_stats and inorm.running_mean is not None:
            rm, rv = _param(inorm, "running_mean"), _param(inorm, "running_var")
            y = instance_norm(xb, w, b, inorm.eps, rm, rv)
        else:
            y = instance_norm(xb, w, b, inorm.eps)
        return y[0] if unbatched else y
    if kind == "RMSNorm":
        return _rms_oracle(module, x)
    raise TypeError(f"no numpy oracle for {type(module).__name__}")


def _rms_oracle(module: torch.nn.Module, x: Array) -> Array:
    """nn.RMSNorm, or a hand-written RMSNorm with ``weight`` and ``eps``/``variance_epsilon``
    (the Hugging Face spelling) over the trailing dims its weight spans."""
    w = _param(module, "weight")
    if not hasattr(module, "eps") and not hasattr(module, "variance_epsilon"):
        raise TypeError(f"{type(module).__name__} has no eps or variance_epsilon attribute")
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        shape = w.shape if w is not None else np.asarray(x).shape[-1:]
    return rms_norm(x, tuple(shape), w, None if eps is None else float(eps))
