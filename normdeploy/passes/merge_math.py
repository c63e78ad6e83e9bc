"""Merging parallel linear branches into one convolution: pure float64 functions, no ONNX, no
torch (RepVGG's structural re-parameterization, generalized to any aligned kernels).

Branches that read the same tensor ``x`` and are summed, ``Σᵢ convᵢ(x) + x·s + t`` (the last
term an identity branch: a BatchNorm on ``x`` with ``s, t`` from :func:`fold_math.bn_scale_shift`,
or ``x`` itself with ``s = 1, t = 0``), are one convolution when every branch reads, for each
output position, the same input positions as some tap of one *base* kernel.

Per spatial axis, a convolution with kernel ``k``, stride ``S``, dilation ``d`` and pads
``(p_b, p_e)`` reads input ``i·S − p_b + j·d`` for output ``i`` and tap ``j = 0 … k−1`` (zeros
outside the input). Branch ``B`` embeds into base ``A`` at tap offset ``o`` when, for every tap,
``−p_bA + (j + o)·d = −p_bB + j·d`` with the same stride and dilation, i.e.::

    o = (p_bA − p_bB) / d   a whole number with 0 ≤ o ≤ k_A − k_B

and both produce the same output size for every input size::

    p_bA + p_eA − d·(k_A − 1)  =  p_bB + p_eB − d·(k_B − 1)

(with a 1-tap kernel the branch's own dilation reads nothing, so it need not match). Padded
positions read zeros in both, so the embedding is exact there too. RepVGG's "pad the 1×1 kernel
to 3×3 at the centre" is the case ``k_A = 3, k_B = 1, p_bA = 1, p_bB = 0``. The identity is a
1-tap kernel with stride 1 and no padding, weight ``s[o]`` from input channel ``o`` to output
channel ``o``, which needs as many input as output channels (then channel ``o`` lies in the same
group on both sides, for any group count). The merged convolution has the base's geometry and::

    W = Σᵢ embed(Wᵢ, oᵢ) + Σ identity(s, o)        b = Σᵢ bᵢ + Σ t

The ONNX pass (:mod:`normdeploy.passes.merge_branches`) and the module merge
(:mod:`normdeploy.torch_merge`) both call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution reads its input: per spatial axis kernel size, stride, dilation and
    the pads before and after; and its group count."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int = 1

    @classmethod
    def identity(cls, base: ConvGeometry) -> ConvGeometry:
        """The identity branch as a convolution: one tap, stride 1, no padding."""
        n = len(base.kernel)
        return cls((1,) * n, (1,) * n, base.dilations, (0,) * n, (0,) * n, base.group)

    def size_offset(self, axis: int) -> int:
        """``p_b + p_e − d·(k − 1)``: with equal strides, equal offsets mean equal output sizes."""
        k, d = self.kernel[axis], self.dilations[axis]
        return self.pads_begin[axis] + self.pads_end[axis] - d * (k - 1)


def _axes(values: Sequence[int]) -> str:
    return "×".join(str(v) for v in values)


def alignment_reason(base: ConvGeometry, branch: ConvGeometry) -> str | None:
    """Why ``branch`` cannot be embedded in ``base``'s kernel, or None when it can."""
    n = len(base.kernel)
    if len(branch.kernel) != n:
        return f"{len(branch.kernel)}-D kernel, the base's is {n}-D"
    if branch.group != base.group:
        return f"group={branch.group}, the base has group={base.group}"
    if branch.strides != base.strides:
        return f"strides {_axes(branch.strides)} differ from the base's {_axes(base.strides)}"
    for axis in range(n):
        if branch.kernel[axis] > 1 and branch.dilations[axis] != base.dilations[axis]:
            return (
                f"dilations {_axes(branch.dilations)} differ from the base's "
                f"{_axes(base.dilations)}"
            )
    if any(kb > ka for kb, ka in zip(branch.kernel, base.kernel, strict=True)):
        return f"kernel {_axes(branch.kernel)} does not fit in the base's {_axes(base.kernel)}"
    for axis in range(n):
        shift = base.pads_begin[axis] - branch.pads_begin[axis]
        d = base.dilations[axis]
        room = base.kernel[axis] - branch.kernel[axis]
        if shift % d or not 0 <= shift // d <= room:
            return (
                f"padding does not line up: pads {_axes(branch.pads_begin)}/"
                f"{_axes(branch.pads_end)} against the base's {_axes(base.pads_begin)}/"
                f"{_axes(base.pads_end)} put its taps between or outside the base's"
            )
        if branch.size_offset(axis) != base.size_offset(axis):
            return (
                f"output size differs from the base's (pads {_axes(branch.pads_begin)}/"
                f"{_axes(branch.pads_end)} against {_axes(base.pads_begin)}/"
                f"{_axes(base.pads_end)})"
            )
    return None


def tap_offsets(base: ConvGeometry, branch: ConvGeometry) -> tuple[int, ...]:
    """Where ``branch``'s first tap sits in ``base``'s kernel, per axis (after
    :func:`alignment_reason` returned None)."""
    return tuple(
        (pb_a - pb_b) // d
        for pb_a, pb_b, d in zip(
            base.pads_begin, branch.pads_begin, base.dilations, strict=True
        )
    )


def _taps(offsets: Sequence[int], kernel: Sequence[int]) -> tuple[slice, ...]:
    """Index of a (C_out, C_in/g, k…) weight placed at tap ``offsets`` of a larger kernel."""
    where = tuple(slice(o, o + k) for o, k in zip(offsets, kernel, strict=True))
    return (slice(None), slice(None), *where)


def _identity_taps(c: int, group: int, offsets: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Index of weight entry [o, o mod C/g, offsets…] for every channel o: input channel o of
    output channel o, which lies in the same group when C_in = C_out = C."""
    channels = np.arange(c)
    return (channels, channels % (c // group), *(np.full(c, o) for o in offsets))


@dataclass(frozen=True)
class ConvTerm:
    """One convolution branch: weight, bias (None for none) and its tap offsets in the base."""

    weight: np.ndarray
    bias: np.ndarray | None
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class IdentityTerm:
    """One identity branch ``x·s + t`` at tap ``offsets`` of the base kernel."""

    scale: np.ndarray
    shift: np.ndarray
    offsets: tuple[int, ...]


def merge_branches(
    weight_shape: Sequence[int],
    group: int,
    convs: Sequence[ConvTerm],
    identities: Sequence[IdentityTerm] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the one convolution that computes the sum of the branches, in float64.

    ``weight_shape`` is the base's weight shape (C_out, C_in/g, k…); every term was placed by
    :func:`tap_offsets` against the base's geometry.
    """
    c_out = int(weight_shape[0])
    w = np.zeros(tuple(int(d) for d in weight_shape))
    b = np.zeros(c_out)
    for conv in convs:
        # in place, so a large kernel costs no float64 copies beyond the result
        weight = np.asarray(conv.weight)
        w[_taps(conv.offsets, weight.shape[2:])] += weight
        if conv.bias is not None:
            b += np.asarray(conv.bias, np.float64).reshape(-1)
    for ident in identities:
        w[_identity_taps(c_out, group, ident.offsets)] += np.asarray(ident.scale).reshape(-1)
        b += np.asarray(ident.shift, np.float64).reshape(-1)
    return w, b
