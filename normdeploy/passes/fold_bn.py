"""fold-bn: fold BatchNormalization into the neighbouring Conv / ConvTranspose / Gemm / MatMul.

The arithmetic and the weight layouts are in :mod:`normdeploy.passes.fold_math`. *Preceding*:
``BN(P(x))`` with P a Conv/ConvTranspose (any group)/Gemm/MatMul, optionally through an ``Add``
of a constant per-channel bias; P's weight and bias absorb the BN (a MatMul has no bias: the BN
becomes ``Add(x, t)``). *Following*: ``C(BN(x))`` with C an unpadded Conv or a Gemm on the BN
output.

Both directions also fold through shape-only ops (Reshape, Flatten, Transpose, Squeeze,
Unsqueeze) between the BN and P or C — LeViT's ``Linear → Flatten → BatchNorm1d → Reshape``, a
token MLP's ``Linear → Transpose → BatchNorm1d → Transpose`` — when the BN's channel axis
(axis 1 of its input) provably is exactly P's output-feature axis (C's input-feature axis): the
proof is :mod:`normdeploy.passes.axis_map`'s, from shapes that onnx shape inference derives from
the graph (declared value_info fills what it leaves unknown). The shape-only ops stay in place.

Everything is computed in float64 and cast once to the weight's dtype; a result that does not fit
that dtype (fp16 overflow) is refused. A fold that is not provably exact is skipped and the
ledger says why: the producer's output has other readers or is a graph output, parameters are
not constants (initializers and Constant nodes count, also through Identity/Transpose),
``training_mode=1`` or extra BN outputs, a channel mismatch, unknown ranks, non-finite
statistics, a BN inside a control-flow subgraph or a function (left as it was).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from normdeploy.errors import InvalidModelError
from normdeploy.onnx_graph import (
    FLOAT_TENSOR_TYPES,
    GraphIndex,
    NotLoadedError,
    attr,
    attr_str,
    default_opset,
    in_default_domain,
    inferred_value_infos,
    nested_graphs,
    node_label,
    np_dtype,
    undefined_input,
    weight_bytes,
)
from normdeploy.passes import (
    FOLDED,
    KEPT,
    GraphPass,
    LedgerEntry,
    PassContractError,
    PassResult,
)
from normdeploy.passes.axis_map import ShapeStep, trace_back, trace_forward
from normdeploy.passes.fold_math import (
    bn_scale_shift,
    fit_reason,
    fold_bias_constant,
    fold_into_producer,
    output_channels,
    scale_conv_input_channels,
    scale_gemm_input_features,
    scale_output_channels,
)
from normdeploy.passes.surgery import GraphEditor, NameAllocator, set_attr

MIN_OPSET = 9  # BatchNormalization before opset 9 had the `spatial`/`is_test` semantics
# onnx.checker serializes the model (one more copy of every weight); above this many bytes of
# weights the pass relies on its own structural check (every node input defined before use).
CHECKER_MAX_BYTES = 64 * 2**20
_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ROLES = ("X", "W", "B")
# Ops that only regroup or reorder elements: a BN behind them folds when its channel axis maps
# to one axis of the producer's output (see axis_map).
SHAPE_ONLY_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


def is_batch_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and in_default_domain(node)


def validate_for_folding(model: onnx.ModelProto, source: str) -> None:
    """Raise InvalidModelError (one line) when the model cannot be folded safely at all."""
    opset = default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        raise InvalidModelError(
            f"{source}: opset {opset} is older than the oldest supported ({MIN_OPSET}); "
            "upgrade it with onnx.version_converter first"
        )
    if (where := undefined_input(model.graph)) is not None:
        node, name = where
        raise InvalidModelError(
            f"{source}: fails onnx.checker: node '{node.name or node.op_type}' reads "
            f"'{name}', which nothing defines before it"
        )
    if weight_bytes(model) <= CHECKER_MAX_BYTES:
        try:
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, RecursionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise InvalidModelError(f"{source}: fails onnx.checker: {first[:200]}") from None


class _Skip(Exception):
    """A fold that is not provably exact; the message is the ledger's reason."""


class _Invalid(_Skip):
    """The BN itself computes NaN/inf (broken statistics): kept, and the input is flagged."""


@dataclass
class _Plan:
    """New constant values for one fold, applied only after every check passed."""

    direction: str  # "preceding" | "following"
    target: onnx.NodeProto
    dtype: np.dtype  # the target weight's dtype; every new value is cast to it once
    updates: list[tuple[onnx.NodeProto, int, np.ndarray]] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    rewire: onnx.NodeProto | None = None  # preceding: this node's output becomes BN's output
    reader: onnx.NodeProto | None = None  # following: this node reads BN's input instead
    shift: np.ndarray | None = None  # MatMul without a bias Add: BN becomes Add(x, shift)
    chain: tuple[onnx.NodeProto, ...] = ()  # shape-only ops between the BN and the target

    def check_fits(self, t: np.ndarray) -> None:
        values = [v for _, _, v in self.updates]
        if self.shift is not None:
            values.append(self.shift)
        if (why := fit_reason(values, t, self.dtype)) is not None:
            raise _Skip(why)


class FoldBatchNorm(GraphPass):
    """Fold every BatchNormalization that folds exactly, in place, with a ledger entry each."""

    name = "fold-bn"
    in_place = True
    subject = "BatchNormalization"
    stage = "fold"

    def requires(self, model: onnx.ModelProto, source: str) -> None:
        validate_for_folding(model, source)

    def call(self, model: onnx.ModelProto) -> PassResult:
        names = NameAllocator(model, "_bnfold")
        ledger = self._fold_graph(model, names, "main")
        ledger += self._nested_bns(model)
        return PassResult(model, any(e.applied for e in ledger), tuple(ledger))

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        super().ensures(model, result)
        left = sum(1 for n in model.graph.node if is_batch_norm(n))
        kept = sum(1 for e in result.ledger if e.graph == "main" and e.action == KEPT)
        if left != kept:
            raise PassContractError(
                f"{self.name}: {left} BatchNormalization left in the graph, ledger keeps {kept}"
            )

    @staticmethod
    def _nested_bns(model: onnx.ModelProto) -> list[LedgerEntry]:
        places = [
            (g, f"inside a {node.op_type} subgraph")
            for node in model.graph.node
            for g in nested_graphs([node])
        ]
        places += [
            (g, f"inside function '{fn.name}'")
            for fn in model.functions
            for g in (fn, *nested_graphs(fn.node))
        ]
        return [
            LedgerEntry(
                node_label(n),
                getattr(g, "name", "") or where.split()[-1].strip("'"),
                KEPT,
                reason=f"{where}: left as it was",
            )
            for g, where in places
            for n in g.node
            if is_batch_norm(n)
        ]

    def _fold_graph(
        self, model: onnx.ModelProto, names: NameAllocator, graph_name: str
    ) -> list[LedgerEntry]:
        graph = model.graph
        index = GraphIndex.of(graph)
        editor = GraphEditor(graph, index, names)
        ledger = []
        bns = [n for n in graph.node if is_batch_norm(n)]
        if any(_next_to_shape_ops(index, bn) for bn in bns):
            index.inferred = inferred_value_infos(model)  # the axis proofs need shapes
        for bn in bns:
            label = node_label(bn)
            try:
                plan = self._plan(index, bn)
            except _Skip as why:
                ledger.append(
                    LedgerEntry(
                        label,
                        graph_name,
                        KEPT,
                        reason=str(why),
                        invalid=isinstance(why, _Invalid),
                    )
                )
                continue
            _apply(editor, bn, plan)
            target = node_label(plan.target)  # after the edit: an unnamed target's new output
            notes = []
            if plan.chain:
                notes.append("through " + ", ".join(_step_label(n) for n in plan.chain))
            if plan.shift is not None:
                notes.append("shift kept as an Add (MatMul has no bias)")
            note = "; ".join(notes)
            ledger.append(
                LedgerEntry(
                    label,
                    graph_name,
                    FOLDED,
                    plan.direction,
                    target,
                    plan.target.op_type,
                    note,
                )
            )
        editor.finish()
        return ledger

    # -- checks and arithmetic; raise _Skip with the reason
    def _plan(self, index: GraphIndex, bn: onnx.NodeProto) -> _Plan:
        s, t = batch_norm_affine(index, bn)
        reasons = []
        for attempt in (_plan_preceding, _plan_following):
            try:
                plan = attempt(index, bn, s, t)
                plan.check_fits(t)
            except NotLoadedError as exc:  # noqa: PERF203
                reasons.append(str(exc))
            except _Skip as why:
                reasons.append(str(why))
            else:
                return plan
        raise _Skip("; ".join(reasons))


def batch_norm_affine(index: GraphIndex, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = x·s + t per channel, in float64; raises the reason it is not a
    constant per-channel affine (``_Invalid`` when its own statistics compute NaN/inf)."""
    if attr(bn, "training_mode", 0):
        raise _Skip("training_mode=1 (normalizes with batch statistics)")
    if any(out for out in bn.output[1:]):
        raise _Skip("extra outputs (running mean/var) are used")
    if attr(bn, "spatial", 1) != 1:
        raise _Skip("spatial=0 (per-element statistics) is not a per-channel affine")
    if len(bn.input) < 5 or not all(bn.input[:5]):
        raise _Skip("missing scale/bias/mean/var inputs")
    try:
        params = [index.const_array(name) for name in bn.input[1:5]]
    except NotLoadedError as exc:
        raise _Skip(str(exc)) from None
    if any(p is None for p in params):
        raise _Skip("scale, bias, mean or var is not a constant")
    scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    # The attribute is a float32; its default is float32(1e-5), not the double 1e-5.
    eps = float(np.float32(attr(bn, "epsilon", 1e-5)))
    if not (len(scale) == len(bias) == len(mean) == len(var)):
        raise _Skip("scale/bias/mean/var lengths differ")
    if not all(np.isfinite(a).all() for a in (scale, bias, mean, var)):
        raise _Invalid("non-finite values in scale/bias/mean/var")
    if not (var + eps > 0).all():
        raise _Invalid("var + epsilon <= 0 (the BatchNorm computes NaN/inf)")
    return bn_scale_shift(scale, bias, mean, var, eps)


def _weights(
    index: GraphIndex, node: onnx.NodeProto, side: str
) -> tuple[np.ndarray, np.ndarray | None, np.dtype]:
    """(weight, bias or None, dtype) of a Conv/ConvTranspose/Gemm/MatMul; both constant."""
    op = node.op_type
    w = index.const_array(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if w is None:
        raise _Skip(f"{side}: {op} weight is not a constant")
    dtype = index.const_dtype(node.input[1])
    if dtype not in FLOAT_TENSOR_TYPES:
        raise _Skip(f"{side}: {op} weight is not a float tensor")
    b = None
    if op != "MatMul" and len(node.input) > 2 and node.input[2]:
        b = index.const_array(node.input[2])
        if b is None:
            raise _Skip(f"{side}: {op} bias is not a constant")
        if index.const_dtype(node.input[2]) != dtype:
            raise _Skip(f"{side}: {op} bias dtype differs from its weight's")
    return w, b, np_dtype(dtype)


def _bias_add_producer(
    index: GraphIndex, node: onnx.NodeProto
) -> tuple[onnx.NodeProto, int, np.ndarray, onnx.NodeProto]:
    """For ``P → Add(const) → BN``: (P, the Add's constant slot, the constant, the Add)."""
    for i in (0, 1):
        const = index.const_array(node.input[1 - i])
        producer = index.producer.get(node.input[i])
        if const is not None and producer is not None:
            if (why := index.sole_reader(node.input[i], node, shape_reads=True)) is not None:
                raise _Skip(f"preceding: {why}")
            return producer, 1 - i, const, node
    raise _Skip("preceding: Add without a constant operand")


def _is_shape_only(node: onnx.NodeProto) -> bool:
    return node.op_type in SHAPE_ONLY_OPS and in_default_domain(node) and bool(node.input)


def _next_to_shape_ops(index: GraphIndex, bn: onnx.NodeProto) -> bool:
    before = index.producer.get(bn.input[0]) if bn.input else None
    after = index.consumers.get(bn.output[0], []) if bn.output else []
    return (before is not None and _is_shape_only(before)) or any(map(_is_shape_only, after))


def _step_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node_label(node)}'"


def _shape_steps(index: GraphIndex, chain: list[onnx.NodeProto], side: str) -> list[ShapeStep]:
    """The chain as :class:`ShapeStep`s: shapes of each op's data input and output, and a
    Transpose's permutation."""
    steps = []
    for node in chain:
        in_shape, out_shape = index.shape(node.input[0]), index.shape(node.output[0])
        perm = None
        if node.op_type == "Transpose":
            given = attr(node, "perm")
            if given is None:  # the default reverses the axes
                rank = len(in_shape) if in_shape is not None else index.rank(node.input[0])
                if rank is None:
                    raise _Skip(
                        f"{side}: {_step_label(node)} reverses an input of unknown rank"
                    )
                given = list(reversed(range(rank)))
            perm = tuple(int(a) for a in given)
        steps.append(ShapeStep(_step_label(node), in_shape, out_shape, perm))
    return steps


def _step_rank(step: ShapeStep, out: bool) -> int | None:
    shape = step.out_shape if out else step.in_shape
    if shape is not None:
        return len(shape)
    return len(step.perm) if step.perm is not None else None


def _chain_up(
    index: GraphIndex, bn: onnx.NodeProto
) -> tuple[list[onnx.NodeProto], str, onnx.NodeProto]:
    """Shape-only ops feeding the BN (ordered producer → BN), the value entering them, and that
    value's reader; each link is read by the next alone.

    The BN's own input takes the BN output's name after the fold, so nothing else may read it,
    not even its shape; values further up keep their names and shapes, so a Shape/Size reader
    there (reshape_as) sees what it saw before.
    """
    chain: list[onnx.NodeProto] = []
    value, reader = bn.input[0], bn
    if (why := index.sole_reader(value, reader)) is not None:
        raise _Skip(f"preceding: {why}")
    node = index.producer.get(value)
    while node is not None and _is_shape_only(node) and node.output[0] == value:
        chain.insert(0, node)
        value, reader = node.input[0], node
        if (why := index.sole_reader(value, reader, shape_reads=True)) is not None:
            raise _Skip(f"preceding: {why}")
        node = index.producer.get(value)
    return chain, value, reader


def _preceding_axis(
    index: GraphIndex, chain: list[onnx.NodeProto]
) -> tuple[int, int | None, int | None]:
    """(axis, rank) of the producer's output that the BN's channel axis is, and the BN
    input's rank; without shape-only ops the BN reads the output itself (axis 1, rank
    unknown here)."""
    if not chain:
        return 1, None, None
    steps = _shape_steps(index, chain, "preceding")
    found = trace_back(steps, 1)
    if found.axis is None:
        raise _Skip(f"preceding: {found.reason}")
    rank = _step_rank(steps[0], out=False)
    if rank is None:
        raise _Skip(f"preceding: the rank of {steps[0].label}'s input is unknown")
    return found.axis, rank, _step_rank(steps[-1], out=True)


def _require_feature_axis(op: str, axis: int, rank: int, feature: int, side: str) -> None:
    if axis != feature % rank:
        what = "output" if side == "preceding" else "input"
        raise _Skip(
            f"{side}: the BN's channel axis is axis {axis} of {op}'s {rank}-D {what}; its "
            f"features are axis {feature % rank}"
        )


def _plan_preceding(
    index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray
) -> _Plan:
    chain, x, _ = _chain_up(index, bn)
    node = index.producer.get(x)
    if node is None:
        raise _Skip("preceding: input is not produced by a node")
    add_node: onnx.NodeProto | None = None
    add_slot, add_const = 0, np.zeros(())
    if node.op_type == "Add" and in_default_domain(node):
        node, add_slot, add_const, add_node = _bias_add_producer(index, node)
    op = node.op_type
    if not in_default_domain(node) or op not in _PRODUCERS:
        raise _Skip(
            f"preceding: {node.domain + '.' if node.domain else ''}{op} is not foldable"
        )
    if node.output[0] != (add_node.input[1 - add_slot] if add_node else x):
        raise _Skip(f"preceding: BN reads a secondary output of {op}")
    c = len(s)
    axis, chain_rank, bn_rank = _preceding_axis(index, chain)
    w, b, dtype = _weights(index, node, "preceding")
    plan = _Plan("preceding", node, dtype, rewire=chain[-1] if chain else add_node or node)
    plan.chain = tuple(chain)
    if op in ("Conv", "ConvTranspose"):
        group = int(attr(node, "group", 1))
        c_out = output_channels(w.shape, op, group=group) if w.ndim >= 3 else None
        if c_out is None:
            raise _Skip(f"preceding: {op} weight shape {w.shape} does not match group={group}")
        out_rank = w.ndim
        _require_feature_axis(op, axis, chain_rank or out_rank, 1, "preceding")
        if chain_rank not in (None, out_rank):
            raise _Skip(
                f"preceding: {op} output is {out_rank}-D, the shape ops read {chain_rank}-D"
            )
        if c_out != c:
            raise _Skip(f"preceding: {op} has {c_out} output channels, BN has {c}")
        if b is not None and np.asarray(b).size != c:
            raise _Skip(f"preceding: {op} bias has {np.asarray(b).size} values, BN has {c}")
        if b is not None or add_node is None:
            # With a bias Add after P, the shift t goes into the Add's constant instead.
            new_w, new_b = fold_into_producer(
                w, b, s, np.zeros(c) if add_node else t, op, group=group
            )
            plan.updates += [(node, 1, new_w), (node, 2, new_b)]
        else:
            plan.updates.append((node, 1, scale_output_channels(w, s, op, group=group)))
    elif op == "Gemm":
        out_rank = 2
        _require_feature_axis(op, axis, chain_rank or out_rank, 1, "preceding")
        trans_b = bool(attr(node, "transB", 0))
        n_out = output_channels(w.shape, op, trans_b=trans_b)
        if n_out != c:
            raise _Skip(f"preceding: Gemm has {n_out} output features, BN has {c}")
        plan.updates.append((node, 1, scale_output_channels(w, s, op, trans_b=trans_b)))
        beta = float(attr(node, "beta", 1.0))
        if b is not None and beta != 0:
            # Y = alpha·A·B + beta·C: scaling B and C by s scales Y by s
            cb = np.asarray(b, np.float64)
            if cb.ndim > 2:
                raise _Skip("preceding: Gemm C has more than 2 dimensions")
            plan.updates.append((node, 2, cb * s + (0 if add_node else t / beta)))
        elif add_node is None:
            plan.updates.append((node, 2, t.copy()))
            plan.attrs["beta"] = 1.0
    else:  # MatMul: the feature axis is the last one of its output
        if chain_rank is None:
            rank = index.rank(node.input[0])
            if rank != 2:
                raise _Skip(
                    "preceding: MatMul input rank unknown"
                    if rank is None
                    else f"preceding: MatMul output is {rank}-D; BN's channel axis 1 is not "
                    "the feature axis"
                )
            out_rank = 2
        else:
            out_rank = chain_rank
            _require_feature_axis(op, axis, out_rank, -1, "preceding")
        if w.ndim != 2 or w.shape[1] != c:
            raise _Skip(f"preceding: MatMul has {w.shape[-1]} output features, BN has {c}")
        plan.updates.append((node, 1, scale_output_channels(w, s, op)))
        if add_node is None:
            # The BN becomes Add(x, t) on its own input: t along that input's axis 1.
            plan.shift = t.reshape((c,) + (1,) * max(0, (bn_rank or 2) - 2))
            plan.rewire = None
    if add_node is not None:
        channel_shape = (c,) + (1,) * (out_rank - 1 - axis)
        folded = fold_bias_constant(add_const, s, t, channel_shape, out_rank)
        if folded is None:
            raise _Skip("preceding: bias Add is not per-channel")
        plan.updates.append((add_node, add_slot, folded))
        if index.const_dtype(add_node.input[add_slot]) != helper.np_dtype_to_tensor_dtype(
            dtype
        ):
            raise _Skip("preceding: bias Add dtype differs from the weight dtype")
    return plan


def _chain_down(
    index: GraphIndex, bn: onnx.NodeProto
) -> tuple[list[onnx.NodeProto], str, onnx.NodeProto]:
    """Shape-only ops reading the BN output (ordered BN → consumer), the value leaving them, and
    its one reader; each link is read by the next alone."""
    y = bn.output[0]
    users = index.consumers.get(y, [])
    if y in index.graph_outputs or len(users) != 1 or y in index.subgraph_uses:
        raise _Skip("following: BN output has other readers or is a graph output")
    chain: list[onnx.NodeProto] = []
    value, node = y, users[0]
    while _is_shape_only(node) and node.input[0] == value:
        chain.append(node)
        value = node.output[0]
        users = index.consumers.get(value, [])
        if (why := index.sole_reader(value, users[0] if users else node)) is not None:
            raise _Skip(f"following: {why}")
        node = users[0]
    return chain, value, node


def _following_axis(index: GraphIndex, chain: list[onnx.NodeProto]) -> tuple[int, int | None]:
    """(axis, rank) of the consumer's input that the BN's channel axis becomes."""
    if not chain:
        return 1, None
    steps = _shape_steps(index, chain, "following")
    found = trace_forward(steps, 1)
    if found.axis is None:
        raise _Skip(f"following: {found.reason}")
    rank = _step_rank(steps[-1], out=True)
    if rank is None:
        raise _Skip(f"following: the rank of {steps[-1].label}'s output is unknown")
    return found.axis, rank


def _plan_following(
    index: GraphIndex, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray
) -> _Plan:
    chain, value, node = _chain_down(index, bn)
    op = node.op_type
    if not in_default_domain(node) or op not in ("Conv", "Gemm"):
        raise _Skip(
            f"following: {node.domain + '.' if node.domain else ''}{op} is not foldable"
        )
    if node.input[0] != value:
        raise _Skip(f"following: BN output is not {op}'s data input")
    c = len(s)
    axis, chain_rank = _following_axis(index, chain)
    w, b, dtype = _weights(index, node, "following")
    plan = _Plan("following", node, dtype, reader=chain[0] if chain else node)
    plan.chain = tuple(chain)
    if op == "Conv":
        _require_feature_axis(op, axis, chain_rank or w.ndim, 1, "following")
        if chain_rank not in (None, w.ndim):
            raise _Skip(
                f"following: Conv input is {w.ndim}-D, the shape ops give {chain_rank}-D"
            )
        pads = list(attr(node, "pads", []))
        if any(pads) or attr_str(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise _Skip(
                "following: padded Conv (borders see zeros, not the BN shift): not exact"
            )
        group = int(attr(node, "group", 1))
        if w.ndim < 3 or w.shape[1] * group != c or w.shape[0] % group:
            raise _Skip(f"following: Conv has {w.shape[1] * group} input channels, BN has {c}")
        new_w, delta = scale_conv_input_channels(w, s, t, group)
        base = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
        if base.shape != delta.shape:
            raise _Skip("following: Conv bias does not match its output channels")
        plan.updates += [(node, 1, new_w), (node, 2, base + delta)]
    else:  # Gemm: A' = A·s + t  →  B' = diag(s)·B, C' = C + (alpha/beta)·t·B
        if attr(node, "transA", 0):
            raise _Skip("following: Gemm with transA=1 normalizes the wrong axis")
        _require_feature_axis(op, axis, chain_rank or 2, 1, "following")
        trans_b = bool(attr(node, "transB", 0))
        k = w.shape[1] if trans_b else w.shape[0]
        if w.ndim != 2 or k != c:
            raise _Skip(f"following: Gemm has {k} input features, BN has {c}")
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        new_w, shift = scale_gemm_input_features(w, s, t, trans_b=trans_b, alpha=alpha)
        plan.updates.append((node, 1, new_w))
        if b is not None and beta != 0:
            cb = np.asarray(b, np.float64)
            if cb.ndim > 2:
                raise _Skip("following: Gemm C has more than 2 dimensions")
            plan.updates.append((node, 2, cb + shift / beta))
        else:
            plan.updates.append((node, 2, shift))
            plan.attrs["beta"] = 1.0
    return plan


def _apply(editor: GraphEditor, bn: onnx.NodeProto, plan: _Plan) -> None:
    for node, slot, value in plan.updates:
        role = _ROLES[slot] if node.op_type in _PRODUCERS and slot < 3 else f"in{slot}"
        editor.set_input_constant(node, slot, value.astype(plan.dtype), role)
    for key, value in plan.attrs.items():
        set_attr(plan.target, key, value)
    x, y = bn.input[0], bn.output[0]
    if plan.shift is not None:
        # The BN node itself becomes Add(x, t): same name, place and output.
        shift = editor.add_initializer(f"{bn.name or y}.shift", plan.shift.astype(plan.dtype))
        editor.index.detach(bn)
        editor.candidates.extend(name for name in bn.input[1:] if name)
        bn.op_type, bn.domain = "Add", ""
        del bn.attribute[:]
        del bn.input[:]
        bn.input.extend([x, shift])
        del bn.output[1:]
        editor.index.attach(bn)
        return
    editor.remove_node(bn)
    if plan.direction == "preceding":
        assert plan.rewire is not None
        editor.rename_output(plan.rewire, 0, y)
    else:
        assert plan.reader is not None
        editor.rewire_input(plan.reader, 0, x)
        editor.gone.add(y)
