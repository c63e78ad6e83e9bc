"""Fold BatchNormalization into the neighbouring Conv / ConvTranspose / Gemm / MatMul weights.

With scale γ, bias β, running mean μ, running variance σ² and epsilon ε, per channel::

    s = γ / √(σ² + ε)        t = β − μ · s        BN(x) = x · s + t

*Into the preceding producer* P (``BN(P(x))``, optionally through an ``Add`` of a constant
per-channel bias): scale P's weight along its output-channel axis, ``W' = W · s``, and
``b' = b · s + t``. The axis comes from the op's layout: Conv weight ``(C_out, C_in/g, k…)``
axis 0; ConvTranspose weight ``(C_in, C_out/g, k…)`` axis 1 within each group; Gemm ``B`` the
output-feature axis (``transB`` decides which); MatMul ``B`` its last axis (a MatMul has no bias:
the BatchNormalization becomes ``Add(x, t)``).

*Into the following consumer* C (``C(BN(x))``), only where that is exact: a Conv with no padding
(a padded border sees zeros, not ``t``), or a Gemm on the BN output: ``W'`` scales the
input-channel axis by ``s`` and ``b' = b + W·t``.

Everything is computed in float64 and cast once to the weight's dtype; a result that does not fit
that dtype (fp16 overflow) is refused. A fold that is not provably exact is skipped and the
ledger says why: the producer's output has other readers or is a graph output, parameters are
not constants (initializers and Constant nodes count, also through Identity/Transpose),
``training_mode=1`` or extra BN outputs, a channel mismatch, unknown ranks, non-finite
statistics, a BN inside a control-flow subgraph or a function (left as it was).

Memory: a weight read only by the folded node is rewritten in its own initializer (same name);
a weight with other readers is left alone and the folded copy gets a fresh name that collides
with nothing in the model (subgraphs included). Tensors and Constant/Identity/Transpose nodes
that the fold left without readers are removed; nothing else is.
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
from onnx import external_data_helper, helper, numpy_helper

from normdeploy.compare import ArrayComparison, compare_onnx_models
from normdeploy.errors import InvalidModelError, OutputPathError, VerificationFailed
from normdeploy.io import check_output_path, read_onnx, save_onnx
from normdeploy.passes import GraphPass, PassResult
from normdeploy.passes._stream import save_model_streaming
from normdeploy.report import fmt_num, markdown_table, text_table, write_report

logger = logging.getLogger(__name__)

MIN_OPSET = 9  # BatchNormalization before opset 9 had the `spatial`/`is_test` semantics
_DEFAULT_DOMAINS = ("", "ai.onnx")
# onnx.checker serializes the model (one more copy of every weight); above this many bytes of
# weights the pass relies on its own structural check (every node input defined before use).
CHECKER_MAX_BYTES = 64 * 2**20
_FLOAT_TYPES = frozenset(
    (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
     onnx.TensorProto.BFLOAT16)
)  # fmt: skip
_PURE_WEIGHT_OPS = ("Constant", "Identity", "Transpose")
# 16-bit floats: refuse a fold whose shift |t| exceeds max/_SHIFT_HEADROOM (see check_fits)
_SHIFT_HEADROOM = 64


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
    invalid: bool = False  # the BN's own parameters are broken (NaN/inf, var + eps <= 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "graph": self.graph,
            "folded": self.folded,
            "direction": self.direction,
            "target": self.target,
            "target_op": self.target_op,
            "reason": self.reason,
            "invalid": self.invalid,
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
        if not self.verification:
            return "nothing folded: the graph is unchanged, nothing to check"
        worst = max(self.verification, key=lambda c: c.needed_atol)
        status = "PASS" if self.verified else "FAIL"
        return (
            f"{status}: folded vs original on onnxruntime CPU (optimizations off), "
            f"{len(self.verification)} output(s) × batch sizes, worst '{worst.name}' "
            f"max |Δ| = {fmt_num(worst.max_abs)} (atol={worst.atol:g}, rtol={worst.rtol:g})"
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


def scale_output_channels(
    w: np.ndarray, s: np.ndarray, op: str, *, group: int = 1, trans_b: bool = False
) -> np.ndarray:
    """Multiply producer weight ``w`` by ``s`` along its output channels (float64 result).

    Conv ``(C_out, C_in/g, k…)``: axis 0. ConvTranspose ``(C_in, C_out/g, k…)``: output channel
    ``g·C_out/g + j`` is column ``j`` of group ``g``'s rows. Gemm ``B``: axis 0 with ``transB``,
    else axis 1. MatMul ``B``: the last axis.
    """
    w = np.array(w, np.float64)  # a float64 copy, scaled in place
    s = np.asarray(s, np.float64)
    if op == "Conv":
        w *= s.reshape((-1,) + (1,) * (w.ndim - 1))
        return w
    if op == "ConvTranspose":
        c_in, c_out_g = w.shape[:2]
        grouped = w.reshape((group, c_in // group, c_out_g, *w.shape[2:]))
        sg = s.reshape((group, 1, c_out_g) + (1,) * (w.ndim - 2))
        return (grouped * sg).reshape(w.shape)
    if op == "Gemm":
        return w * (s[:, None] if trans_b else s[None, :])
    if op == "MatMul":
        return w * s
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


def scale_gemm_input_features(
    w: np.ndarray, s: np.ndarray, t: np.ndarray, *, trans_b: bool = False, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm ``B`` after a per-feature affine of ``A``: (B', Δ) with Y' = A·B' + Δ (float64)."""
    wk = np.asarray(w, np.float64)
    wk = wk.T if trans_b else wk  # (K, N)
    scaled = wk * np.asarray(s, np.float64)[:, None]
    return (scaled.T if trans_b else scaled), alpha * (np.asarray(t, np.float64) @ wk)


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

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        graphs = list(_all_graphs(model.graph))
        for fn in model.functions:
            self.used.add(fn.name)
            for node in fn.node:
                graphs.extend(g for sub in _subgraphs(node) for g in _all_graphs(sub))
        for g in graphs:
            self.used.add(g.name)
            self.used.update(t.name for t in g.initializer)
            self.used.update(t.values.name for t in g.sparse_initializer)
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


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


class _Index:
    """Producers, readers, constants and subgraph reads of one graph, kept current by edits."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.init = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.declared = {
            vi.name: vi for vi in (*graph.value_info, *graph.input, *graph.output)
        }
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.subgraph_uses: set[str] = set()
        for node in graph.node:
            self.attach(node)
            for sub in _subgraphs(node):
                for g in _all_graphs(sub):
                    for n in g.node:
                        self.subgraph_uses.update(n.input)

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

    def const_array(self, name: str) -> np.ndarray | None:
        """The value of a constant input (an initializer that is not a graph input, a Constant
        node, or either through Identity/Transpose), else None."""
        if name in self.init and name not in self.graph_inputs:
            tensor = self.init[name]
            if _external(tensor):
                raise _Skip(f"'{name}' is in external data that was not loaded")
            return numpy_helper.to_array(tensor)
        node = self.producer.get(name)
        if node is None or node.domain not in _DEFAULT_DOMAINS:
            return None
        if node.op_type == "Constant":
            return _constant_value(node)
        # Exporters without constant folding write weights through Identity/Transpose.
        if node.op_type == "Identity" and node.input:
            return self.const_array(node.input[0])
        if node.op_type == "Transpose" and node.input:
            value = self.const_array(node.input[0])
            return None if value is None else np.transpose(value, _attr(node, "perm", None))
        return None

    def const_dtype(self, name: str) -> int | None:
        """The TensorProto element type of a constant input."""
        if name in self.init:
            return self.init[name].data_type
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            value = _constant_value(node)
            return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)
        if node.op_type in ("Identity", "Transpose") and node.input:
            return self.const_dtype(node.input[0])
        return None

    def sole_reader(self, value: str, user: onnx.NodeProto) -> str | None:
        """None if ``user`` is the only reader of ``value``; else why it is not."""
        if value in self.graph_outputs:
            return f"'{value}' is a graph output"
        users = self.consumers.get(value, [])
        if len(users) != 1 or users[0] is not user:
            return f"'{value}' has {len(users)} readers"
        if value in self.subgraph_uses:
            return f"'{value}' is also read inside a subgraph"
        return None

    def owns_initializer(self, name: str, user: onnx.NodeProto) -> bool:
        """True when ``name`` is an initializer that only ``user`` reads (safe to rewrite)."""
        return (
            name in self.init
            and name not in self.graph_inputs
            and not _external(self.init[name])
            and self.sole_reader(name, user) is None
        )

    def rank(self, value: str, depth: int = 0) -> int | None:
        """Rank of a value from declared shapes, or propagated through rank-keeping ops."""
        vi = self.declared.get(value)
        if vi is not None and vi.type.tensor_type.HasField("shape"):
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
    (
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt",
        "Reciprocal", "Clip", "Identity", "Dropout", "Cast", "Softmax", "LogSoftmax",
        "BatchNormalization", "LayerNormalization", "InstanceNormalization", "Mish",
    )
)  # fmt: skip
_BROADCASTING = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"))


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return None if _external(a.t) else numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.asarray(a.f, np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), np.float32)
    return None


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _np_dtype(tensor_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type))


def _finfo_max(dtype: np.dtype) -> float:
    try:
        return float(np.finfo(dtype).max)
    except ValueError:  # bfloat16 and friends come from ml_dtypes
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)


def _overwrite_tensor(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Replace a tensor's data (and dims) in place, keeping its name, type and doc string."""
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(name)
    del tensor.dims[:]
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


# ----------------------------------------------------------------------------- the pass


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
    shift: np.ndarray | None = None  # MatMul without a bias Add: BN becomes Add(x, shift)

    def check_fits(self, t: np.ndarray) -> None:
        """Refuse values the target dtype cannot hold (fp16 overflow) before any edit.

        In a 16-bit float the folded producer computes ``s·P(x) + t``: when ``|t|`` (≈ |mean·s|)
        nears the dtype's range its partial sums overflow, or cancel with the precision of
        ``|t|`` where the BatchNorm subtracted the mean first.
        """
        limit = _finfo_max(self.dtype)
        values = [v for _, _, v in self.updates]
        if self.shift is not None:
            values.append(self.shift)
        for value in values:
            # max/min propagate NaN, so one comparison also refuses NaN and inf
            if value.size and not max(value.max(), -value.min()) <= limit:
                raise _Skip(f"folded values overflow {self.dtype.name}")
        if self.dtype.itemsize <= 2 and t.size and np.abs(t).max() > limit / _SHIFT_HEADROOM:
            raise _Skip(
                f"BN shift |t| up to {np.abs(t).max():.3g} exceeds {self.dtype.name} max/"
                f"{_SHIFT_HEADROOM}: the folded graph could overflow or lose precision"
            )


class FoldBatchNorm(GraphPass):
    """Fold every BatchNormalization that folds exactly, in place; ``ledger`` says what it did."""

    name = "fold-bn"
    in_place = True

    def __init__(self) -> None:
        self.ledger: list[LedgerEntry] = []

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.ledger = []
        names = _Names(model)
        self._fold_graph(model.graph, names, "main")
        self._note_nested_bns(model)
        return PassResult(model, any(e.folded for e in self.ledger))

    def _note_nested_bns(self, model: onnx.ModelProto) -> None:
        places = [
            (g, f"inside a {node.op_type} subgraph")
            for node in model.graph.node
            for sub in _subgraphs(node)
            for g in _all_graphs(sub)
        ]
        places += [(fn, f"inside function '{fn.name}'") for fn in model.functions]
        for g, where in places:
            self.ledger.extend(
                LedgerEntry(
                    n.name or n.output[0],
                    getattr(g, "name", "") or where.split()[-1].strip("'"),
                    False,
                    reason=f"{where}: left as it was",
                )
                for n in g.node
                if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS
            )

    def _fold_graph(self, graph: onnx.GraphProto, names: _Names, graph_name: str) -> None:
        index = _Index(graph)
        edits = _Edits()
        bns = [
            n
            for n in graph.node
            if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS
        ]
        for bn in bns:
            label = bn.name or bn.output[0]
            try:
                plan = self._plan(index, bn)
            except _Skip as why:
                self.ledger.append(
                    LedgerEntry(
                        label,
                        graph_name,
                        False,
                        reason=str(why),
                        invalid=isinstance(why, _Invalid),
                    )
                )
                continue
            target = plan.target.name or plan.target.output[0]
            _apply(graph, index, names, edits, bn, plan)
            note = (
                "shift kept as an Add (MatMul has no bias)" if plan.shift is not None else ""
            )
            self.ledger.append(
                LedgerEntry(
                    label, graph_name, True, plan.direction, target, plan.target.op_type, note
                )
            )
        edits.finish(graph, index)

    # -- checks and arithmetic; raise _Skip with the reason
    def _plan(self, index: _Index, bn: onnx.NodeProto) -> _Plan:
        if _attr(bn, "training_mode", 0):
            raise _Skip("training_mode=1 (normalizes with batch statistics)")
        if any(out for out in bn.output[1:]):
            raise _Skip("extra outputs (running mean/var) are used")
        if _attr(bn, "spatial", 1) != 1:
            raise _Skip("spatial=0 (per-element statistics) is not a per-channel affine")
        if len(bn.input) < 5 or not all(bn.input[:5]):
            raise _Skip("missing scale/bias/mean/var inputs")
        params = [index.const_array(name) for name in bn.input[1:5]]
        if any(p is None for p in params):
            raise _Skip("scale, bias, mean or var is not a constant")
        scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        # The attribute is a float32; its default is float32(1e-5), not the double 1e-5.
        eps = float(np.float32(_attr(bn, "epsilon", 1e-5)))
        if not (len(scale) == len(bias) == len(mean) == len(var)):
            raise _Skip("scale/bias/mean/var lengths differ")
        if not all(np.isfinite(a).all() for a in (scale, bias, mean, var)):
            raise _Invalid("non-finite values in scale/bias/mean/var")
        if not (var + eps > 0).all():
            raise _Invalid("var + epsilon <= 0 (the BatchNorm computes NaN/inf)")
        s, t = bn_scale_shift(scale, bias, mean, var, eps)
        reasons = []
        for attempt in (self._plan_preceding, self._plan_following):
            try:
                plan = attempt(index, bn, s, t)
                plan.check_fits(t)
            except _Skip as why:  # noqa: PERF203
                reasons.append(str(why))
            else:
                return plan
        raise _Skip("; ".join(reasons))

    def _weights(
        self, index: _Index, node: onnx.NodeProto, side: str
    ) -> tuple[np.ndarray, np.ndarray | None, np.dtype]:
        """(weight, bias or None, dtype) of a Conv/ConvTranspose/Gemm/MatMul; both constant."""
        op = node.op_type
        w = index.const_array(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if w is None:
            raise _Skip(f"{side}: {op} weight is not a constant")
        dtype = index.const_dtype(node.input[1])
        if dtype not in _FLOAT_TYPES:
            raise _Skip(f"{side}: {op} weight is not a float tensor")
        b = None
        if op != "MatMul" and len(node.input) > 2 and node.input[2]:
            b = index.const_array(node.input[2])
            if b is None:
                raise _Skip(f"{side}: {op} bias is not a constant")
            if index.const_dtype(node.input[2]) != dtype:
                raise _Skip(f"{side}: {op} bias dtype differs from its weight's")
        return w, b, _np_dtype(dtype)

    def _plan_preceding(
        self, index: _Index, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray
    ) -> _Plan:
        x = bn.input[0]
        node = index.producer.get(x)
        if node is None:
            raise _Skip("preceding: input is not produced by a node")
        if (why := index.sole_reader(x, bn)) is not None:
            raise _Skip(f"preceding: {why}")
        add_node: onnx.NodeProto | None = None
        add_slot, add_const = 0, np.zeros(())
        if node.op_type == "Add" and node.domain in _DEFAULT_DOMAINS:
            # bias as a separate Add: P → Add(const) → BN
            for i in (0, 1):
                const = index.const_array(node.input[1 - i])
                producer = index.producer.get(node.input[i])
                if const is not None and producer is not None:
                    if (why := index.sole_reader(node.input[i], node)) is not None:
                        raise _Skip(f"preceding: {why}")
                    add_node, add_slot, add_const = node, 1 - i, const
                    node = producer
                    break
            else:
                raise _Skip("preceding: Add without a constant operand")
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS or op not in _PRODUCERS:
            raise _Skip(
                f"preceding: {node.domain + '.' if node.domain else ''}{op} is not foldable"
            )
        if node.output[0] != (add_node.input[1 - add_slot] if add_node else x):
            raise _Skip(f"preceding: BN reads a secondary output of {op}")
        w, b, dtype = self._weights(index, node, "preceding")
        c = len(s)
        plan = _Plan("preceding", node, dtype, rewire=add_node or node)
        if op in ("Conv", "ConvTranspose"):
            group = int(_attr(node, "group", 1))
            if w.ndim < 3 or w.shape[0] % group:
                raise _Skip(
                    f"preceding: {op} weight shape {w.shape} does not match group={group}"
                )
            c_out = w.shape[0] if op == "Conv" else w.shape[1] * group
            if c_out != c:
                raise _Skip(f"preceding: {op} has {c_out} output channels, BN has {c}")
            plan.updates.append((node, 1, scale_output_channels(w, s, op, group=group)))
            channel_shape: tuple[int, ...] = (c,) + (1,) * (w.ndim - 2)
            out_rank = w.ndim
            if b is not None or add_node is None:
                base = np.zeros(c) if b is None else np.asarray(b, np.float64).reshape(-1)
                if base.shape != (c,):
                    raise _Skip(f"preceding: {op} bias has {base.size} values, BN has {c}")
                plan.updates.append((node, 2, base * s + (0 if add_node else t)))
        elif op == "Gemm":
            trans_b = bool(_attr(node, "transB", 0))
            n_out = w.shape[0] if trans_b else w.shape[1]
            if w.ndim != 2 or n_out != c:
                raise _Skip(f"preceding: Gemm has {n_out} output features, BN has {c}")
            plan.updates.append((node, 1, scale_output_channels(w, s, op, trans_b=trans_b)))
            beta = float(_attr(node, "beta", 1.0))
            channel_shape, out_rank = (c,), 2
            if b is not None and beta != 0:
                # Y = alpha·A·B + beta·C: scaling B and C by s scales Y by s
                cb = np.asarray(b, np.float64)
                if cb.ndim > 2:
                    raise _Skip("preceding: Gemm C has more than 2 dimensions")
                plan.updates.append((node, 2, cb * s + (0 if add_node else t / beta)))
            elif add_node is None:
                plan.updates.append((node, 2, t.copy()))
                plan.attrs["beta"] = 1.0
        else:  # MatMul: BN's channel axis 1 is the feature axis only for a 2-D product
            rank = index.rank(node.input[0])
            if rank != 2:
                raise _Skip(
                    "preceding: MatMul input rank unknown"
                    if rank is None
                    else f"preceding: MatMul output is {rank}-D; BN's channel axis 1 is not "
                    "the feature axis"
                )
            if w.ndim != 2 or w.shape[1] != c:
                raise _Skip(f"preceding: MatMul has {w.shape[-1]} output features, BN has {c}")
            plan.updates.append((node, 1, scale_output_channels(w, s, op)))
            channel_shape, out_rank = (c,), 2
            if add_node is None:
                plan.shift, plan.rewire = t, None
        if add_node is not None:
            plan.updates.append(
                (add_node, add_slot, _fold_bias_add(add_const, s, t, channel_shape, out_rank))
            )
            if index.const_dtype(add_node.input[add_slot]) != helper.np_dtype_to_tensor_dtype(
                dtype
            ):
                raise _Skip("preceding: bias Add dtype differs from the weight dtype")
        return plan

    def _plan_following(
        self, index: _Index, bn: onnx.NodeProto, s: np.ndarray, t: np.ndarray
    ) -> _Plan:
        y = bn.output[0]
        users = index.consumers.get(y, [])
        if y in index.graph_outputs or len(users) != 1 or y in index.subgraph_uses:
            raise _Skip("following: BN output has other readers or is a graph output")
        node = users[0]
        op = node.op_type
        if node.domain not in _DEFAULT_DOMAINS or op not in ("Conv", "Gemm"):
            raise _Skip(
                f"following: {node.domain + '.' if node.domain else ''}{op} is not foldable"
            )
        if node.input[0] != y:
            raise _Skip(f"following: BN output is not {op}'s data input")
        w, b, dtype = self._weights(index, node, "following")
        c = len(s)
        plan = _Plan("following", node, dtype)
        if op == "Conv":
            pads = list(_attr(node, "pads", []))
            auto_pad = _attr(node, "auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            if any(pads) or auto_pad not in ("NOTSET", "VALID"):
                raise _Skip(
                    "following: padded Conv (borders see zeros, not the BN shift): not exact"
                )
            group = int(_attr(node, "group", 1))
            if w.ndim < 3 or w.shape[1] * group != c or w.shape[0] % group:
                raise _Skip(
                    f"following: Conv has {w.shape[1] * group} input channels, BN has {c}"
                )
            new_w, delta = scale_conv_input_channels(w, s, t, group)
            base = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
            if base.shape != delta.shape:
                raise _Skip("following: Conv bias does not match its output channels")
            plan.updates += [(node, 1, new_w), (node, 2, base + delta)]
        else:  # Gemm: A' = A·s + t  →  B' = diag(s)·B, C' = C + (alpha/beta)·t·B
            if _attr(node, "transA", 0):
                raise _Skip("following: Gemm with transA=1 normalizes the wrong axis")
            trans_b = bool(_attr(node, "transB", 0))
            k = w.shape[1] if trans_b else w.shape[0]
            if w.ndim != 2 or k != c:
                raise _Skip(f"following: Gemm has {k} input features, BN has {c}")
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
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


_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _fold_bias_add(
    const: np.ndarray, s: np.ndarray, t: np.ndarray, channel_shape: tuple[int, ...], rank: int
) -> np.ndarray:
    """The constant of ``Add(P(x), c)`` after folding: ``c·s + t``, if ``c`` is per-channel."""
    const = np.asarray(const, np.float64)
    try:
        shape = np.broadcast_shapes(const.shape, channel_shape)
    except ValueError:
        raise _Skip("preceding: bias Add is not per-channel") from None
    k = len(channel_shape)
    lead = shape[: len(shape) - k]
    if (
        len(shape) > rank
        or tuple(shape[len(shape) - k :]) != channel_shape
        or any(d != 1 for d in lead)
    ):
        raise _Skip("preceding: bias Add is not per-channel")
    return const * s.reshape(channel_shape) + t.reshape(channel_shape)


class _Edits:
    """What the folds removed: BN nodes, renamed values, and tensors that may now be unread."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.candidates: list[str] = []
        self.gone: set[str] = set()

    def finish(self, graph: onnx.GraphProto, index: _Index) -> None:
        """Drop what lost its last reader, then delete removed nodes and stale value_info."""
        dead_init: set[str] = set()
        work = list(self.candidates)
        while work:
            name = work.pop()
            if (
                index.consumers.get(name)
                or name in index.graph_outputs
                or name in index.subgraph_uses
                or name in self.gone
            ):
                continue
            if name in index.init:
                if name not in index.graph_inputs:
                    dead_init.add(name)
                    self.gone.add(name)
                continue
            node = index.producer.get(name)
            if (
                node is not None
                and node.op_type in _PURE_WEIGHT_OPS
                and node.domain in _DEFAULT_DOMAINS
                and len(node.output) == 1
            ):
                index.detach(node)
                self.nodes.append(node)
                self.gone.add(name)
                work.extend(i for i in node.input if i)
        if self.nodes:
            ids = {id(n) for n in self.nodes}
            for k in reversed(range(len(graph.node))):
                if id(graph.node[k]) in ids:
                    del graph.node[k]
        if dead_init:
            for k in reversed(range(len(graph.initializer))):
                if graph.initializer[k].name in dead_init:
                    del graph.initializer[k]
        if self.gone:
            for k in reversed(range(len(graph.value_info))):
                if graph.value_info[k].name in self.gone:
                    del graph.value_info[k]


def _set_input_constant(
    graph: onnx.GraphProto,
    index: _Index,
    names: _Names,
    edits: _Edits,
    node: onnx.NodeProto,
    slot: int,
    value: np.ndarray,
    dtype: np.dtype,
) -> None:
    """Make input ``slot`` of ``node`` the constant ``value``: in place when only ``node``
    reads the old initializer, else under a fresh name (shared weights stay untouched)."""
    old = node.input[slot] if slot < len(node.input) else ""
    array = value.astype(dtype)
    if old and index.owns_initializer(old, node):
        _overwrite_tensor(index.init[old], array)
        return
    role = ("X", "W", "B")[slot] if node.op_type in _PRODUCERS else f"in{slot}"
    name = names.fresh(old or f"{node.name or node.op_type}.{role}")
    graph.initializer.append(numpy_helper.from_array(array, name))
    index.init[name] = graph.initializer[len(graph.initializer) - 1]
    index.detach(node)
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name
    index.attach(node)
    if old:
        edits.candidates.append(old)


def _apply(
    graph: onnx.GraphProto,
    index: _Index,
    names: _Names,
    edits: _Edits,
    bn: onnx.NodeProto,
    plan: _Plan,
) -> None:
    for node, slot, value in plan.updates:
        _set_input_constant(graph, index, names, edits, node, slot, value, plan.dtype)
    for key, value in plan.attrs.items():
        _set_attr(plan.target, key, value)
    index.detach(bn)
    edits.candidates.extend(name for name in bn.input[1:] if name)
    x, y = bn.input[0], bn.output[0]
    if plan.shift is not None:
        # The BN node itself becomes Add(x, t): same name, place and output.
        shift = names.fresh(f"{bn.name or y}.shift")
        graph.initializer.append(numpy_helper.from_array(plan.shift.astype(plan.dtype), shift))
        index.init[shift] = graph.initializer[len(graph.initializer) - 1]
        bn.op_type, bn.domain = "Add", ""
        del bn.attribute[:]
        del bn.input[:]
        bn.input.extend([x, shift])
        del bn.output[1:]
        index.attach(bn)
        return
    edits.nodes.append(bn)
    if plan.direction == "preceding":
        producer = plan.rewire
        assert producer is not None
        index.detach(producer)
        producer.output[0] = y
        index.attach(producer)
        edits.gone.add(x)
    else:
        index.detach(plan.target)
        plan.target.input[0] = x
        index.attach(plan.target)
        edits.gone.add(y)


# ----------------------------------------------------------------------------- entry points


def _default_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    return None


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data, from dims and types alone (no data is touched)."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        try:
            total += n * _np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            total += n
    return total


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
    if _weight_bytes(model) <= CHECKER_MAX_BYTES:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise InvalidModelError(f"{source}: fails onnx.checker: {first[:200]}") from None


def _verify(original: Any, folded: Any, seed: int) -> tuple[ArrayComparison, ...]:
    """Original vs folded on onnxruntime CPU (optimizations off), tolerance from each dtype."""
    return tuple(compare_onnx_models(original, folded, seed=seed))


def _raise_if_failed(result: FoldResult, what: str) -> None:
    if result.verified is False:
        assert result.verification is not None
        worst = max(result.verification, key=lambda c: c.needed_atol)
        raise VerificationFailed(
            f"{result.source}: folded graph differs from the original on output "
            f"'{worst.name}' (max |Δ| {fmt_num(worst.max_abs)}, atol {worst.atol:g}, "
            f"rtol {worst.rtol:g}); {what}",
            result,
        )


def fold_bn(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
) -> FoldResult:
    """Fold BatchNormalization in a model or file; verify against the original by default.

    A caller's ModelProto is copied first (one more copy of its weights) unless
    ``inplace=True``; a file is loaded and folded in place. Raises VerificationFailed when the
    folded graph differs from the original beyond the output dtype's tolerance.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    original: onnx.ModelProto | Path
    if isinstance(model, onnx.ModelProto):
        source, original = "<model>", model
        validate_for_folding(model, source)
        work = model if inplace else _copy(model)
    else:
        loaded = read_onnx(model)
        source, original, work = str(loaded.path), loaded.path, loaded.model
        validate_for_folding(work, source)
    timings["load"] = time.perf_counter() - start
    if inplace and verify and isinstance(model, onnx.ModelProto):
        original = model.SerializeToString()  # the reference must not be the folded proto
    start = time.perf_counter()
    fold = FoldBatchNorm()
    fold(work)
    timings["fold"] = time.perf_counter() - start
    comparisons = None
    if verify:
        start = time.perf_counter()
        comparisons = (
            _verify(original, work, seed) if any(e.folded for e in fold.ledger) else ()
        )
        timings["verify"] = time.perf_counter() - start
    result = FoldResult(work, tuple(fold.ledger), source, comparisons, timings)
    _raise_if_failed(result, "folded in place" if inplace else "the input was not changed")
    return result


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    """The external data files an (unloaded) model refers to."""
    files = set()
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            files.add((base / info.location).resolve())
    return files


def fold_bn_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    report: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> FoldResult:
    """Fold a file into another. The output is staged beside its target, verified against the
    input, and only then renamed into place: a failed check leaves no output behind.

    Keeps external data when the input had it (``OUT.data`` beside ``OUT``). The returned
    model is the folded proto; after an external-data save its tensors point at that file.
    """
    out = check_output_path(output_path, inputs=(input_path,), overwrite=overwrite)
    if report is not None:
        check_output_path(
            report, inputs=(input_path, output_path), overwrite=overwrite, what="report"
        )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = read_onnx(input_path)
    if loaded.external_data:
        # The header is small when the weights are external; it still names the data files.
        header = onnx.load_model(str(loaded.path), load_external_data=False)
        data_out = (out.parent / (out.name + ".data")).resolve()
        if data_out in _external_files(header, loaded.path.parent):
            raise OutputPathError(
                f"{out}: its external data file '{data_out.name}' is the input's; "
                "choose another output name"
            )
        del header
    source = str(loaded.path)
    validate_for_folding(loaded.model, source)
    timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    fold = FoldBatchNorm()
    fold(loaded.model)
    timings["fold"] = time.perf_counter() - start
    if broken := next((e for e in fold.ledger if e.invalid), None):
        # The pass kept it (it never writes NaN weights); the file itself is what is broken.
        raise InvalidModelError(
            f"{source}: BatchNormalization '{broken.node}' has {broken.reason}; the input "
            "model itself computes NaN/inf there: fix its statistics"
        )
    comparisons: tuple[ArrayComparison, ...] | None = None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        start = time.perf_counter()
        if loaded.external_data:
            save_onnx(loaded.model, staged, external_data=True)
        else:
            try:
                save_model_streaming(loaded.model, staged)
            except OSError as exc:
                raise OutputPathError(f"{out}: cannot write ({exc.strerror or exc})") from None
        timings["save"] = time.perf_counter() - start
        if verify:
            start = time.perf_counter()
            folded_any = any(e.folded for e in fold.ledger)
            comparisons = _verify(loaded.path, staged, seed) if folded_any else ()
            timings["verify"] = time.perf_counter() - start
        result = FoldResult(loaded.model, tuple(fold.ledger), source, comparisons, timings)
        if result.verified is False:
            if report is not None:
                write_report(result, report)
            _raise_if_failed(result, f"{out} not written")
        data = staged.parent / (out.name + ".data")
        if data.exists():
            os.replace(data, out.parent / data.name)
        os.replace(staged, out)
    if report is not None:
        write_report(result, report)
    return result
