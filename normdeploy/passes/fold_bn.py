"""Fold BatchNormalization into the neighbouring Conv / ConvTranspose / Gemm / MatMul weights.

With scale γ, bias β, running mean μ, running variance σ² and epsilon ε, per channel::

    s = γ / √(σ² + ε)        t = β − μ · s        BN(x) = x · s + t

*Into the preceding producer* P (``BN(P(x))``, optionally through an ``Add`` of a constant
per-channel bias): scale P's weight along its output-channel axis, ``W' = W · s``, and
``b' = b · s + t``. The axis comes from the op's layout: Conv weight ``(C_out, C_in/g, k…)``
axis 0; ConvTranspose weight ``(C_in, C_out/g, k…)`` axis 1 within each group; Gemm ``B`` the
output-feature axis (``transB`` decides which); MatMul ``B`` its last axis.

*Into the following consumer* C (``C(BN(x))``), only where that is exact: a Conv with no padding
(a padded border sees zeros, not ``t``), or a Gemm on the BN output: ``W'`` scales the
input-channel axis by ``s`` and ``b' = b + W·t``.

Everything is computed in float64 and cast once to the weight's dtype; a result that does not fit
that dtype (fp16 overflow) is refused. A fold that is not provably exact is skipped and the
ledger says why: the producer's output has other consumers or is a graph output, parameters are
not constants (initializers and Constant nodes both count as constants), ``training_mode=1`` or
extra BN outputs, a channel mismatch, unknown ranks, non-finite statistics, a BN inside a
control-flow subgraph. Folded weights are written under fresh, unique names, so a weight shared
with another node is never changed under it; tensors left without users are removed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normdeploy.compare import ArrayComparison, compare_onnx_models, default_tolerance
from normdeploy.errors import InvalidModelError, VerificationFailed
from normdeploy.io import check_output_path, read_onnx, save_onnx, write_text_atomic
from normdeploy.passes import GraphPass, PassResult
from normdeploy.report import fmt_num, markdown_table, render, text_table

logger = logging.getLogger(__name__)

MIN_OPSET = 9  # BatchNormalization before opset 9 had the `spatial`/`is_test` semantics
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Checking the input with onnx.checker costs another copy of the model; above this size the
# pass relies on its own structural check (every node input is defined).
CHECKER_MAX_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- ledger


@dataclass(frozen=True)
class LedgerEntry:
    """One BatchNormalization node: folded (into which node, which direction) or why not."""

    node: str
    graph: str
    folded: bool
    direction: str = ""  # "preceding" | "following"
    target: str = ""  # the node the BN was folded into
    target_op: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "graph": self.graph,
            "folded": self.folded,
            "direction": self.direction,
            "target": self.target,
            "target_op": self.target_op,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class FoldResult:
    """The folded model, one ledger entry per BatchNormalization, and the verification."""

    model: onnx.ModelProto
    ledger: tuple[LedgerEntry, ...]
    source: str = "<model>"
    verification: tuple[ArrayComparison, ...] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def folded(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.folded]

    @property
    def skipped(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if not e.folded]

    @property
    def modified(self) -> bool:
        return bool(self.folded)

    @property
    def verified(self) -> bool | None:
        """True/False after a numerical check, None when it was not run."""
        return None if self.verification is None else all(self.verification)

    def __bool__(self) -> bool:
        return self.verified is not False

    _HEADERS = ("BatchNormalization", "graph", "result", "into", "detail")

    def _rows(self) -> list[list[str]]:
        return [
            [
                e.node,
                e.graph,
                f"folded ({e.direction})" if e.folded else "kept",
                f"{e.target_op} {e.target}" if e.folded else "-",
                e.reason or "-",
            ]
            for e in self.ledger
        ]

    def _verify_line(self) -> str:
        if self.verification is None:
            return "not verified (--no-verify)"
        worst = max((c.max_abs for c in self.verification), default=0.0)
        status = "PASS" if self.verified else "FAIL"
        tol = self.verification[0] if self.verification else None
        tol_text = f" (atol={tol.atol:g}, rtol={tol.rtol:g})" if tol else ""
        return (
            f"{status}: folded vs original on onnxruntime CPU, {len(self.verification)} "
            f"output(s) × batch sizes, max |Δ| = {fmt_num(worst)}{tol_text}"
        )

    def _summary(self) -> str:
        return (
            f"{len(self.folded)} of {len(self.ledger)} BatchNormalization folded, "
            f"{len(self.skipped)} kept"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "folded": len(self.folded),
            "kept": len(self.skipped),
            "ledger": [e.to_dict() for e in self.ledger],
            "verified": self.verified,
            "verification": None
            if self.verification is None
            else [c.to_dict() for c in self.verification],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def to_text(self) -> str:
        lines = [f"fold-bn {self.source}: {self._summary()}"]
        if self.ledger:
            lines += ["", text_table(self._HEADERS, self._rows())]
        lines += ["", f"verification: {self._verify_line()}"]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"## fold-bn: {self._summary()}", ""]
        if self.ledger:
            out += [markdown_table(self._HEADERS, self._rows()), ""]
        out.append(f"Verification: {self._verify_line()}")
        return "\n".join(out)


# ----------------------------------------------------------------------------- arithmetic


def bn_scale_shift(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = x·s + t per channel, in float64."""
    scale, bias, mean, var = (np.asarray(a, np.float64) for a in (scale, bias, mean, var))
    s = scale / np.sqrt(var + np.float64(eps))
    return s, bias - mean * s


def scale_output_channels(w: np.ndarray, s: np.ndarray, op: str, group: int = 1) -> np.ndarray:
    """Multiply producer weight ``w`` by ``s`` along its output channels (float64 result)."""
    w = np.asarray(w, np.float64)
    if op == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":
        c_in, c_out_g = w.shape[:2]
        grouped = w.reshape((group, c_in // group, c_out_g, *w.shape[2:]))
        sg = s.reshape((group, 1, c_out_g) + (1,) * (w.ndim - 2))
        return (grouped * sg).reshape(w.shape)
    raise ValueError(f"no output-channel layout for {op}")


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


# ----------------------------------------------------------------------------- graph index


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


class _Names:
    """Every name in the model, so new tensor names never collide (at any depth)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = set()
        for g in _all_graphs(graph):
            self.used.update(t.name for t in g.initializer)
            self.used.update(v.name for v in (*g.input, *g.output, *g.value_info))
            for n in g.node:
                self.used.update(n.input)
                self.used.update(n.output)
                self.used.add(n.name)

    def fresh(self, base: str) -> str:
        name, i = f"{base}_bnfold", 1
        while name in self.used:
            i += 1
            name = f"{base}_bnfold{i}"
        self.used.add(name)
        return name


class _Index:
    """Producers, consumers, constants and outer-scope uses of one graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.init = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.constant: dict[str, onnx.TensorProto] = {}
        self.subgraph_uses: set[str] = set()
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constant[node.output[0]] = value
            for sub in _subgraphs(node):
                for g in _all_graphs(sub):
                    for n in g.node:
                        self.subgraph_uses.update(n.input)

    def const_array(self, name: str) -> np.ndarray | None:
        """The value of a constant input (an initializer that is not a graph input, or a
        Constant node), else None."""
        if name in self.init and name not in self.graph_inputs:
            return numpy_helper.to_array(self.init[name])
        if name in self.constant:
            return numpy_helper.to_array(self.constant[name])
        node = self.producer.get(name)
        # Exporters without constant folding write weights through Identity/Transpose.
        if node is not None and node.domain in _DEFAULT_DOMAINS and node.input:
            if node.op_type == "Identity":
                return self.const_array(node.input[0])
            if node.op_type == "Transpose":
                value = self.const_array(node.input[0])
                perm = _attr(node, "perm", None)
                return None if value is None else np.transpose(value, perm)
        return None

    def const_dtype(self, name: str) -> int | None:
        if name in self.init:
            return self.init[name].data_type
        if name in self.constant:
            return self.constant[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type in ("Identity", "Transpose") and node.input:
            return self.const_dtype(node.input[0])
        return None

    def single_use(self, value: str, user: onnx.NodeProto) -> str | None:
        """None if ``user`` is the only reader of ``value``; else why it is not."""
        if value in self.graph_outputs:
            return f"'{value}' is a graph output"
        users = self.consumers.get(value, [])
        if len(users) != 1 or users[0] is not user:
            return f"'{value}' has {len(users)} consumers"
        if value in self.subgraph_uses:
            return f"'{value}' is also read inside a subgraph"
        return None

    def rank(self, value: str, depth: int = 0) -> int | None:
        """Rank of a value from declared shapes, or propagated through rank-keeping ops."""
        for vi in (*self.graph.value_info, *self.graph.input, *self.graph.output):
            if vi.name == value and vi.type.tensor_type.HasField("shape"):
                return len(vi.type.tensor_type.shape.dim)
        if value in self.init:
            return len(self.init[value].dims)
        node = self.producer.get(value)
        if node is None or depth > 64 or node.domain not in _DEFAULT_DOMAINS:
            return None
        if node.op_type in ("Gemm", "Flatten"):
            return 2
        if node.op_type in _RANK_KEEPING:
            return self.rank(node.input[0], depth + 1)
        if node.op_type in _BROADCASTING or node.op_type == "MatMul":
            ranks = [self.rank(i, depth + 1) for i in node.input if i]
            return None if None in ranks else max(ranks)  # type: ignore[type-var]
        return None


_RANK_KEEPING = frozenset(
    [
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Erf",
        "Abs",
        "Neg",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Clip",
        "Identity",
        "Dropout",
        "Cast",
        "Softmax",
        "LogSoftmax",
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "Mish",
    ]
)
_BROADCASTING = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"))


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _np_dtype(tensor_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type))


# ----------------------------------------------------------------------------- the pass


class _Skip(Exception):
    """A fold that is not provably exact; the message is the ledger's reason."""


@dataclass
class _Plan:
    """New constant values for one fold, applied only after every check passed."""

    direction: str
    target: onnx.NodeProto
    tensors: dict[int, np.ndarray]  # target input index → new value (float64)
    dtype: int
    extra: list[tuple[onnx.NodeProto, int, np.ndarray]] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    rewire: tuple[onnx.NodeProto, str] | None = None  # node whose output becomes BN's output
    bn_to_add: np.ndarray | None = None  # MatMul without a bias: BN is rewritten as Add(x, t)


class FoldBatchNorm(GraphPass):
    """Fold every BatchNormalization that folds exactly; in place; builds the ledger."""

    name = "fold-bn"
    in_place = True

    def __init__(self) -> None:
        self.ledger: list[LedgerEntry] = []

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.ledger = []
        names = _Names(model.graph)
        self._fold_graph(model.graph, names, "main")
        self._note_subgraph_bns(model.graph)
        return PassResult(model, any(e.folded for e in self.ledger))

    def _note_subgraph_bns(self, graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for sub in _subgraphs(node):
                for g in _all_graphs(sub):
                    self.ledger.extend(
                        LedgerEntry(
                            n.name or n.output[0],
                            g.name or node.op_type,
                            False,
                            reason=f"inside a {node.op_type} subgraph: left as it was",
                        )
                        for n in g.node
                        if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS
                    )

    def _fold_graph(self, graph: onnx.GraphProto, names: _Names, graph_name: str) -> None:
        bns = [
            n
            for n in graph.node
            if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS
        ]
        index = _Index(graph)
        for bn in bns:
            label = bn.name or bn.output[0]
            try:
                plan = self._plan(index, bn)
            except _Skip as why:
                self.ledger.append(LedgerEntry(label, graph_name, False, reason=str(why)))
                continue
            self._apply(graph, index, bn, plan, names)
            index = _Index(graph)  # rewiring changed producers and consumers
            self.ledger.append(
                LedgerEntry(
                    label,
                    graph_name,
                    True,
                    plan.direction,
                    plan.target.name or plan.target.output[0],
                    plan.target.op_type,
                )
            )
        if any(e.folded for e in self.ledger):
            _remove_unused(graph)

    # -- checks and arithmetic; raises _Skip with the reason
    def _plan(self, index: _Index, bn: onnx.NodeProto) -> _Plan:
        if _attr(bn, "training_mode", 0):
            raise _Skip("training_mode=1 (normalizes with batch statistics)")
        if any(out for out in bn.output[1:]):
            raise _Skip("extra outputs (running mean/var) are used")
        if _attr(bn, "spatial", 1) != 1:
            raise _Skip("spatial=0 (per-element statistics) is not a per-channel affine")
        if len(bn.input) < 5:
            raise _Skip("missing scale/bias/mean/var inputs")
        params = [index.const_array(name) for name in bn.input[1:5]]
        if any(p is None for p in params):
            raise _Skip("scale, bias, mean or var is not a constant")
        scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        eps = float(_attr(bn, "epsilon", 1e-5))
        if not all(np.isfinite(a).all() for a in (scale, bias, mean, var)):
            raise _Skip("non-finite values in scale/bias/mean/var")
        if not (var + eps > 0).all():
            raise _Skip("var + epsilon <= 0 (the BatchNorm computes NaN/inf)")
        if not (len(scale) == len(bias) == len(mean) == len(var)):
            raise _Skip("scale/bias/mean/var lengths differ")
        s, t = bn_scale_shift(scale, bias, mean, var, eps)
        reasons = []
        for attempt in (self._plan_preceding, self._plan_following):
            try:
                return attempt(index, bn, s, t)
            except _Skip as why:  # noqa: PERF203
                reasons.append(str(why))
        raise _Skip("; ".join(reasons))

    def _plan_preceding(
        self, index: _Index, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray
    ) -> _Plan:
        x = bn.input[0]
        node = index.producer.get(x)
        if node is None:
            raise _Skip("preceding: input is not produced by a node")
        if (why := index.single_use(x, bn)) is not None:
            raise _Skip(f"preceding: {why}")
        add_node, add_value = None, None
        if node.op_type == "Add" and node.domain in _DEFAULT_DOMAINS:
            # bias as a separate Add: P → Add(const) → BN
            for i in (0, 1):
                c = index.const_array(node.input[1 - i])
                p = index.producer.get(node.input[i])
                if c is not None and p is not None:
                    add_node, add_value = node, (1 - i, c)
                    if (why := index.single_use(node.input[i], node)) is not None:
                        raise _Skip(f"preceding: {why}")
                    node = p
                    break
            else:
                raise _Skip("preceding: Add without a constant operand")
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS or op not in (
            "Conv",
            "ConvTranspose",
            "Gemm",
            "MatMul",
        ):
            raise _Skip(
                f"preceding: {node.domain + '.' if node.domain else ''}{op} is not foldable"
            )
        w = index.const_array(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            raise _Skip(f"preceding: {op} weight is not a constant")
        dtype = index.const_dtype(node.input[1])
        assert dtype is not None
        if _np_dtype(dtype).kind != "f":
            raise _Skip(f"preceding: {op} weight is not floating point")
        c = len(s)
        has_bias = len(node.input) > 2 and node.input[2] != ""
        b = None
        if has_bias:
            b = index.const_array(node.input[2])
            if b is None:
                raise _Skip(f"preceding: {op} bias is not a constant")
        plan = _Plan("preceding", node, {}, dtype, rewire=(add_node or node, bn.output[0]))
        if op in ("Conv", "ConvTranspose"):
            group = int(_attr(node, "group", 1))
            c_out = w.shape[0] if op == "Conv" else w.shape[1] * group
            if w.ndim < 3 or c_out != c:
                raise _Skip(f"preceding: {op} has {c_out} output channels, BN has {c}")
            plan.tensors[1] = scale_output_channels(w, s, op, group)
            base = np.zeros(c) if b is None else np.asarray(b, np.float64).reshape(-1)
            channel_shape = (c,) + (1,) * (w.ndim - 2)  # broadcast against (N, C, spatial…)
        elif op == "Gemm":
            if _attr(node, "transA", 0) not in (0, 1):
                raise _Skip("preceding: odd Gemm attributes")
            trans_b = int(_attr(node, "transB", 0))
            n_out = w.shape[0] if trans_b else w.shape[1]
            if w.ndim != 2 or n_out != c:
                raise _Skip(f"preceding: Gemm has {n_out} output features, BN has {c}")
            plan.tensors[1] = w * (s[:, None] if trans_b else s[None, :])
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            del alpha  # Y = alpha·A·B + beta·C: scaling B and C by s scales Y by s
            if b is not None and beta != 0:
                cb = np.broadcast_to(np.asarray(b, np.float64), _gemm_c_shape(b, c))
                plan.tensors[2] = cb * s + t / beta
            else:
                plan.tensors[2] = t.copy()
                plan.attrs["beta"] = 1.0
            channel_shape = (c,)
            base = None
        else:  # MatMul: BN's channel axis must be the last axis, i.e. a 2-D output
            rank = index.rank(node.input[0])
            if rank != 2:
                raise _Skip(
                    "preceding: MatMul output rank unknown"
                    if rank is None
                    else f"preceding: MatMul output is {rank}-D; BN's channel axis 1 is not "
                    "the feature axis"
                )
            if w.ndim != 2 or w.shape[1] != c:
                raise _Skip(f"preceding: MatMul has {w.shape[-1]} output features, BN has {c}")
            plan.tensors[1] = w * s[None, :]
            channel_shape = (c,)
            base = None
            if add_node is None:
                plan.bn_to_add = t  # the BN node itself becomes Add(x, t)
                plan.rewire = None
        if add_node is not None:
            i, const = add_value  # type: ignore[misc]
            const = np.asarray(const, np.float64)
            while const.ndim > len(channel_shape) and const.shape[0] == 1:
                const = const[0]  # (1, C, 1, 1) → (C, 1, 1): leading 1s are the batch axis
            try:
                cvec = np.broadcast_to(const, channel_shape)
            except ValueError:
                raise _Skip("preceding: bias Add is not per-channel") from None
            cdtype = index.const_dtype(add_node.input[i])
            s_b = s.reshape((c,) + (1,) * (len(channel_shape) - 1))
            t_b = t.reshape(s_b.shape)
            plan.extra.append((add_node, i, cvec * s_b + t_b))
            if cdtype is not None and cdtype != dtype:
                raise _Skip("preceding: bias Add dtype differs from the weight dtype")
            if op in ("Conv", "ConvTranspose") and b is not None:
                plan.tensors[2] = base * s
        elif op in ("Conv", "ConvTranspose"):
            plan.tensors[2] = base * s + t
        return plan

    def _plan_following(
        self, index: _Index, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray
    ) -> _Plan:
        y = bn.output[0]
        users = index.consumers.get(y, [])
        if y in index.graph_outputs or len(users) != 1 or y in index.subgraph_uses:
            raise _Skip("following: BN output has other consumers or is a graph output")
        node = users[0]
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS or op not in ("Conv", "Gemm"):
            raise _Skip(f"following: {op} is not foldable")
        if list(node.input).index(y) != 0:
            raise _Skip(f"following: BN output is not {op}'s data input")
        w = index.const_array(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            raise _Skip(f"following: {op} weight is not a constant")
        dtype = index.const_dtype(node.input[1])
        assert dtype is not None
        if _np_dtype(dtype).kind != "f":
            raise _Skip(f"following: {op} weight is not floating point")
        has_bias = len(node.input) > 2 and node.input[2] != ""
        b = index.const_array(node.input[2]) if has_bias else None
        if has_bias and b is None:
            raise _Skip(f"following: {op} bias is not a constant")
        c = len(s)
        plan = _Plan("following", node, {}, dtype)
        if op == "Conv":
            pads = list(_attr(node, "pads", []))
            auto_pad = _attr(node, "auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if any(pads) or auto_pad not in ("NOTSET", "VALID"):
                raise _Skip(
                    "following: padded Conv (borders see zeros, not the BN shift): not exact"
                )
            group = int(_attr(node, "group", 1))
            if w.ndim < 3 or w.shape[1] * group != c:
                raise _Skip(
                    f"following: Conv has {w.shape[1] * group} input channels, BN has {c}"
                )
            new_w, delta = scale_conv_input_channels(w, s, t, group)
            plan.tensors[1] = new_w
            base = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
            plan.tensors[2] = base + delta
        else:  # Gemm: A' = A·s + t  →  B' = diag(s)·B, C' = C + (alpha/beta)·t·B
            if _attr(node, "transA", 0):
                raise _Skip("following: Gemm with transA=1 normalizes the wrong axis")
            trans_b = int(_attr(node, "transB", 0))
            wb = np.asarray(w, np.float64)
            wk = wb.T if trans_b else wb  # (K, N)
            if wk.shape[0] != c:
                raise _Skip(f"following: Gemm has {wk.shape[0]} input features, BN has {c}")
            scaled = wk * s[:, None]
            plan.tensors[1] = scaled.T if trans_b else scaled
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            shift = alpha * (t @ wk)
            if b is not None and beta != 0:
                n = wk.shape[1]
                cb = np.broadcast_to(np.asarray(b, np.float64), _gemm_c_shape(b, n))
                plan.tensors[2] = cb + shift / beta
            else:
                plan.tensors[2] = shift
                plan.attrs["beta"] = 1.0
        return plan

    # -- rewrite
    def _apply(
        self,
        graph: onnx.GraphProto,
        index: _Index,
        bn: onnx.NodeProto,
        plan: _Plan,
        names: _Names,
    ) -> None:
        target_dtype = _np_dtype(plan.dtype)
        limit = np.finfo(target_dtype).max if target_dtype.kind == "f" else None
        updates = [(plan.target, i, v) for i, v in plan.tensors.items()] + plan.extra
        for node, _, value in updates:
            if limit is not None and np.abs(value).max(initial=0) > limit:
                raise _Skip(f"folded values overflow {target_dtype.name} ({node.op_type})")
        for node, i, value in updates:
            base = node.input[i] if i < len(node.input) and node.input[i] else node.name + "_B"
            new_name = names.fresh(base or "bn_folded")
            graph.initializer.append(
                numpy_helper.from_array(value.astype(target_dtype), new_name)
            )
            while len(node.input) <= i:
                node.input.append("")
            node.input[i] = new_name
        for key, value in plan.attrs.items():
            _set_attr(plan.target, key, value)
        if plan.bn_to_add is not None:
            shift = names.fresh((bn.name or "bn") + "_shift")
            graph.initializer.append(
                numpy_helper.from_array(plan.bn_to_add.astype(target_dtype), shift)
            )
            add = helper.make_node("Add", [bn.input[0], shift], [bn.output[0]], name=bn.name)
            add.metadata_props.extend(bn.metadata_props)
            graph.node.insert(list(graph.node).index(bn), add)
        elif plan.direction == "preceding":
            assert plan.rewire is not None
            producer, out_name = plan.rewire
            producer.output[0] = out_name
        else:
            plan.target.input[0] = bn.input[0]
        graph.node.remove(bn)


def _gemm_c_shape(c: np.ndarray, n: int) -> tuple[int, ...]:
    """Gemm's C broadcasts to (M, N); a per-feature vector keeps shape (N,) or its own."""
    shape = np.shape(c)
    return (n,) if len(shape) <= 1 else shape


def _remove_unused(graph: onnx.GraphProto) -> None:
    """Drop initializers, Constant nodes and value_info that nothing reads any more."""
    used: set[str] = {v.name for v in graph.output}
    for g in _all_graphs(graph):
        for n in g.node:
            used.update(n.input)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    # Side-effect-free producers of weights (Constant, Identity, Transpose) left without readers.
    pure = ("Constant", "Identity", "Transpose")
    while dead := [
        n
        for n in graph.node
        if n.op_type in pure and n.domain in _DEFAULT_DOMAINS and n.output[0] not in used
    ]:
        for n in dead:
            graph.node.remove(n)
        used = {v.name for v in graph.output}
        for g in _all_graphs(graph):
            for n in g.node:
                used.update(n.input)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    produced = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    produced |= {t.name for t in graph.initializer}
    stale = [vi for vi in graph.value_info if vi.name not in produced]
    for vi in stale:
        graph.value_info.remove(vi)


# ----------------------------------------------------------------------------- entry points


def _default_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    return None


def validate_for_folding(model: onnx.ModelProto, source: str) -> None:
    """Raise InvalidModelError (one line) when the model cannot be folded safely at all."""
    opset = _default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        raise InvalidModelError(
            f"{source}: opset {opset} is older than the oldest supported ({MIN_OPSET}); "
            "upgrade it with onnx.version_converter first"
        )
    defined = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        for name in node.input:
            if name and name not in defined:
                raise InvalidModelError(
                    f"{source}: fails onnx.checker: node '{node.name or node.op_type}' reads "
                    f"'{name}', which nothing defines before it"
                )
        defined.update(node.output)
    if model.ByteSize() <= CHECKER_MAX_BYTES:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise InvalidModelError(f"{source}: fails onnx.checker: {first[:200]}") from None


def fold_tolerance(model: onnx.ModelProto) -> Any:
    """The tolerance of the verification: that of the graph outputs' dtype."""
    dtypes = [
        _np_dtype(o.type.tensor_type.elem_type)
        for o in model.graph.output
        if o.type.tensor_type.elem_type
    ]
    worst = max(dtypes, key=lambda d: default_tolerance(d).atol, default=np.dtype("float32"))
    return default_tolerance(worst)


def fold_bn(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
) -> FoldResult:
    """Fold BatchNormalization in a model or file; verify against the original by default.

    A ModelProto is copied unless ``inplace=True``. Raises VerificationFailed when the folded
    graph differs from the original beyond the dtype's tolerance.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if isinstance(model, onnx.ModelProto):
        source = "<model>"
        original: onnx.ModelProto | Path = model
        work = model if inplace else _copy(model)
    else:
        loaded = read_onnx(model)
        source, original, work = str(loaded.path), loaded.path, loaded.model
    timings["load"] = time.perf_counter() - start
    validate_for_folding(work, source)
    start = time.perf_counter()
    fold = FoldBatchNorm()
    fold(work)
    timings["fold"] = time.perf_counter() - start
    comparisons = None
    if verify and fold.ledger and any(e.folded for e in fold.ledger):
        start = time.perf_counter()
        comparisons = _verify(original, work, seed)
        timings["verify"] = time.perf_counter() - start
    elif verify:
        comparisons = ()
    result = FoldResult(work, tuple(fold.ledger), source, comparisons, timings)
    if result.verified is False:
        raise VerificationFailed(
            f"{source}: folded graph differs from the original "
            f"(max |Δ| {fmt_num(max(c.max_abs for c in comparisons or ()))}); nothing written",
            result,
        )
    return result


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _verify(
    original: onnx.ModelProto | Path, folded: onnx.ModelProto | Path, seed: int
) -> tuple:
    tol = fold_tolerance(folded if isinstance(folded, onnx.ModelProto) else onnx.load_model(
        str(folded), load_external_data=False))  # fmt: skip
    return tuple(compare_onnx_models(original, folded, seed=seed, tolerance=tol))


def fold_bn_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    report: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> FoldResult:
    """Fold a file into another; the output appears only after it verified (atomic)."""
    out = check_output_path(output_path, inputs=(input_path,), overwrite=overwrite)
    if report is not None:
        check_output_path(report, inputs=(input_path, output_path), overwrite=overwrite)
    loaded = read_onnx(input_path)
    source = str(loaded.path)
    validate_for_folding(loaded.model, source)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    fold = FoldBatchNorm()
    fold(loaded.model)
    timings["fold"] = time.perf_counter() - start
    comparisons: tuple | None = None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        start = time.perf_counter()
        save_onnx(loaded.model, staged, external_data=loaded.external_data)
        timings["save"] = time.perf_counter() - start
        if verify:
            start = time.perf_counter()
            comparisons = (
                _verify(loaded.path, staged, seed)
                if fold.ledger and any(e.folded for e in fold.ledger)
                else ()
            )
            timings["verify"] = time.perf_counter() - start
        result = FoldResult(loaded.model, tuple(fold.ledger), source, comparisons, timings)
        if result.verified is False:
            if report is not None:
                write_text_atomic(report, render(result, _report_format(report)))
            raise VerificationFailed(
                f"{source}: folded graph differs from the original; {out} not written", result
            )
        data = staged.parent / (out.name + ".data")
        if data.exists():
            os.replace(data, out.parent / data.name)
        os.replace(staged, out)
    if report is not None:
        write_text_atomic(report, render(result, _report_format(report)))
    return result


def _report_format(path: str | os.PathLike[str]) -> str:
    from normdeploy.report import format_for_path

    return format_for_path(path)
