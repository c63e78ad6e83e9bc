"""fuse-norms: decomposed LayerNorm and RMSNorm become one native op each.

The patterns are the census's (:mod:`normdeploy.census.patterns`, every common spelling: the
square as ``Pow(d, 2)`` or ``Mul(d, d)``, the root as ``Sqrt`` + ``Div``, ``Sqrt`` +
``Reciprocal`` + ``Mul`` or ``Pow(·, -0.5)`` + ``Mul``, an optional affine ``Mul``/``Add``).
A match over the last ``k`` axes of ``x`` becomes

    LayerNormalization(x, scale, bias; axis=-k, epsilon, stash_type)   (opset >= 17)
        y = (x - mean(x)) / sqrt(mean((x - mean(x))²) + epsilon) · scale + bias
    RMSNormalization(x, scale; axis=-k, epsilon, stash_type)           (opset >= 23)
        y = x / sqrt(mean(x²) + epsilon) · scale

which is what the decomposition computes: ``scale`` and ``bias`` are the affine constants
broadcast to the normalized shape (ones and no bias without them), ``epsilon`` the constant the
decomposition adds. The statistics are computed in float32 (``stash_type=1``) for float32,
float16 and bfloat16 inputs — an fp16 decomposition computed them in fp16, which overflows for
|x| > 256; the native op is the more accurate one and is compared under the fp16 tolerance — and
in double for double inputs.

Exact or refused: a match is kept, and the ledger says why, when the model's opset lacks the
native op; an intermediate value is read outside the pattern or is a graph output; epsilon is
not a constant scalar; the shape of ``x`` (its rank and its normalized dims, which size the
scale) is not known from the graph; a constant of the pattern has more dims than ``x``
(broadcasting would change the output shape) or the affine constants do not fit the normalized
shape; the dtype is not one the op takes; or the per-norm numerical confirmation (``confirm``,
given by the caller: passes run nothing) finds that the native op differs from the
decomposition on stress inputs.

Look-alikes: a square whose value reaches a root (``Sqrt``, ``Pow(·, ±0.5)``) within a few
elementwise or reduce steps but that no matcher claims — a magnitude ``sqrt(x² + y²)``, an L2
norm, a mean over a leading axis — gets a ledger entry with the matcher's reason and is left
exactly as it was. Patterns inside subgraphs and functions are left as they were (ledger).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normdeploy.census.patterns import (
    DECOMPOSED_LAYERNORM,
    DECOMPOSED_RMSNORM,
    NATIVE_FOR,
    Match,
    NoMatch,
    match_at,
    match_decomposed_layernorm,
    match_decomposed_rmsnorm,
    mean_subtracted,
)
from normdeploy.onnx_graph import (
    FLOAT_TENSOR_TYPES,
    GraphIndex,
    NotLoadedError,
    default_opset,
    dtype_name,
    in_default_domain,
    inferred_value_infos,
    node_label,
    np_dtype,
    scopes,
)
from normdeploy.passes import (
    FUSED,
    KEPT,
    GraphPass,
    LedgerEntry,
    PassContractError,
    PassResult,
)
from normdeploy.passes.fold_bn import validate_for_folding
from normdeploy.passes.surgery import GraphEditor, NameAllocator

FUSIBLE = (DECOMPOSED_LAYERNORM, DECOMPOSED_RMSNORM)
# Ops a look-alike's square may pass through on its way to a root, and how many of them.
_TOWARD_ROOT = ("ReduceMean", "ReduceSum", "Add", "Sub", "Mul", "Div", "Cast", "Max", "Clip")
_ROOT_DEPTH = 4


@dataclass(frozen=True)
class Confirmation:
    """One fused norm compared with its decomposition: whether it passed, and the numbers."""

    passed: bool
    detail: str


# (decompositions, native ops) → output name → Confirmation; the two models have the same
# inputs and output names, one output per planned fusion.
Confirm = Callable[[onnx.ModelProto, onnx.ModelProto], Mapping[str, Confirmation]]


class _Skip(Exception):
    """A fusion that is not provably exact; the message is the ledger's reason."""


@dataclass(frozen=True)
class _Plan:
    """One match and everything its native op needs, checked before anything is edited."""

    match: Match
    position: int
    op: str
    elem_type: int
    shape: tuple[int | str | None, ...]  # of x; the last len(normalized) dims are static
    normalized: tuple[int, ...]
    epsilon: float
    stash_type: int
    scale: np.ndarray  # normalized shape, x's dtype
    bias: np.ndarray | None
    reuse_scale: str | None  # an initializer that already is ``scale``
    reuse_bias: str | None

    @property
    def label(self) -> str:
        return node_label(self.match.anchor)

    def describe(self) -> str:
        affine = {(True, True): "scale and bias", (True, False): "scale"}.get(
            (self.match.scale is not None, self.match.bias is not None), "no affine"
        )
        k = len(self.normalized)
        axes = "the last axis" if k == 1 else f"the last {k} axes"
        return (
            f"{self.match.op_types()} over {axes} {list(self.normalized)}, "
            f"epsilon {self.epsilon:g}, {affine}"
        )


class FuseNorms(GraphPass):
    """Rewrite every decomposed LayerNorm/RMSNorm that fuses exactly, in place, with a ledger
    entry each (and one for each look-alike left alone)."""

    name = "fuse-norms"
    in_place = True
    subject = "decomposed norm(s)"
    stage = "fuse"
    action = FUSED

    def __init__(self, confirm: Confirm | None = None) -> None:
        self.confirm = confirm

    def requires(self, model: onnx.ModelProto, source: str) -> None:
        validate_for_folding(model, source)

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        opset = default_opset(model) or 0
        index = GraphIndex.of(graph)
        if any(n.op_type == "ReduceMean" for n in graph.node):
            # Inferred shapes prove ranks (positive axes) and size the native op's scale;
            # the census matches with them too, so both see the same patterns.
            index.inferred = inferred_value_infos(model)
        matches, claimed = _matches(index, graph.node)
        lookalikes = _lookalikes(index, graph.node, claimed)
        entries: list[tuple[int, LedgerEntry]] = []
        plans: list[_Plan] = []
        needs_opset: Counter[tuple[str, str, int]] = Counter()
        for position, m in matches:
            try:
                plans.append(_plan(index, m, position, opset))
            except _Skip as why:  # noqa: PERF203
                op, needed = NATIVE_FOR[m.kind]
                if opset < needed:
                    needs_opset[(m.norm, op, needed)] += 1
                entries.append((position, _kept(m, str(why))))
        confirmed = self._confirm(model, plans)
        editor = GraphEditor(graph, index, NameAllocator(model, ""))
        for i, plan in enumerate(plans):
            verdict = confirmed.get(_proof_output(i))
            if self.confirm is not None and verdict is None:
                verdict = Confirmation(False, "the confirmation returned no comparison for it")
            if verdict is not None and not verdict.passed:
                reason = f"not confirmed against its decomposition: {verdict.detail}"
                entries.append((plan.position, _kept(plan.match, reason)))
                continue
            detail = plan.describe()  # before the edit turns a pattern node into the op
            target = _apply(editor, plan)
            check = (
                f"confirmed: {verdict.detail}"
                if verdict is not None
                else "not confirmed per norm (no numerical check was asked for)"
            )
            entries.append(
                (
                    plan.position,
                    LedgerEntry(
                        plan.label,
                        "main",
                        FUSED,
                        target=target,
                        target_op=plan.op,
                        reason=f"{detail}; {check}",
                    ),
                )
            )
        editor.finish()
        entries += lookalikes
        ledger = [e for _, e in sorted(entries, key=lambda pe: pe[0])]
        ledger += _nested(model)
        notes = tuple(
            f"{n} decomposed {norm} kept: {op} needs opset >= {needed}, the model imports "
            f"opset {opset}; converting the model to opset {needed} fuses them"
            for (norm, op, needed), n in needs_opset.items()
        )
        return PassResult(model, any(e.applied for e in ledger), tuple(ledger), notes)

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        super().ensures(model, result)
        ops = {n.name: n.op_type for n in model.graph.node}
        for e in result.ledger:
            if e.action == FUSED and ops.get(e.target) != e.target_op:
                raise PassContractError(
                    f"{self.name}: ledger fused '{e.node}' into {e.target_op} '{e.target}', "
                    "which the graph does not have"
                )

    def _confirm(
        self, model: onnx.ModelProto, plans: Sequence[_Plan]
    ) -> Mapping[str, Confirmation]:
        """Each planned fusion against its own decomposition, all in one pair of graphs."""
        if self.confirm is None or not plans:
            return {}
        reference, candidate = proof_models(model, plans)
        return self.confirm(reference, candidate)


# ----------------------------------------------------------------------------- matching


def _matches(
    index: GraphIndex, nodes: Sequence[onnx.NodeProto]
) -> tuple[list[tuple[int, Match]], set[int]]:
    """Decomposed norms in graph order, each node claimed by the first match (as the census
    counts them), and the ids of every claimed node."""
    found: list[tuple[int, Match]] = []
    claimed: set[int] = set()
    for position, node in enumerate(nodes):
        if id(node) in claimed:
            continue
        m = match_at(index, node)
        if m is None or m.kind not in FUSIBLE:
            continue
        found.append((position, m))
        claimed.update(id(n) for n in m.nodes)
    return found, claimed


def _kept(m: Match, why: str) -> LedgerEntry:
    return LedgerEntry(
        node_label(m.anchor), "main", KEPT, reason=f"{m.kind} ({m.op_types()}): {why}"
    )


def _const(index: GraphIndex, name: str) -> np.ndarray | None:
    try:
        return index.const_array(name) if name else None
    except NotLoadedError:
        return None


def _squared(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The value a ``Pow(v, 2)`` or ``Mul(v, v)`` squares (a computed one), else None."""
    if not in_default_domain(node) or len(node.input) < 2:
        return None
    v = node.input[0]
    if node.op_type == "Mul" and node.input[1] != v:
        return None
    if node.op_type == "Pow":
        two = _const(index, node.input[1])
        if two is None or two.size != 1 or float(two.reshape(-1)[0]) != 2.0:
            return None
    elif node.op_type != "Mul":
        return None
    return v if _const(index, v) is None else None


def _is_root(index: GraphIndex, node: onnx.NodeProto) -> bool:
    if not in_default_domain(node):
        return False
    if node.op_type == "Sqrt":
        return True
    if node.op_type == "Pow" and len(node.input) > 1:
        p = _const(index, node.input[1])
        return p is not None and p.size == 1 and abs(float(p.reshape(-1)[0])) == 0.5
    return False


def _path_to_root(index: GraphIndex, square: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The nodes from ``square`` to the first root its value reaches, or None."""
    frontier = [(square.output[0], [square])]
    for _ in range(_ROOT_DEPTH):
        nxt = []
        for value, path in frontier:
            for user in index.consumers.get(value, []):
                if _is_root(index, user):
                    return [*path, user]
                if in_default_domain(user) and user.op_type in _TOWARD_ROOT and user.output:
                    nxt.append((user.output[0], [*path, user]))
        frontier = nxt
    return None


def _lookalikes(
    index: GraphIndex, nodes: Sequence[onnx.NodeProto], claimed: set[int]
) -> list[tuple[int, LedgerEntry]]:
    """A ledger entry for each root reached from a square that no norm pattern claimed, with
    the matcher's reason (one per root)."""
    out: list[tuple[int, LedgerEntry]] = []
    roots: set[int] = set()
    for position, node in enumerate(nodes):
        if id(node) in claimed or (v := _squared(index, node)) is None:
            continue
        path = _path_to_root(index, node)
        if path is None or id(path[-1]) in roots or id(path[-1]) in claimed:
            continue
        roots.add(id(path[-1]))
        centered = mean_subtracted(index, v)
        found: Match | NoMatch = (
            match_decomposed_layernorm(index, centered[2])  # x - mean(x): a LayerNorm's
            if centered is not None and centered[0] == centered[1]
            else match_decomposed_rmsnorm(index, node)
        )
        if not isinstance(found, NoMatch):
            continue  # a match the census claims elsewhere: not a look-alike
        ops = "/".join(dict.fromkeys(n.op_type for n in path))
        out.append(
            (
                position,
                LedgerEntry(
                    node_label(node),
                    "main",
                    KEPT,
                    reason=f"look-alike ({ops}): {found.reason}",
                ),
            )
        )
    return out


def _nested(model: onnx.ModelProto) -> list[LedgerEntry]:
    """Decomposed norms inside subgraphs and functions: left as they were."""
    g = model.graph
    init = {t.name: t for t in g.initializer}
    entries = []
    for scope in scopes(model):
        if scope.kind == "main":
            continue
        own = {} if scope.graph is None else {t.name: t for t in scope.graph.initializer}
        index = GraphIndex(
            scope.nodes,
            init={**init, **own},  # a subgraph reads the outer graph's constants too
            graph_outputs={v.name for v in (scope.graph or g).output},
        )
        for _, m in _matches(index, scope.nodes)[0]:
            where = "a function" if scope.kind == "function" else "a subgraph"
            entries.append(
                LedgerEntry(
                    node_label(m.anchor),
                    scope.label,
                    KEPT,
                    reason=f"{m.kind} inside {where}: left as it was",
                )
            )
    return entries


# ----------------------------------------------------------------------------- checks


def _static_normalized(
    index: GraphIndex, x: str, k: int
) -> tuple[tuple[int | str | None, ...], tuple[int, ...]]:
    shape = index.shape(x)
    if shape is None:
        raise _Skip(
            f"the shape of '{x}' is unknown: its rank and normalized dims are not proven"
        )
    if len(shape) < k:
        raise _Skip(f"'{x}' has rank {len(shape)}, fewer than the {k} normalized axes")
    tail = shape[len(shape) - k :]
    sizes = tuple(d for d in tail if isinstance(d, int) and d > 0)
    if len(sizes) != k:
        raise _Skip(
            f"the normalized dims {list(tail)} of '{x}' are not static: the native op's scale "
            "needs their sizes"
        )
    return shape, sizes


def _affine(
    index: GraphIndex,
    name: str | None,
    normalized: tuple[int, ...],
    dtype: np.dtype,
    role: str,
) -> tuple[np.ndarray | None, str | None]:
    """The affine constant as an array of exactly the normalized shape, and the initializer
    that already holds it (reused as it is), if one does."""
    if name is None:
        return None, None
    value = _const(index, name)
    if value is None:
        raise _Skip(f"the {role} '{name}' is not a constant")
    if value.dtype != dtype:
        raise _Skip(f"the {role} '{name}' is {value.dtype}, the input {dtype}")
    k = len(normalized)
    tail = value.shape[max(0, value.ndim - k) :]
    if np.broadcast_shapes(normalized, tail) != normalized:
        raise _Skip(
            f"the {role} '{name}' of shape {list(value.shape)} does not broadcast into the "
            f"normalized shape {list(normalized)}"
        )
    exact = np.ascontiguousarray(np.broadcast_to(value.reshape(tail), normalized))
    reuse = (
        name
        if index.is_constant_initializer(name) and tuple(value.shape) == normalized
        else None
    )
    return exact, reuse


def _plan(index: GraphIndex, m: Match, position: int, opset: int) -> _Plan:
    op, needed = NATIVE_FOR[m.kind]
    if opset < needed:
        raise _Skip(f"{op} needs opset >= {needed}; the model imports opset {opset}")
    if (why := m.rewrite_blocker(index)) is not None:
        raise _Skip(why)
    if m.epsilon is None or m.eps_value is None:
        raise _Skip(m.epsilon_reason or "no epsilon constant")
    # Add(mean, epsilon) takes two tensors of one type: epsilon's is the input's.
    elem_type = index.const_dtype(m.eps_value)
    if elem_type not in FLOAT_TENSOR_TYPES:
        what = "unknown" if elem_type is None else dtype_name(elem_type)
        raise _Skip(f"computed in {what}: {op} takes float16, float, double or bfloat16")
    assert elem_type is not None
    shape, normalized = _static_normalized(index, m.data_input, len(m.axes))
    rank = len(shape)
    inside = {o for n in m.nodes for o in n.output}
    for node in m.nodes:
        reads = node.input[:1] if node.op_type == "ReduceMean" else node.input
        for name in reads:
            if not name or name == m.data_input or name in inside:
                continue
            value = _const(index, name)
            if value is None:
                raise _Skip(f"{node.op_type} '{node_label(node)}' reads the computed '{name}'")
            if value.ndim > rank:
                raise _Skip(
                    f"the constant '{name}' has {value.ndim} dims, the input {rank}: "
                    "broadcasting grows the output"
                )
    dtype = np_dtype(elem_type)
    scale, reuse_scale = _affine(index, m.scale, normalized, dtype, "scale")
    bias, reuse_bias = _affine(index, m.bias, normalized, dtype, "bias")
    stash = TensorProto.DOUBLE if elem_type == TensorProto.DOUBLE else TensorProto.FLOAT
    return _Plan(
        m, position, op, elem_type, shape, normalized, float(np.float32(m.epsilon)), stash,
        np.ones(normalized, dtype) if scale is None else scale, bias, reuse_scale, reuse_bias,
    )  # fmt: skip


# ----------------------------------------------------------------------------- rewrite


def _native_attrs(plan: _Plan) -> dict[str, Any]:
    return {
        "axis": -len(plan.normalized),
        "epsilon": plan.epsilon,
        "stash_type": plan.stash_type,
    }


def _node_name(names: NameAllocator, anchor: onnx.NodeProto, op: str, output: str) -> str:
    """'/layers.0/norm1/LayerNormalization' beside the anchor's '/layers.0/norm1/ReduceMean'
    (the module path stays readable), else '<anchor or output>.<op>'."""
    if "/" in anchor.name:
        return names.fresh(anchor.name.rsplit("/", 1)[0] + "/" + op)
    return names.fresh(f"{anchor.name or output}.{op}")


def _apply(editor: GraphEditor, plan: _Plan) -> str:
    """Turn the node that computes the pattern's output into the native op (same place, same
    output) and remove the rest of the pattern; returns the new node's name."""
    m = plan.match
    last = next(n for n in m.nodes if m.output in n.output)
    base = plan.label
    scale = plan.reuse_scale or editor.add_initializer(f"{base}.scale", plan.scale)
    inputs = [m.data_input, scale]
    if plan.bias is not None:
        inputs.append(plan.reuse_bias or editor.add_initializer(f"{base}.bias", plan.bias))
    for node in m.nodes:
        if node is not last:
            editor.remove_node(node)
            editor.gone.update(o for o in node.output if o)
    name = _node_name(editor.names, m.anchor, plan.op, m.output)
    native = helper.make_node(plan.op, inputs, [m.output], name=name, **_native_attrs(plan))
    native.metadata_props.extend(m.anchor.metadata_props)  # the module it came from
    editor.index.detach(last)
    editor.candidates.extend(i for i in last.input if i)
    last.CopyFrom(native)
    editor.index.attach(last)
    return name


def _proof_output(i: int) -> str:
    return f"norm{i}.y"


def proof_models(
    model: onnx.ModelProto, plans: Sequence[_Plan]
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Two small models with one input and one output per plan: the decomposition as the
    graph writes it (its nodes, its constants), and the native op that replaces it.

    The input has the real rank and normalized dims; the leading dims are a batch and 3s.
    """
    index = GraphIndex.of(model.graph)
    ref_nodes: list[onnx.NodeProto] = []
    ref_inits: list[onnx.TensorProto] = []
    cand_nodes: list[onnx.NodeProto] = []
    cand_inits: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for i, plan in enumerate(plans):
        m, prefix = plan.match, f"norm{i}."
        x, y = prefix + "x", _proof_output(i)
        names = {m.data_input: x, m.output: y}
        inside = {o for n in m.nodes for o in n.output}
        for node in m.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.metadata_props[:]
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                if name not in names:
                    names[name] = prefix + name
                    if name not in inside:
                        value = index.const_array(name)
                        assert value is not None  # _plan proved every outside read constant
                        ref_inits.append(numpy_helper.from_array(value, names[name]))
                copy.input[slot] = names[name]
            for slot, name in enumerate(node.output):
                if name:
                    copy.output[slot] = names.setdefault(name, prefix + name)
            copy.name = prefix + (node.name or node.op_type)
            ref_nodes.append(copy)
        native = [x, prefix + "scale"]
        cand_inits.append(numpy_helper.from_array(plan.scale, prefix + "scale"))
        if plan.bias is not None:
            native.append(prefix + "bias")
            cand_inits.append(numpy_helper.from_array(plan.bias, prefix + "bias"))
        cand_nodes.append(helper.make_node(plan.op, native, [y], **_native_attrs(plan)))
        lead = len(plan.shape) - len(plan.normalized)
        dims: list[int | str] = [*(["N"] if lead else []), *[3] * max(0, lead - 1)]
        inputs.append(
            helper.make_tensor_value_info(x, plan.elem_type, [*dims, *plan.normalized])
        )
        outputs.append(helper.make_tensor_value_info(y, plan.elem_type, None))

    def build(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
        proof = helper.make_model(
            helper.make_graph(nodes, "norm_proof", inputs, outputs, inits),
            opset_imports=[helper.make_opsetid("", default_opset(model) or 0)],
        )
        proof.ir_version = model.ir_version
        return proof

    return build(ref_nodes, ref_inits), build(cand_nodes, cand_inits)
