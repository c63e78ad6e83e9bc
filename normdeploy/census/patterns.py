"""Pattern matchers: the node groups exporters write in place of a native norm op.

- the decomposed LayerNorm ``ReduceMean → Sub → square → ReduceMean → Add(eps) → root →
  normalize (→ Mul(scale) → Add(bias))``, as TorchScript and older opsets write it;
- the decomposed RMSNorm ``square → ReduceMean → Add(eps) → root → normalize (→ Mul(scale))``,
  as every exporter writes ``nn.RMSNorm`` (and hand-written RMSNorm classes) before opset 23;
- the GroupNorm construction ``Reshape → InstanceNormalization → Reshape (→ Mul → Add)`` that
  opsets before 21 use.

The square is ``Pow(d, 2)`` or ``Mul(d, d)``; the root and normalization are ``Sqrt`` then
``Div(d, ·)``, ``Reciprocal`` or ``Div(1, ·)`` then ``Mul(d, ·)``, or ``Pow(·, -0.5)`` then
``Mul(d, ·)``. The normalized axes must be the trailing axes (read from the ReduceMean ``axes``
attribute or input, with ``keepdims=1``), and both means must be over the same axes.

A matcher takes one scope's :class:`GraphIndex` and a candidate anchor node and returns a
:class:`Match` carrying everything a rewrite needs (data input, axes, epsilon, affine constants,
output value, every node), or a falsy :class:`NoMatch` with the reason. The census counts and
lints matches; a fusion pass rewrites them with the same matchers (and checks
:meth:`Match.rewrite_blocker` first). Something that only looks like a norm — a magnitude
``sqrt(x² + y²)``, a mean over a leading axis, a ``Sub`` of some other mean — does not match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from normdeploy.onnx_graph import GraphIndex, NotLoadedError, attr, in_default_domain

NATIVE_NORM_OPS = (
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "RMSNormalization",
)
DECOMPOSED_LAYERNORM = "decomposed LayerNorm"
DECOMPOSED_RMSNORM = "decomposed RMSNorm"
GROUPNORM_TRICK = "InstanceNormalization+Reshape"
DECOMPOSITION = "decomposition"

# Which norm each kind of node or pattern is, and how it is written: "GroupNorm as …".
_NORM_OF = {
    "BatchNormalization": "BatchNorm",
    "LayerNormalization": "LayerNorm",
    "GroupNormalization": "GroupNorm",
    "InstanceNormalization": "InstanceNorm",
    "RMSNormalization": "RMSNorm",
    DECOMPOSED_LAYERNORM: "LayerNorm",
    DECOMPOSED_RMSNORM: "RMSNorm",
    GROUPNORM_TRICK: "GroupNorm",
}
_REPRESENTATION_OF = {DECOMPOSED_LAYERNORM: DECOMPOSITION, DECOMPOSED_RMSNORM: DECOMPOSITION}
# The native op a decomposition stands for, and the first opset that has it.
NATIVE_FOR = {
    DECOMPOSED_LAYERNORM: ("LayerNormalization", 17),
    DECOMPOSED_RMSNORM: ("RMSNormalization", 23),
}


def norm_of(kind: str) -> str:
    """The norm a node or pattern kind computes ('GroupNorm' for the InstanceNorm trick)."""
    return _NORM_OF.get(kind, kind)


def representation_of(kind: str) -> str:
    """How that norm is written: the native op, 'decomposition' or the construction's name."""
    return _REPRESENTATION_OF.get(kind, kind)


def describe_kind(kind: str) -> str:
    """'GroupNorm as InstanceNormalization+Reshape', 'RMSNorm as decomposition', …"""
    return f"{norm_of(kind)} as {representation_of(kind)}"


@dataclass(frozen=True)
class NoMatch:
    """Why a candidate is not the pattern; falsy."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Match:
    """One pattern instance, with what a rewrite into the native op needs."""

    kind: str
    anchor: onnx.NodeProto
    nodes: tuple[onnx.NodeProto, ...]
    data_input: str
    output: str = ""  # the value the whole pattern computes (after the affine, if matched)
    axes: tuple[int, ...] = ()  # normalized axes, counted from the end (-1 is the last)
    epsilon: float | None = None
    epsilon_reason: str = ""  # why ``epsilon`` is None
    eps_value: str | None = None  # the name of the epsilon constant, decompositions only
    scale: str | None = None  # the affine Mul's constant operand
    bias: str | None = None  # the affine Add's constant operand

    def __bool__(self) -> bool:
        return True

    @property
    def norm(self) -> str:
        return norm_of(self.kind)

    @property
    def axis(self) -> int | None:
        """The first normalized axis (the native ops' ``axis`` attribute), negative."""
        return min(self.axes) if self.axes else None

    def op_types(self) -> str:
        """The pattern's ops in order, each once: 'Pow/ReduceMean/Add/Sqrt/Div'."""
        return "/".join(dict.fromkeys(n.op_type for n in self.nodes))

    def rewrite_blocker(self, index: GraphIndex) -> str | None:
        """Why the nodes cannot be replaced by one op computing :attr:`output`, or None:
        an intermediate value is a graph output or is read outside the pattern."""
        inside = {id(n) for n in self.nodes}
        for node in self.nodes:
            for value in node.output:
                if not value or value == self.output:
                    continue
                if value in index.graph_outputs:
                    return f"'{value}' inside the {self.kind} is a graph output"
                if value in index.subgraph_uses:
                    return f"'{value}' inside the {self.kind} is read inside a subgraph"
                outside = [u for u in index.consumers.get(value, []) if id(u) not in inside]
                if outside:
                    return f"'{value}' inside the {self.kind} is also read by {outside[0].op_type}"
        return None


# ----------------------------------------------------------------------------- helpers


def _const(index: GraphIndex, name: str) -> np.ndarray | None:
    try:
        return index.const_array(name) if name else None
    except NotLoadedError:
        return None


def _is_float(dtype: np.dtype) -> bool:
    """numpy floats and bfloat16 (an ml_dtypes type, whose numpy kind is 'V')."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _scalar(index: GraphIndex, name: str) -> float | None:
    """The value of a one-element constant, else None."""
    value = _const(index, name)
    if (
        value is None
        or value.size != 1
        or not (value.dtype.kind in "iu" or _is_float(value.dtype))
    ):
        return None
    return float(value.reshape(-1)[0])


def _other(node: onnx.NodeProto, value: str) -> str | None:
    """The other operand of a binary node that reads ``value`` (None if it reads it twice)."""
    ins = list(node.input[:2])
    if len(ins) != 2 or value not in ins:
        return None
    return ins[1] if ins[0] == value else ins[0]


def _is_square_of(index: GraphIndex, node: onnx.NodeProto, value: str) -> bool:
    if node.op_type == "Mul":
        return list(node.input[:2]) == [value, value]
    return (
        node.op_type == "Pow"
        and len(node.input) == 2
        and node.input[0] == value
        and _scalar(index, node.input[1]) == 2.0
    )


def _normalized_axes(
    index: GraphIndex, mean: onnx.NodeProto, data: str
) -> tuple[int, ...] | NoMatch:
    """The ReduceMean's axes counted from the end, if they are the trailing axes of ``data``."""
    if attr(mean, "keepdims", 1) != 1:
        return NoMatch("ReduceMean with keepdims=0 cannot broadcast back over its input")
    axes_attr = attr(mean, "axes")
    if axes_attr is not None:
        axes = [int(a) for a in axes_attr]
    elif len(mean.input) > 1 and mean.input[1]:
        value = _const(index, mean.input[1])
        if value is None:
            return NoMatch("ReduceMean axes are computed, not a constant")
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    else:
        axes = []
    if not axes:
        return NoMatch("ReduceMean over every axis (the batch too) is not a per-sample norm")
    if any(a >= 0 for a in axes):
        rank = index.rank(data)
        if rank is None:
            return NoMatch(f"ReduceMean over axes {axes} of an input of unknown rank")
        axes = [a - rank if a >= 0 else a for a in axes]
    normalized = tuple(sorted(set(axes)))
    if normalized != tuple(range(-len(normalized), 0)):
        return NoMatch(f"ReduceMean over axes {axes}: not the trailing axes")
    return normalized


@dataclass(frozen=True)
class _Tail:
    """square → ReduceMean → Add(eps) → root → normalize → affine, from one centered value."""

    nodes: tuple[onnx.NodeProto, ...]
    axes: tuple[int, ...]
    output: str
    epsilon: float | None
    epsilon_reason: str
    eps_value: str | None
    scale: str | None
    bias: str | None


def _normalize_step(
    index: GraphIndex, root_in: str, centered: str
) -> tuple[onnx.NodeProto, ...] | NoMatch:
    """``centered / sqrt(root_in)`` in any of its common spellings: the nodes, in order."""
    for user in index.consumers.get(root_in, []):
        if user.op_type == "Sqrt":
            std = user.output[0]
            for v in index.consumers.get(std, []):
                if v.op_type == "Div" and list(v.input[:2]) == [centered, std]:
                    return (user, v)
                reciprocal = v.op_type == "Reciprocal" or (
                    v.op_type == "Div"
                    and v.input[1] == std
                    and _scalar(index, v.input[0]) == 1
                )
                if reciprocal:
                    mul = _mul_with(index, v.output[0], centered)
                    if mul is not None:
                        return (user, v, mul)
        elif user.op_type == "Pow" and _scalar(index, user.input[1]) == -0.5:
            mul = _mul_with(index, user.output[0], centered)
            if mul is not None:
                return (user, mul)
    return NoMatch(
        "the mean of squares plus epsilon is not used as sqrt(·) dividing the centered input"
    )


def _mul_with(index: GraphIndex, value: str, other: str) -> onnx.NodeProto | None:
    return next(
        (
            m
            for m in index.consumers.get(value, [])
            if m.op_type == "Mul" and _other(m, value) == other
        ),
        None,
    )


def _affine(
    index: GraphIndex, value: str, axes: tuple[int, ...], op: str
) -> tuple[onnx.NodeProto, str] | None:
    """``op(value, c)`` with ``c`` a constant over the normalized axes, when it alone reads
    ``value`` (else the affine is not part of this norm)."""
    users = index.consumers.get(value, [])
    if len(users) != 1 or users[0].op_type != op or value in index.graph_outputs:
        return None
    node = users[0]
    const = _other(node, value)
    array = _const(index, const) if const else None
    if array is None or not _is_float(array.dtype):
        return None
    leading = array.shape[: max(0, array.ndim - len(axes))]
    if any(d != 1 for d in leading):
        return None  # it would scale along a non-normalized axis: not an affine of this norm
    assert const is not None
    return node, const


def _tail(
    index: GraphIndex, square: onnx.NodeProto, centered: str, data: str, with_bias: bool
) -> _Tail | NoMatch:
    """From the square of ``centered`` (``data`` centered, or ``data`` itself) to the end."""
    mean = index.consumer(square.output[0], "ReduceMean")
    if mean is None:
        return NoMatch("the square is not averaged by a ReduceMean")
    axes = _normalized_axes(index, mean, data)
    if isinstance(axes, NoMatch):
        return axes
    add = index.consumer(mean.output[0], "Add")
    if add is None:
        return NoMatch("no epsilon is added to the mean of squares before the root")
    eps_value = _other(add, mean.output[0])
    epsilon = _scalar(index, eps_value) if eps_value else None
    why = "" if epsilon is not None else f"epsilon '{eps_value}' is not a constant scalar"
    steps = _normalize_step(index, add.output[0], centered)
    if isinstance(steps, NoMatch):
        return steps
    nodes = [square, mean, add, *steps]
    out = steps[-1].output[0]
    scale = bias = None
    if (found := _affine(index, out, axes, "Mul")) is not None:
        nodes.append(found[0])
        scale, out = found[1], found[0].output[0]
    if with_bias and (found := _affine(index, out, axes, "Add")) is not None:
        nodes.append(found[0])
        bias, out = found[1], found[0].output[0]
    return _Tail(tuple(nodes), axes, out, epsilon, why, eps_value, scale, bias)


def mean_subtracted(index: GraphIndex, value: str) -> tuple[str, str, onnx.NodeProto] | None:
    """``(a, b, the ReduceMean)`` when ``value`` is ``Sub(a, ReduceMean(b))``, else None."""
    sub = index.producer.get(value)
    if sub is None or sub.op_type != "Sub" or len(sub.input) != 2:
        return None
    mean = index.producer.get(sub.input[1])
    if mean is None or mean.op_type != "ReduceMean" or not mean.input:
        return None
    return sub.input[0], mean.input[0], mean


# ----------------------------------------------------------------------------- matchers


def match_decomposed_layernorm(index: GraphIndex, r1: onnx.NodeProto) -> Match | NoMatch:
    """ReduceMean(x) → Sub(x, mean) → square → ReduceMean → Add(eps) → root → normalize."""
    if r1.op_type != "ReduceMean" or not r1.input or not r1.output:
        return NoMatch("not a ReduceMean")
    x, mean = r1.input[0], r1.output[0]
    axes = _normalized_axes(index, r1, x)
    if isinstance(axes, NoMatch):
        return axes
    reason = NoMatch("the mean is not subtracted from its own input")
    for sub in index.consumers.get(mean, []):
        if sub.op_type != "Sub" or list(sub.input[:2]) != [x, mean]:
            continue
        d = sub.output[0]
        for square in index.consumers.get(d, []):
            if not _is_square_of(index, square, d):
                continue
            tail = _tail(index, square, d, x, with_bias=True)
            if isinstance(tail, NoMatch):
                reason = tail
                continue
            if tail.axes != axes:
                reason = NoMatch(
                    f"variance over axes {list(tail.axes)}, mean over {list(axes)}"
                )
                continue
            return Match(
                DECOMPOSED_LAYERNORM, r1, (r1, sub, *tail.nodes), x, tail.output, axes,
                tail.epsilon, tail.epsilon_reason, tail.eps_value, tail.scale, tail.bias,
            )  # fmt: skip
    return reason


def match_decomposed_rmsnorm(index: GraphIndex, square: onnx.NodeProto) -> Match | NoMatch:
    """square(x) → ReduceMean → Add(eps) → root → normalize x (→ Mul(scale))."""
    if square.op_type not in ("Pow", "Mul") or not square.input or not square.output:
        return NoMatch("not a square")
    x = square.input[0]
    if not _is_square_of(index, square, x):
        return NoMatch(f"{square.op_type} is not a square of its input")
    if (centered := mean_subtracted(index, x)) is not None:
        if centered[0] == centered[1]:
            return NoMatch("its input is x - mean(x): part of a decomposed LayerNorm")
        return NoMatch("its input subtracts the mean of another tensor: not a norm")
    tail = _tail(index, square, x, x, with_bias=False)
    if isinstance(tail, NoMatch):
        return tail
    return Match(
        DECOMPOSED_RMSNORM, square, tail.nodes, x, tail.output, tail.axes, tail.epsilon,
        tail.epsilon_reason, tail.eps_value, tail.scale, None,
    )  # fmt: skip


def match_groupnorm_trick(index: GraphIndex, inorm: onnx.NodeProto) -> Match | NoMatch:
    """Reshape → InstanceNormalization → Reshape (→ Mul → Add): GroupNorm before opset 21."""
    if inorm.op_type != "InstanceNormalization" or not inorm.input:
        return NoMatch("not an InstanceNormalization")
    pre = index.producer.get(inorm.input[0])
    post = index.consumer(inorm.output[0], "Reshape")
    if pre is None or pre.op_type != "Reshape" or post is None:
        return NoMatch("InstanceNormalization without a Reshape on both sides")
    nodes = [pre, inorm, post]
    mul = index.consumer(post.output[0], "Mul")
    if mul is not None:
        nodes.append(mul)
        add = index.consumer(mul.output[0], "Add")
        if add is not None:
            nodes.append(add)
    epsilon = float(np.float32(attr(inorm, "epsilon", 1e-5)))
    return Match(
        GROUPNORM_TRICK, inorm, tuple(nodes), pre.input[0], nodes[-1].output[0],
        epsilon=epsilon,
    )  # fmt: skip


Matcher = Callable[[GraphIndex, onnx.NodeProto], Match | NoMatch]
MATCHERS: tuple[Matcher, ...] = (
    match_decomposed_layernorm,
    match_decomposed_rmsnorm,
    match_groupnorm_trick,
)
PATTERN_KINDS = (DECOMPOSED_LAYERNORM, DECOMPOSED_RMSNORM, GROUPNORM_TRICK)


def match_at(index: GraphIndex, node: onnx.NodeProto) -> Match | None:
    """The first pattern anchored at ``node``, or None (default-domain nodes only)."""
    if not in_default_domain(node):
        return None
    for matcher in MATCHERS:
        if found := matcher(index, node):
            assert isinstance(found, Match)
            return found
    return None
