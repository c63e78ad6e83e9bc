"""Which axis of a tensor an axis becomes through shape-only ops: pure, no ONNX and no torch.

A BatchNorm scales and shifts along axis 1 of its input. Folding it into a producer (or a
consumer) that sits behind Reshape/Flatten/Transpose/Squeeze/Unsqueeze (or torch's
``view/reshape/flatten/transpose/permute/squeeze/unsqueeze``) is exact when that axis is exactly
one axis of the producer's output: the same elements along it, in the same order. This module
proves it from shapes, or says why not.

- A permutation (Transpose, ``permute``): output axis ``i`` is input axis ``perm[i]``.
- Everything else here keeps the elements in row-major (flat) order and only regroups them. The
  coordinate along an axis of size ``n`` whose trailing axes hold ``S`` elements is
  ``(f // S) % n`` for flat index ``f``. So output axis ``k`` is input axis ``j`` exactly when
  ``out[k] == in[j]`` and ``prod(out[k+1:]) == prod(in[j+1:])``, for every value the symbolic
  dims may take. Products are compared symbolically (a dim named ``N`` cancels only another
  ``N``; ``"7*b"`` reads as ``7 · b``); an unknown dim proves nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

Dim = int | str | None
Shape = tuple[Dim, ...]

_FACTOR = re.compile(r"^\s*(?:\d+|[A-Za-z_][\w.]*)\s*$")


@dataclass(frozen=True)
class ShapeStep:
    """One shape-only op: its input and output shapes, and for a permutation its ``perm``
    (output axis ``i`` is input axis ``perm[i]``); ``label`` names it in reasons."""

    label: str
    in_shape: Shape | None
    out_shape: Shape | None
    perm: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AxisMap:
    """The axis an axis maps to, or None and why not."""

    axis: int | None
    reason: str = ""

    @property
    def mapped(self) -> bool:
        return self.axis is not None


@dataclass(frozen=True)
class _Product:
    """A product of dims: an integer coefficient times symbols (with multiplicity)."""

    coefficient: int
    symbols: tuple[tuple[str, int], ...]


def _product(dims: Sequence[Dim]) -> _Product | None:
    """The symbolic product of ``dims``; None when one of them is unknown."""
    coefficient = 1
    symbols: Counter[str] = Counter()
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            if d < 0:
                return None
            coefficient *= d
            continue
        factors = d.split("*")
        if not all(_FACTOR.match(f) for f in factors):
            symbols[d.strip()] += 1  # an expression we do not read: an opaque symbol
            continue
        for f in (f.strip() for f in factors):
            if f.isdigit():
                coefficient *= int(f)
            else:
                symbols[f] += 1
    return _Product(coefficient, tuple(sorted(symbols.items())))


def _same_dim(a: Dim, b: Dim) -> bool:
    if a is None or b is None:
        return False
    pa, pb = _product([a]), _product([b])
    return pa is not None and pa == pb


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _flat_order_match(
    src: Shape, dst: Shape, axis: int, label: str, direction: str
) -> AxisMap:
    """The axis of ``dst`` that is exactly ``axis`` of ``src`` (flat order kept)."""
    if not -len(src) <= axis < len(src):
        return AxisMap(None, f"{label}: axis {axis} is outside {_fmt(src)}")
    axis %= len(src)
    size, stride = src[axis], _product(src[axis + 1 :])
    if size is None or stride is None:
        return AxisMap(None, f"{label}: the {direction} shape {_fmt(src)} is not fully known")
    for k in range(len(dst) - 1, -1, -1):
        if _same_dim(dst[k], size) and _product(dst[k + 1 :]) == stride:
            return AxisMap(k)
    if not isinstance(size, int):
        return AxisMap(
            None,
            f"{label}: axis {axis} of {_fmt(src)} has no fixed size, so it is no proven axis "
            f"of {_fmt(dst)}",
        )
    return AxisMap(
        None,
        f"{label} merges or splits the channel axis: axis {axis} of {_fmt(src)} is no single "
        f"axis of {_fmt(dst)}",
    )


def source_axis(step: ShapeStep, out_axis: int) -> AxisMap:
    """The input axis of ``step`` that output axis ``out_axis`` exactly is."""
    if step.perm is not None:
        if not -len(step.perm) <= out_axis < len(step.perm):
            return AxisMap(None, f"{step.label}: axis {out_axis} is outside its permutation")
        return AxisMap(step.perm[out_axis])
    if step.in_shape is None or step.out_shape is None:
        return AxisMap(None, f"{step.label}: its input or output shape is unknown")
    return _flat_order_match(step.out_shape, step.in_shape, out_axis, step.label, "output")


def target_axis(step: ShapeStep, in_axis: int) -> AxisMap:
    """The output axis of ``step`` that input axis ``in_axis`` exactly becomes."""
    if step.perm is not None:
        rank = len(step.perm)
        if not -rank <= in_axis < rank:
            return AxisMap(None, f"{step.label}: axis {in_axis} is outside its permutation")
        return AxisMap(list(step.perm).index(in_axis % rank))
    if step.in_shape is None or step.out_shape is None:
        return AxisMap(None, f"{step.label}: its input or output shape is unknown")
    return _flat_order_match(step.in_shape, step.out_shape, in_axis, step.label, "input")


def coalesce(steps: Sequence[ShapeStep]) -> list[ShapeStep]:
    """Consecutive flat-order steps as one: a merge then a split back keeps an axis that each
    step alone would mix (``(b, t, f) → (b, t·f) → (b, t, f)``)."""
    out: list[ShapeStep] = []
    for step in steps:
        last = out[-1] if out else None
        if last is not None and last.perm is None and step.perm is None:
            out[-1] = ShapeStep(f"{last.label}, {step.label}", last.in_shape, step.out_shape)
        else:
            out.append(step)
    return out


def trace_back(steps: Sequence[ShapeStep], axis: int) -> AxisMap:
    """The axis at the start of ``steps`` (ordered producer → BatchNorm) that ``axis`` of the
    last step's output exactly is."""
    for step in reversed(coalesce(steps)):
        found = source_axis(step, axis)
        if found.axis is None:
            return found
        axis = found.axis
    return AxisMap(axis)


def trace_forward(steps: Sequence[ShapeStep], axis: int) -> AxisMap:
    """The axis of the last step's output (``steps`` ordered BatchNorm → consumer) that
    ``axis`` of the first step's input exactly becomes."""
    for step in coalesce(steps):
        found = target_axis(step, axis)
        if found.axis is None:
            return found
        axis = found.axis
    return AxisMap(axis)
