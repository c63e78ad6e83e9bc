"""Pattern matchers: the node groups exporters write in place of a native norm op.

- the decomposed LayerNorm ``ReduceMean → Sub → Pow/Mul(d, d) → ReduceMean → Add(eps) → Sqrt →
  Div`` (or ``Reciprocal → Mul``), as TorchScript and older opsets write it;
- the GroupNorm construction ``Reshape → InstanceNormalization → Reshape (→ Mul → Add)`` that
  opsets before 21 use.

A matcher takes one scope's :class:`GraphIndex` and a candidate anchor node and returns a
:class:`Match` (the nodes, the data input, the epsilon constant) or None. The census counts and
lints matches; graph passes that rewrite a pattern use the same matchers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from normdeploy.onnx_graph import GraphIndex, in_default_domain

NATIVE_NORM_OPS = (
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
)
DECOMPOSED_LAYERNORM = "decomposed LayerNorm"
GROUPNORM_TRICK = "InstanceNormalization+Reshape"


@dataclass(frozen=True)
class Match:
    """One pattern instance: its kind, anchor node, every node in it, and its data input."""

    kind: str
    anchor: onnx.NodeProto
    nodes: tuple[onnx.NodeProto, ...]
    data_input: str
    eps_value: str | None = None  # the name of the epsilon constant, decompositions only


def match_decomposed_layernorm(index: GraphIndex, r1: onnx.NodeProto) -> Match | None:
    """ReduceMean(x) → Sub(x, mean) → Pow/Mul(d, d) → ReduceMean → Add(eps) → Sqrt → Div(d, ·)."""
    if r1.op_type != "ReduceMean" or not r1.input or not r1.output:
        return None
    x, mean = r1.input[0], r1.output[0]
    for sub in index.consumers.get(mean, []):
        if sub.op_type != "Sub" or list(sub.input[:2]) != [x, mean]:
            continue
        d = sub.output[0]
        squares = [
            c
            for c in index.consumers.get(d, [])
            if c.op_type == "Pow" or (c.op_type == "Mul" and list(c.input[:2]) == [d, d])
        ]
        for sq in squares:
            r2 = index.consumer(sq.output[0], "ReduceMean")
            add = r2 and index.consumer(r2.output[0], "Add")
            sqrt = add and index.consumer(add.output[0], "Sqrt")
            if not sqrt or not r2 or not add:
                continue
            div = index.consumer(sqrt.output[0], "Div")
            tail: tuple[onnx.NodeProto, ...] = ()
            if div is not None and div.input[0] == d:
                tail = (div,)
            else:
                rec = index.consumer(sqrt.output[0], "Reciprocal")
                mul = rec and index.consumer(rec.output[0], "Mul")
                if not rec or mul is None or d not in mul.input:
                    continue
                tail = (rec, mul)
            eps = next((i for i in add.input if i != r2.output[0]), None)
            nodes = (r1, sub, sq, r2, add, sqrt, *tail)
            return Match(DECOMPOSED_LAYERNORM, r1, nodes, x, eps)
    return None


def match_groupnorm_trick(index: GraphIndex, inorm: onnx.NodeProto) -> Match | None:
    """Reshape → InstanceNormalization → Reshape (→ Mul → Add): GroupNorm before opset 21."""
    if inorm.op_type != "InstanceNormalization" or not inorm.input:
        return None
    pre = index.producer.get(inorm.input[0])
    post = index.consumer(inorm.output[0], "Reshape")
    if pre is None or pre.op_type != "Reshape" or post is None:
        return None
    nodes = [pre, inorm, post]
    mul = index.consumer(post.output[0], "Mul")
    if mul is not None:
        nodes.append(mul)
        add = index.consumer(mul.output[0], "Add")
        if add is not None:
            nodes.append(add)
    return Match(GROUPNORM_TRICK, inorm, tuple(nodes), pre.input[0])


MATCHERS: tuple[Callable[[GraphIndex, onnx.NodeProto], Match | None], ...] = (
    match_decomposed_layernorm,
    match_groupnorm_trick,
)
PATTERN_KINDS = (DECOMPOSED_LAYERNORM, GROUPNORM_TRICK)


def match_at(index: GraphIndex, node: onnx.NodeProto) -> Match | None:
    """The first pattern anchored at ``node``, or None (default-domain nodes only)."""
    if not in_default_domain(node):
        return None
    for matcher in MATCHERS:
        if (found := matcher(index, node)) is not None:
            return found
    return None
