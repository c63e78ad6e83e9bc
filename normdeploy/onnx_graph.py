"""Read-only helpers over ONNX graphs, one copy each: attributes, opsets, domains, subgraphs,
labels, constant values, declared types and shapes, and a producer/consumer index.

Nothing here changes a model (graph edits live in :mod:`normdeploy.passes.surgery`) and nothing
recurses over graph *depth*: chains of nodes are followed with loops, so a 3,000-node Identity
chain costs a loop, not the interpreter's stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops through which a constant weight stays a constant (exporters without constant folding).
CONSTANT_PASSTHROUGH = ("Identity", "Transpose")
FLOAT_TENSOR_TYPES = frozenset(
    (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
     onnx.TensorProto.BFLOAT16)
)  # fmt: skip


def in_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def attr_str(node: onnx.NodeProto, name: str, default: str = "") -> str:
    """A string attribute decoded to ``str``."""
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default (ai.onnx) domain the model imports, or None."""
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def node_label(node: onnx.NodeProto) -> str:
    """How reports name a node: its name, else ``Op->first_output``."""
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(attribute label, graph)`` for every graph attribute of ``node`` (If/Loop/Scan)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def nested_graphs(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
    """Every graph nested at any depth inside ``nodes`` (an explicit stack, no recursion)."""
    work = list(nodes)
    while work:
        node = work.pop()
        for _, g in subgraphs(node):
            yield g
            work.extend(g.node)


@dataclass(frozen=True)
class Scope:
    """One list of nodes that runs as a unit: the main graph, a subgraph or a function body."""

    label: str
    kind: str  # "main" | "subgraph" | "function"
    nodes: Sequence[onnx.NodeProto]
    graph: onnx.GraphProto | None = None  # None for function bodies


def scopes(model: onnx.ModelProto) -> list[Scope]:
    """The main graph, every nested subgraph (labelled by path) and every local function."""
    found: list[Scope] = []
    roots: list[tuple[str, str, Sequence[onnx.NodeProto], onnx.GraphProto | None]] = [
        ("main", "main", model.graph.node, model.graph)
    ]
    roots += [
        (f"function {fn.domain}::{fn.name}", "function", fn.node, None)
        for fn in model.functions
    ]
    for label, kind, nodes, graph in roots:
        found.append(Scope(label, kind, nodes, graph))
        work = [(label, nodes)]
        while work:
            parent, body = work.pop(0)
            for k, node in enumerate(body):
                for attr_label, g in subgraphs(node):
                    sub = f"{parent}/{node.name or f'{node.op_type}#{k}'}.{attr_label}"
                    found.append(Scope(sub, "subgraph", g.node, g))
                    work.append((sub, g.node))
    return found


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (tensor, float(s) or int(s)), None if external or sparse."""
    for a in node.attribute:
        if a.name == "value":
            return None if is_external(a.t) else numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.asarray(a.f, np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.asarray(a.i, np.int64)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), np.int64)
    return None


def model_constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors of every scope, by value name (lints look up
    flags and epsilons here, wherever the constant was defined)."""
    consts = {t.name: t for t in model.graph.initializer}
    for scope in scopes(model):
        for node in scope.nodes:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        consts[node.output[0]] = a.t
    return consts


def tensor_value(tensor: onnx.TensorProto | None) -> np.ndarray | None:
    """A tensor's value, or None when it cannot be read here (external data, exotic types)."""
    if tensor is None or is_external(tensor):
        return None
    try:
        return numpy_helper.to_array(tensor)
    except Exception:
        return None


def np_dtype(tensor_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (bfloat16 and friends through ml_dtypes)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type))


def dtype_name(elem_type: int) -> str:
    """A numpy-style name for an ONNX element type ('float32', 'bfloat16', …)."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data, from dims and types alone (no data is touched)."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        try:
            total += n * np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            total += n
    return total


def undefined_input(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, str] | None:
    """The first ``(node, input)`` read before anything defines it, or None (topological)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                return node, name
        defined.update(node.output)
    return None


# ----------------------------------------------------------------------------- input specs


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, and shape (ints, or str/None for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def value_shape(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """A declared shape: ints, dim names, None for unknown dims; None when no shape is declared."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def graph_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of a graph (initializers listed as inputs are not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = np_dtype(vi.type.tensor_type.elem_type)
        specs.append(InputSpec(vi.name, dtype, value_shape(vi) or ()))
    return specs


def without_weight_data(model: onnx.ModelProto, min_bytes: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of ``min_bytes`` or more keep their name, type
    and dims but not their data (reading their value fails: :func:`tensor_value` gives None).
    For work that needs the graph but not the weights while the model is on disk: dropping
    the original frees its weights, which protobuf cannot free tensor by tensor."""
    slim = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            slim.MergeFrom(onnx.ModelProto(**{descriptor.name: value}))
    graph = slim.graph
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            graph.MergeFrom(onnx.GraphProto(**{descriptor.name: value}))
    for tensor in model.graph.initializer:
        if tensor.ByteSize() < min_bytes or is_external(tensor):
            graph.initializer.append(tensor)
            continue
        shell = graph.initializer.add()
        shell.name = tensor.name
        shell.data_type = tensor.data_type
        shell.dims.extend(tensor.dims)
    return slim


# Initializers and Constant nodes up to this many elements keep their values in the skeleton that
# shape inference runs on (shape constants for Reshape/Unsqueeze); larger ones become typed inputs.
SKELETON_MAX_ELEMENTS = 64


def _typed_input(name: str, elem_type: int, dims: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without weight data and without declared intermediate shapes: what shape
    inference needs to derive every shape from the graph inputs and the ops alone."""
    g = model.graph
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    sg = sk.graph
    sg.name = g.name
    names: set[str] = set()
    for t in g.initializer:
        names.add(t.name)
        if int(np.prod(t.dims, dtype=np.int64)) <= SKELETON_MAX_ELEMENTS and not is_external(
            t
        ):
            sg.initializer.append(t)
        else:
            sg.input.append(_typed_input(t.name, t.data_type, t.dims))
    for st in g.sparse_initializer:
        names.add(st.values.name)
        sg.input.append(_typed_input(st.values.name, st.values.data_type, st.dims))
    sg.input.extend(vi for vi in g.input if vi.name not in names)
    for node in g.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if (
            node.op_type == "Constant"
            and in_default_domain(node)
            and value is not None
            and int(np.prod(value.dims, dtype=np.int64)) > SKELETON_MAX_ELEMENTS
        ):
            sg.input.append(_typed_input(node.output[0], value.data_type, value.dims))
            continue
        sg.node.append(node)
    for vi in g.output:
        out = sg.output.add()
        out.CopyFrom(vi)
        out.type.tensor_type.ClearField("shape")
    return sk


def inferred_value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Types and shapes of the main graph's values as onnx shape inference (with data
    propagation) derives them from the graph inputs and the ops; best effort, {} on failure.

    Runs on a skeleton (:func:`_skeleton`): no weight data is copied, and value_info declared in
    the file is not trusted, so a shape here is one the graph itself implies.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _skeleton(model), strict_mode=False, data_prop=True
        )
    except Exception:  # inference is best effort on arbitrary files
        return {}
    g = inferred.graph
    return {vi.name: vi for vi in (*g.value_info, *g.output)}


def elem_types(
    model: onnx.ModelProto,
    *,
    infer: bool = True,
    inferred: dict[str, onnx.ValueInfoProto] | None = None,
) -> dict[str, str]:
    """Value name → dtype name, from declared and (best effort) inferred types."""
    infos: list[onnx.ValueInfoProto] = [
        *model.graph.input,
        *model.graph.output,
        *model.graph.value_info,
    ]
    if infer:
        infos += list(
            (inferred if inferred is not None else inferred_value_infos(model)).values()
        )
    types: dict[str, str] = {}
    for vi in infos:
        et = vi.type.tensor_type.elem_type
        if et:
            types[vi.name] = dtype_name(et)
    for t in model.graph.initializer:
        types[t.name] = dtype_name(t.data_type)
    return types


# ----------------------------------------------------------------------------- the index


class NotLoadedError(Exception):
    """A constant lives in external data that was not loaded (callers say so in a reason)."""


_RANK_KEEPING = frozenset(
    (
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
        "Reciprocal", "Clip", "Identity", "Dropout", "Cast", "Softmax", "LogSoftmax",
        "BatchNormalization", "LayerNormalization", "InstanceNormalization", "Mish",
    )
)  # fmt: skip
_BROADCASTING = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"))
_MAX_RANK_DEPTH = 64
SHAPE_READERS = ("Shape", "Size")  # ops that read a value's shape, never its elements


@dataclass
class GraphIndex:
    """Producers, readers, constants and declared types of one node list.

    Built for a graph (:meth:`of`) or a function body (nodes only). Passes that edit the graph
    keep it current with :meth:`attach`/:meth:`detach`; the index itself never edits anything.
    """

    nodes: Sequence[onnx.NodeProto]
    init: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    declared: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    # Shapes derived by inference (:func:`inferred_value_infos`): preferred to declared ones.
    inferred: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict, init=False)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict, init=False)
    subgraph_uses: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        for node in self.nodes:
            self.attach(node)
        for g in nested_graphs(self.nodes):
            for n in g.node:
                self.subgraph_uses.update(n.input)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        return cls(
            graph.node,
            init={t.name: t for t in graph.initializer},
            graph_inputs={v.name for v in graph.input},
            graph_outputs={v.name for v in graph.output},
            declared={vi.name: vi for vi in (*graph.value_info, *graph.input, *graph.output)},
        )

    def attach(self, node: onnx.NodeProto) -> None:
        for out in node.output:
            if out:
                self.producer[out] = node
        for inp in node.input:
            if inp:
                self.consumers.setdefault(inp, []).append(node)

    def detach(self, node: onnx.NodeProto) -> None:
        for out in node.output:
            if out and self.producer.get(out) is node:
                del self.producer[out]
        for inp in node.input:
            users = self.consumers.get(inp, [])
            for k, user in enumerate(users):
                if user is node:
                    del users[k]
                    break

    def consumer(self, value: str, op: str) -> onnx.NodeProto | None:
        """The first reader of ``value`` with op type ``op``."""
        return next((c for c in self.consumers.get(value, []) if c.op_type == op), None)

    def is_constant_initializer(self, name: str) -> bool:
        return name in self.init and name not in self.graph_inputs

    def const_array(self, name: str) -> np.ndarray | None:
        """The value of a constant: an initializer that is not a graph input, a Constant node,
        or either through Identity/Transpose chains; None when it is computed.

        Raises :class:`NotLoadedError` for a constant in external data that was not loaded.
        """
        perms: list[Any] = []
        seen: set[str] = set()
        value: np.ndarray | None = None
        while name not in seen:
            seen.add(name)
            if self.is_constant_initializer(name):
                tensor = self.init[name]
                if is_external(tensor):
                    raise NotLoadedError(f"'{name}' is in external data that was not loaded")
                value = numpy_helper.to_array(tensor)
                break
            node = self.producer.get(name)
            if node is None or not in_default_domain(node):
                return None
            if node.op_type == "Constant":
                value = constant_node_value(node)
                break
            if node.op_type not in CONSTANT_PASSTHROUGH or not node.input:
                return None
            if node.op_type == "Transpose":
                perms.append(attr(node, "perm"))
            name = node.input[0]
        if value is None:
            return None
        for perm in reversed(perms):
            value = np.transpose(value, perm)
        return value

    def const_dtype(self, name: str) -> int | None:
        """The TensorProto element type of a constant (see :meth:`const_array`)."""
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            if self.is_constant_initializer(name):
                return self.init[name].data_type
            node = self.producer.get(name)
            if node is None or not in_default_domain(node):
                return None
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        return a.t.data_type
                value = constant_node_value(node)
                return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)
            if node.op_type not in CONSTANT_PASSTHROUGH or not node.input:
                return None
            name = node.input[0]
        return None

    def sole_reader(
        self, value: str, user: onnx.NodeProto, *, shape_reads: bool = False
    ) -> str | None:
        """None if ``user`` is the only reader of ``value``; else why it is not.

        ``shape_reads=True`` also allows readers that see only the shape (Shape, Size): a
        rewrite that changes the values but not the shape leaves them as they were.
        """
        if value in self.graph_outputs:
            return f"'{value}' is a graph output"
        users = self.consumers.get(value, [])
        if shape_reads:
            users = [
                u for u in users if not (u.op_type in SHAPE_READERS and in_default_domain(u))
            ]
        if len(users) != 1 or users[0] is not user:
            return f"'{value}' has {len(users)} readers"
        if value in self.subgraph_uses:
            return f"'{value}' is also read inside a subgraph"
        return None

    def owns_initializer(self, name: str, user: onnx.NodeProto) -> bool:
        """True when ``name`` is an initializer that only ``user`` reads (safe to rewrite)."""
        return (
            self.is_constant_initializer(name)
            and not is_external(self.init[name])
            and self.sole_reader(name, user) is None
        )

    def shape(self, value: str) -> tuple[int | str | None, ...] | None:
        """The shape of a value: inferred from the graph when :attr:`inferred` has it (a
        declaration may be stale), else declared, else an initializer's dims; None when
        unknown."""
        for source in (self.inferred, self.declared):
            vi = source.get(value)
            if vi is not None and (found := value_shape(vi)) is not None:
                return found
        if value in self.init:
            return tuple(int(d) for d in self.init[value].dims)
        return None

    def rank(self, value: str) -> int | None:
        """Rank of a value from declared shapes, or propagated through rank-keeping ops."""
        work = [(value, 0)]
        ranks: dict[str, int | None] = {}
        # Depth-first with an explicit stack: a value's rank waits for its inputs' ranks.
        while work:
            name, depth = work[-1]
            if name in ranks:
                work.pop()
                continue
            shape = self.shape(name)
            node = self.producer.get(name)
            if shape is not None:
                ranks[name] = len(shape)
            elif node is None or depth > _MAX_RANK_DEPTH or not in_default_domain(node):
                ranks[name] = None
            elif node.op_type in ("Gemm", "Flatten"):
                ranks[name] = 2
            elif (
                node.op_type in _RANK_KEEPING
                or node.op_type in _BROADCASTING
                or (node.op_type == "MatMul")
            ):
                inputs = [i for i in node.input if i]
                if node.op_type in _RANK_KEEPING:
                    inputs = inputs[:1]
                pending = [i for i in inputs if i not in ranks]
                if pending:
                    work.extend((i, depth + 1) for i in pending)
                    continue
                got = [ranks[i] for i in inputs]
                if node.op_type == "MatMul" and len(got) == 2 and None not in got:
                    # numpy semantics: a 1-D operand contributes no axis of its own
                    a, b = int(got[0] or 0), int(got[1] or 0)
                    if min(a, b) < 1:
                        ranks[name] = None
                    elif a == 1 or b == 1:
                        ranks[name] = a + b - 2
                    else:
                        ranks[name] = max(a, b)
                    work.pop()
                    continue
                ranks[name] = (
                    None
                    if not got or any(r is None for r in got)
                    else max(int(r or 0) for r in got)
                )
            else:
                ranks[name] = None
            work.pop()
        return ranks.get(value)
