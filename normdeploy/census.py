"""The norm census: which normalization layers a graph holds, how each is written, and lints.

On any ONNX file (no PyTorch needed) it counts norm ops and the patterns exporters write in their
place: the decomposed LayerNorm ``ReduceMean→Sub→Pow→ReduceMean→Add→Sqrt→Div`` and the GroupNorm
trick ``Reshape→InstanceNormalization→Reshape→Mul→Add``. Given the PyTorch module it came from, it
says for every norm module how it appears (folded into a Conv/Gemm by the exporter, a native op, a
decomposition, absent) and confirms it numerically: the module's ONNX value against PyTorch eval
and against the float64 numpy oracle applied to the module's ONNX input.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from normdeploy.compare import ArrayComparison, compare_arrays, default_tolerance
from normdeploy.io import PROTOBUF_LIMIT, read_onnx
from normdeploy.probe import expose_values, module_output_values
from normdeploy.reference import module_oracle, norm_kind
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.runtime import (
    CPU,
    OrtRunner,
    graph_input_specs,
    make_feeds,
    stress_array,
)
from normdeploy.scopes import node_module_path, nodes_by_module, rewrite_rules

logger = logging.getLogger(__name__)

NATIVE_NORM_OPS = (
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
)
DECOMPOSED_LAYERNORM = "decomposed LayerNorm"
GROUPNORM_TRICK = "InstanceNormalization+Reshape"
# How a norm module can appear in the graph (NormEntry.representation).
FOLDED = "folded"
DECOMPOSITION = "decomposition"
ABSENT = "absent"
REPRESENTATIONS = (FOLDED, *NATIVE_NORM_OPS, GROUPNORM_TRICK, DECOMPOSITION, ABSENT)
FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LOW_PRECISION = ("float16", "bfloat16")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONFIRM_BATCH = 2


@dataclass(frozen=True)
class NormNode:
    """One norm op or norm pattern found in the graph, anchored at one node."""

    kind: str
    node: str
    graph: str
    module_path: str | None
    dtype: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": self.node,
            "graph": self.graph,
            "module_path": self.module_path,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class Lint:
    """Something known to bite in deployment, with the node it is about."""

    code: str
    severity: str  # "error" | "warning"
    node: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "node": self.node,
            "message": self.message,
        }


@dataclass(frozen=True)
class NormEntry:
    """One PyTorch norm module: how it appears in the graph and how close its ONNX value is."""

    module_path: str
    module_class: str
    kind: str
    representation: str
    detail: str
    nodes: tuple[str, ...] = ()
    vs_torch: ArrayComparison | None = None
    vs_oracle: ArrayComparison | None = None
    note: str = ""

    @property
    def confirmed(self) -> bool | None:
        """True/False when compared numerically, None when there was nothing to compare."""
        checks = [c for c in (self.vs_torch, self.vs_oracle) if c is not None]
        return all(checks) if checks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "module_path": self.module_path,
            "module_class": self.module_class,
            "kind": self.kind,
            "representation": self.representation,
            "detail": self.detail,
            "nodes": list(self.nodes),
            "confirmed": self.confirmed,
            "vs_torch": None if self.vs_torch is None else self.vs_torch.to_dict(),
            "vs_oracle": None if self.vs_oracle is None else self.vs_oracle.to_dict(),
            "note": self.note,
        }


@dataclass(frozen=True)
class Census:
    """Norm ops and patterns in a graph, per-module entries (with PyTorch) and lints."""

    source: str
    opset: int | None
    op_counts: dict[str, int]
    norm_nodes: tuple[NormNode, ...] = ()
    entries: tuple[NormEntry, ...] = ()
    lints: tuple[Lint, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """False when a numerical confirmation failed (lints do not fail the census)."""
        return all(e.confirmed is not False for e in self.entries)

    def __bool__(self) -> bool:
        return self.passed

    def entry(self, module_path: str) -> NormEntry:
        """The entry for a module path; KeyError if the module is not a norm module."""
        for e in self.entries:
            if e.module_path == module_path:
                return e
        raise KeyError(module_path)

    def lint_codes(self) -> set[str]:
        return {lint.code for lint in self.lints}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "opset": self.opset,
            "passed": self.passed,
            "op_counts": dict(self.op_counts),
            "norm_nodes": [n.to_dict() for n in self.norm_nodes],
            "entries": [e.to_dict() for e in self.entries],
            "lints": [lint.to_dict() for lint in self.lints],
            "notes": list(self.notes),
        }

    def _entry_rows(self) -> list[list[str]]:
        return [
            [
                e.module_path or "<root>",
                e.module_class,
                e.representation,
                e.detail,
                fmt_num(e.vs_torch.max_abs) if e.vs_torch else "-",
                fmt_num(e.vs_oracle.max_abs) if e.vs_oracle else "-",
                {True: "ok", False: "FAIL", None: "-"}[e.confirmed],
            ]
            for e in self.entries
        ]

    _ENTRY_HEADERS = (
        "module",
        "class",
        "representation",
        "detail",
        "max|onnx-torch|",
        "max|onnx-oracle|",
        "confirmed",
    )

    def _counts_line(self) -> str:
        return ", ".join(f"{k}×{v}" for k, v in self.op_counts.items()) or "no norm ops"

    def to_text(self) -> str:
        opset = "?" if self.opset is None else self.opset
        lines = [
            f"Norm census of {self.source} (opset {opset})",
            f"ops: {self._counts_line()}",
        ]
        if self.entries:
            lines += ["", text_table(self._ENTRY_HEADERS, self._entry_rows())]
        elif self.norm_nodes:
            rows = [
                [n.kind, n.node, n.module_path or "-", n.dtype or "?", n.graph]
                for n in self.norm_nodes
            ]
            headers = ("norm", "node", "module", "dtype", "graph")
            lines += ["", text_table(headers, rows)]
        if self.lints:
            lines += ["", "lints:"]
            lines += [
                f"  [{x.severity}] {x.code} at {x.node}: {x.message}" for x in self.lints
            ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        opset = "?" if self.opset is None else self.opset
        out = [f"### Norm census of `{self.source}` (opset {opset})", "", self._counts_line()]
        if self.entries:
            out += ["", markdown_table(self._ENTRY_HEADERS, self._entry_rows())]
        if self.lints:
            out += ["", markdown_table(
                ("severity", "lint", "node", "message"),
                [(x.severity, x.code, x.node, x.message) for x in self.lints],
            )]  # fmt: skip
        out += [f"- {n}" for n in self.notes]
        return "\n".join(out)


# --------------------------------------------------------------------------- graph walking


@dataclass
class _Scope:
    """One list of nodes (a graph, a subgraph or a function body) with its lookups."""

    label: str
    nodes: list[onnx.NodeProto]
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def consumer(self, value: str, op: str) -> onnx.NodeProto | None:
        return next((c for c in self.consumers.get(value, []) if c.op_type == op), None)


def _subgraphs(nodes: Sequence[onnx.NodeProto], label: str) -> Iterator[_Scope]:
    for node in nodes:
        for attr in node.attribute:
            graphs = list(attr.graphs)
            if attr.HasField("g"):
                graphs.insert(0, attr.g)
            for i, g in enumerate(graphs):
                sub = f"{label}/{node.name or node.op_type}.{attr.name}"
                sub += f"[{i}]" if len(graphs) > 1 else ""
                yield _Scope(sub, list(g.node))
                yield from _subgraphs(g.node, sub)


def _scopes(model: onnx.ModelProto) -> list[_Scope]:
    """The main graph, every nested subgraph (If/Loop/Scan) and every local function."""
    scopes = [_Scope("main", list(model.graph.node))]
    scopes += list(_subgraphs(model.graph.node, "main"))
    for fn in model.functions:
        label = f"function {fn.domain}::{fn.name}"
        scopes.append(_Scope(label, list(fn.node)))
        scopes += list(_subgraphs(fn.node, label))
    return scopes


def _elem_types(model: onnx.ModelProto) -> dict[str, str]:
    """Value name -> numpy dtype name, from declared and (best effort) inferred types."""
    infos: list[onnx.ValueInfoProto] = [
        *model.graph.input,
        *model.graph.output,
        *model.graph.value_info,
    ]
    if model.ByteSize() < PROTOBUF_LIMIT // 2:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            infos += list(inferred.graph.value_info)
        except Exception as exc:  # inference is best effort on arbitrary files
            logger.debug("shape inference failed: %s", exc)
    types: dict[str, str] = {}
    for vi in infos:
        et = vi.type.tensor_type.elem_type
        if et:
            types[vi.name] = _dtype_name(et)
    for t in model.graph.initializer:
        types[t.name] = _dtype_name(t.data_type)
    return types


def _dtype_name(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _constants(
    model: onnx.ModelProto, scopes: Sequence[_Scope]
) -> dict[str, onnx.TensorProto]:
    consts = {t.name: t for t in model.graph.initializer}
    for scope in scopes:
        for node in scope.nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        consts[node.output[0]] = attr.t
    return consts


def _const_array(consts: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = consts.get(name)
    if tensor is None:
        return None
    try:
        return onnx.numpy_helper.to_array(tensor)
    except Exception:  # external data not loaded, exotic types: not a usable constant
        return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


# ------------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class _Match:
    kind: str
    anchor: onnx.NodeProto
    nodes: tuple[onnx.NodeProto, ...]
    data_input: str
    eps_value: str | None = None  # the name of the epsilon constant, decompositions only


def _match_decomposed_layernorm(scope: _Scope, r1: onnx.NodeProto) -> _Match | None:
    """ReduceMean(x) → Sub(x, mean) → Pow/Mul(d, d) → ReduceMean → Add(eps) → Sqrt → Div(d, ·)."""
    if r1.op_type != "ReduceMean" or not r1.input or not r1.output:
        return None
    x, mean = r1.input[0], r1.output[0]
    for sub in scope.consumers.get(mean, []):
        if sub.op_type != "Sub" or list(sub.input[:2]) != [x, mean]:
            continue
        d = sub.output[0]
        squares = [
            c
            for c in scope.consumers.get(d, [])
            if c.op_type == "Pow" or (c.op_type == "Mul" and list(c.input[:2]) == [d, d])
        ]
        for sq in squares:
            r2 = scope.consumer(sq.output[0], "ReduceMean")
            add = r2 and scope.consumer(r2.output[0], "Add")
            sqrt = add and scope.consumer(add.output[0], "Sqrt")
            if not sqrt:
                continue
            div = scope.consumer(sqrt.output[0], "Div")
            tail: tuple[onnx.NodeProto, ...] = ()
            if div is not None and div.input[0] == d:
                tail = (div,)
            else:
                rec = scope.consumer(sqrt.output[0], "Reciprocal")
                mul = rec and scope.consumer(rec.output[0], "Mul")
                if mul is None or d not in mul.input:
                    continue
                tail = (rec, mul)
            eps = next((i for i in add.input if i != r2.output[0]), None)
            nodes = (r1, sub, sq, r2, add, sqrt, *tail)
            return _Match(DECOMPOSED_LAYERNORM, r1, nodes, x, eps)
    return None


def _match_groupnorm_trick(scope: _Scope, inorm: onnx.NodeProto) -> _Match | None:
    """Reshape → InstanceNormalization → Reshape (→ Mul → Add): GroupNorm before opset 21."""
    if inorm.op_type != "InstanceNormalization" or not inorm.input:
        return None
    pre = scope.producer.get(inorm.input[0])
    post = scope.consumer(inorm.output[0], "Reshape")
    if pre is None or pre.op_type != "Reshape" or post is None:
        return None
    nodes = [pre, inorm, post]
    mul = scope.consumer(post.output[0], "Mul")
    if mul is not None:
        nodes.append(mul)
        add = scope.consumer(mul.output[0], "Add")
        if add is not None:
            nodes.append(add)
    return _Match(GROUPNORM_TRICK, inorm, tuple(nodes), pre.input[0])


# ---------------------------------------------------------------------------------- lints


def _fp16_eps_underflows(eps: float) -> bool:
    return eps > 0 and float(np.float16(eps)) == 0.0


def _lint_scope(
    scope: _Scope,
    model_opset: int | None,
    types: dict[str, str],
    consts: dict[str, onnx.TensorProto],
    matches: Sequence[_Match],
) -> list[Lint]:
    lints: list[Lint] = []
    for node in scope.nodes:
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        label = _node_label(node)
        op = node.op_type
        if op == "BatchNormalization":
            training = _attr(node, "training_mode", 0)
            if training or len([o for o in node.output if o]) > 1:
                lints.append(Lint(
                    "bn-training-mode", "error", label,
                    "BatchNormalization in training mode (batch statistics, running stats "
                    "updated): export the model in eval mode",
                ))  # fmt: skip
        elif op == "GroupNormalization" and model_opset is not None and model_opset < 21:
            lints.append(Lint(
                "groupnorm-opset18", "warning", label,
                f"GroupNormalization at opset {model_opset} takes per-group scale/bias "
                "(deprecated; opset 21 made them per-channel as in PyTorch): re-export at "
                "opset 21",
            ))  # fmt: skip
        elif op == "Dropout":
            ratio_active = len(node.input) > 2 and node.input[2]
            flag = _const_array(consts, node.input[2]) if ratio_active else None
            if ratio_active and (flag is None or bool(np.asarray(flag).any())):
                lints.append(Lint(
                    "dropout-active", "error", label,
                    "Dropout with a training_mode input that is true or not constant: "
                    "outputs are random",
                ))  # fmt: skip
            else:
                lints.append(Lint(
                    "dropout", "warning", label,
                    "Dropout left in the graph (a no-op in inference): export in eval mode "
                    "or remove it",
                ))  # fmt: skip
        if op in NATIVE_NORM_OPS and node.input:
            dtype = types.get(node.input[0])
            if dtype in _LOW_PRECISION:
                note = ""
                if op == "LayerNormalization" and _attr(node, "stash_type", 1) == 1:
                    note = " (stash_type=1 keeps the statistics in float32)"
                lints.append(Lint(
                    "fp16-norm", "warning", label,
                    f"{op} computed in {dtype}{note}: check its error against fp32",
                ))  # fmt: skip
                eps = float(_attr(node, "epsilon", 1e-5))
                if dtype == "float16" and _fp16_eps_underflows(eps):
                    lints.append(Lint(
                        "fp16-eps-underflow", "error", label,
                        f"epsilon {eps:g} is 0 in float16: zero-variance inputs divide by 0",
                    ))  # fmt: skip
    for m in matches:
        label = _node_label(m.anchor)
        if m.kind != DECOMPOSED_LAYERNORM:
            continue
        dtype = types.get(m.data_input)
        lints.append(Lint(
            "decomposed-layernorm", "warning", label,
            "LayerNorm written as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div: slower than "
            "LayerNormalization (opset >= 17) and unsafe in fp16",
        ))  # fmt: skip
        eps_arr = _const_array(consts, m.eps_value) if m.eps_value else None
        if dtype in _LOW_PRECISION:
            lints.append(Lint(
                "fp16-norm", "error", label,
                f"decomposed LayerNorm computed in {dtype}: Pow overflows for |x| > 256 "
                "(65504 is the float16 maximum) and ReduceMean loses precision",
            ))  # fmt: skip
            if eps_arr is not None and eps_arr.size and float(np.max(eps_arr)) == 0.0:
                lints.append(Lint(
                    "fp16-eps-underflow", "error", label,
                    "the epsilon constant is 0 in float16: zero-variance rows divide by 0",
                ))  # fmt: skip
    return lints


# ------------------------------------------------------------------------------ the census


def _graph_census(model: onnx.ModelProto) -> tuple[dict[str, int], list[NormNode], list[Lint]]:
    """Counts, found norm nodes/patterns and lints over every graph in the model."""
    scopes = _scopes(model)
    types = _elem_types(model)
    consts = _constants(model, scopes)
    opset = _default_opset(model)
    counts: Counter[str] = Counter()
    found: list[NormNode] = []
    lints: list[Lint] = []
    for scope in scopes:
        matches: list[_Match] = []
        for node in scope.nodes:
            default = node.domain in _DEFAULT_DOMAINS
            if default and node.op_type in (*NATIVE_NORM_OPS, "Dropout"):
                counts[node.op_type] += 1
            elif not default and "Norm" in node.op_type:
                counts[f"{node.domain}.{node.op_type}"] += 1
            if not default:
                continue
            match = _match_decomposed_layernorm(scope, node) or _match_groupnorm_trick(
                scope, node
            )
            if match is not None:
                matches.append(match)
                counts[match.kind] += 1
            if (node.op_type in NATIVE_NORM_OPS and node.input) or match is not None:
                kind = match.kind if match else node.op_type
                dtype = types.get(match.data_input if match else node.input[0])
                found.append(
                    NormNode(
                        kind, _node_label(node), scope.label, node_module_path(node), dtype
                    )
                )
                if dtype in _LOW_PRECISION:
                    counts[f"{dtype} norms"] += 1
        lints += _lint_scope(scope, opset, types, consts, matches)
    return dict(counts), found, lints


def _classify(
    kind: str,
    nodes: Sequence[onnx.NodeProto],
    producer_nodes: Sequence[onnx.NodeProto],
) -> tuple[str, str, tuple[onnx.NodeProto, ...]]:
    """(representation, detail, the nodes that represent it) for one norm module."""
    ops = [n.op_type for n in nodes]
    fused = [n for n in nodes if any(r.startswith("FuseBatchNorm") for r in rewrite_rules(n))]
    if fused:
        target = fused[0]
        rule = next(r for r in rewrite_rules(target) if r.startswith("FuseBatchNorm"))
        detail = (
            f"folded into {target.op_type} '{_node_label(target)}' by the exporter ({rule})"
        )
        return FOLDED, detail, (target,)
    for op in ("BatchNormalization", "LayerNormalization", "GroupNormalization"):
        if op in ops:
            main = next(n for n in nodes if n.op_type == op)
            extra = " with Reshape around it" if "Reshape" in ops else ""
            return op, f"{op} '{_node_label(main)}'{extra}", tuple(nodes)
    if "InstanceNormalization" in ops:
        main = next(n for n in nodes if n.op_type == "InstanceNormalization")
        if "Reshape" in ops:
            return (
                GROUPNORM_TRICK,
                f"Reshape→InstanceNormalization '{_node_label(main)}'→Reshape"
                + ("→Mul→Add" if "Mul" in ops else ""),
                tuple(nodes),
            )
        return (
            "InstanceNormalization",
            f"InstanceNormalization '{_node_label(main)}'",
            (tuple(nodes)),
        )
    if nodes:
        return DECOMPOSITION, "ops: " + "/".join(dict.fromkeys(ops)), tuple(nodes)
    targets = [n for n in producer_nodes if n.op_type in FOLD_TARGETS]
    if targets and kind == "BatchNorm":
        target = targets[-1]
        return (
            FOLDED,
            f"folded into {target.op_type} '{_node_label(target)}' (constant folding)",
            (target,),
        )
    return ABSENT, "no node in the graph comes from this module", ()


@dataclass
class _TorchTrace:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    producers: dict[str, str]


def _trace_norm_modules(module: Any, args: Sequence[Any], paths: Sequence[str]) -> _TorchTrace:
    """Eval-mode inputs/outputs of the norm modules and the Conv/Linear that feeds each one."""
    import torch

    model = copy.deepcopy(module).eval()
    named = dict(model.named_modules())
    wanted = set(paths)
    trace = _TorchTrace({}, {}, {})
    made_by: dict[int, tuple[str, Any]] = {}
    producer_types = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)

    def first_tensor(value: Any) -> Any:
        value = value[0] if isinstance(value, (tuple, list)) and value else value
        return value if isinstance(value, torch.Tensor) else None

    def pre_hook(path: str) -> Any:
        def hook(_mod: Any, inp: Any) -> None:
            t = first_tensor(inp)
            if t is not None:
                trace.inputs[path] = t.detach().cpu().numpy().copy()
                owner = made_by.get(id(t))
                if owner is not None and owner[1] is t:
                    trace.producers[path] = owner[0]

        return hook

    def post_hook(path: str) -> Any:
        def hook(mod: Any, _inp: Any, out: Any) -> None:
            t = first_tensor(out)
            if t is None:
                return
            if path in wanted:
                trace.outputs[path] = t.detach().cpu().numpy().copy()
            if isinstance(mod, producer_types):
                made_by[id(t)] = (path, t)

        return hook

    handles = []
    for path, mod in named.items():
        if path in wanted:
            handles.append(mod.register_forward_pre_hook(pre_hook(path)))
        if path in wanted or isinstance(mod, producer_types):
            handles.append(mod.register_forward_hook(post_hook(path)))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return trace


def _module_input_value(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> str | None:
    """The data value entering a module's nodes from outside (not a weight or constant)."""
    produced = {o for n in nodes for o in n.output}
    weights = {t.name for t in model.graph.initializer}
    const_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for node in nodes:
        for name in node.input[:1]:
            if name and name not in produced and name not in weights | const_outputs:
                return name
    return None


def _confirm_feeds(
    model: onnx.ModelProto, example_inputs: Sequence[Any] | None, seed: int
) -> dict[str, np.ndarray]:
    """Seeded stress inputs, shaped like the example inputs when given."""
    specs = graph_input_specs(model)
    if example_inputs is None or len(example_inputs) != len(specs):
        return make_feeds(specs, _CONFIRM_BATCH, seed)
    rng = np.random.default_rng(seed)
    return {
        s.name: stress_array(tuple(x.shape), s.dtype, rng)
        for s, x in zip(specs, example_inputs, strict=True)
    }


def _module_entries(
    model: onnx.ModelProto,
    module: Any,
    example_inputs: Sequence[Any] | None,
    seed: int,
) -> tuple[list[NormEntry], list[str]]:
    import torch

    notes: list[str] = []
    norm_modules = [(p, m) for p, m in module.named_modules() if norm_kind(m) is not None]
    if not norm_modules:
        return [], ["the PyTorch module has no normalization layers"]
    feeds = _confirm_feeds(model, example_inputs, seed)
    args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
    paths = [p for p, _ in norm_modules]
    try:
        trace = _trace_norm_modules(module, args, paths)
    except Exception as exc:
        notes.append(f"PyTorch eval run failed, no numerical confirmation: {exc}")
        trace = _TorchTrace({}, {}, {})
    by_module = nodes_by_module(model.graph)
    outputs_of = module_output_values(model.graph)
    plans: list[tuple[str, Any, str, str, tuple[onnx.NodeProto, ...], str | None, str | None]]
    plans = []
    for path, mod in norm_modules:
        kind = norm_kind(mod) or "?"
        producer = trace.producers.get(path)
        rep, detail, rep_nodes = _classify(
            kind, by_module.get(path, []), by_module.get(producer, []) if producer else []
        )
        out_value = outputs_of.get(path)
        in_value = None
        if rep == FOLDED and producer is not None and out_value is None:
            out_value = outputs_of.get(producer)  # the folded Conv's output is the BN's
        elif rep not in (FOLDED, ABSENT):
            in_value = _module_input_value(model, by_module.get(path, []))
        plans.append((path, mod, rep, detail, rep_nodes, out_value, in_value))
    wanted = [v for plan in plans for v in plan[5:] if v]
    values: dict[str, np.ndarray] = {}
    if wanted and trace.outputs:
        try:
            runner = OrtRunner(expose_values(model, wanted), CPU)
            values = runner.infer(feeds)
        except Exception as exc:  # a graph ORT cannot run still gets its representation
            notes.append(f"onnxruntime could not run the graph with exposed values: {exc}")
    entries = []
    for path, mod, rep, detail, rep_nodes, out_value, in_value in plans:
        vs_torch = vs_oracle = None
        note = ""
        onnx_out = values.get(out_value) if out_value else None
        torch_out = trace.outputs.get(path)
        if onnx_out is not None and torch_out is not None:
            tol = default_tolerance(onnx_out.dtype)
            vs_torch = compare_arrays(f"{path}:torch", torch_out, onnx_out, tol)
            oracle_in = values.get(in_value) if in_value else None
            if oracle_in is None:
                oracle_in = trace.inputs.get(path)
                note = "oracle applied to PyTorch's input (no ONNX input value)"
            if oracle_in is not None:
                try:
                    expected = module_oracle(mod, oracle_in)
                    vs_oracle = compare_arrays(f"{path}:oracle", expected, onnx_out, tol)
                except (TypeError, ValueError) as exc:
                    note = f"no oracle: {exc}"
        elif rep != ABSENT and values:
            note = "no ONNX value for this module's output"
        entries.append(
            NormEntry(
                module_path=path,
                module_class=type(mod).__name__,
                kind=norm_kind(mod) or "?",
                representation=rep,
                detail=detail,
                nodes=tuple(_node_label(n) for n in rep_nodes),
                vs_torch=vs_torch,
                vs_oracle=vs_oracle,
                note=note,
            )
        )
    return entries, notes


def inspect(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    *,
    module: Any = None,
    example_inputs: Sequence[Any] | None = None,
    seed: int = 0,
) -> Census:
    """Census of the norm layers in an ONNX model; with ``module``, per module and confirmed.

    ``example_inputs`` (tensors) set the input shapes of the confirmation run; its values are
    seeded stress inputs. Never fails on unknown ops, domains or subgraphs.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model, source = model_or_path, model_or_path.graph.name or "<model>"
    else:
        loaded = read_onnx(model_or_path)
        model, source = loaded.model, str(loaded.path)
    counts, found, lints = _graph_census(model)
    entries: list[NormEntry] = []
    notes: list[str] = []
    if module is not None:
        entries, notes = _module_entries(model, module, example_inputs, seed)
    return Census(
        source=source,
        opset=_default_opset(model),
        op_counts=counts,
        norm_nodes=tuple(found),
        entries=tuple(entries),
        lints=tuple(lints),
        notes=tuple(notes),
    )
