"""merge-branches: merge summed parallel linear branches that read the same tensor into one Conv.

RepVGG and MobileOne train a block as ``conv_k×k(x) + conv_1×1(x) + BN(x)`` and deploy it as
one k×k convolution. After :class:`~normdeploy.passes.fold_bn.FoldBatchNorm` has folded each
branch's BatchNorm into its Conv, the identity BatchNorm is left: no folder can remove it, since
its input has other readers and its reader is an ``Add``. This pass finds every ``Add``/``Sum``
(and chains of them whose intermediate sums have no other reader), groups the summed operands by
the tensor they read, and merges each group into its largest Conv; the arithmetic and the exact
conditions are in :mod:`normdeploy.passes.merge_math`.

A branch is a Conv reading ``x`` (constant float weight and bias), a BatchNormalization reading
``x`` (constant statistics, an identity branch ``x·s + t``) or ``x`` itself. It merges when its
geometry aligns with the base Conv's (same group, stride, dilation; taps inside the base kernel;
same output size; ``auto_pad=SAME_*`` only at stride 1, where its pads are known), when an
identity has as many input as output channels, when its output has the sum as sole reader and is
not a graph output, and when the merged values fit the weight's dtype. Everything else is kept as
an operand of the sum, and the ledger says why: one entry per identity BatchNormalization the
pass merged or refused, and one per sum (op ``Add``/``Sum``) that had a group to merge.
Weights shared with other nodes are never rewritten in place; control-flow subgraphs and
functions are left as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from normdeploy.onnx_graph import (
    GraphIndex,
    NotLoadedError,
    attr,
    attr_str,
    in_default_domain,
    node_label,
)
from normdeploy.passes import (
    FOLDED,
    KEPT,
    MERGED,
    GraphPass,
    LedgerEntry,
    PassContractError,
    PassResult,
    Sequential,
)
from normdeploy.passes.fold_bn import (
    FoldBatchNorm,
    _Invalid,
    _Skip,
    _weights,
    batch_norm_affine,
    is_batch_norm,
    validate_for_folding,
)
from normdeploy.passes.fold_math import fit_reason
from normdeploy.passes.merge_math import (
    ConvGeometry,
    ConvTerm,
    IdentityTerm,
    alignment_reason,
    merge_branches,
    tap_offsets,
)
from normdeploy.passes.surgery import GraphEditor, NameAllocator

_SUMS = ("Add", "Sum")


def _is_sum(node: onnx.NodeProto) -> bool:
    # Add before opset 7 broadcast through attributes; those are left alone.
    return node.op_type in _SUMS and in_default_domain(node) and not node.attribute


@dataclass
class _Branch:
    """One summed operand: the value, the node of the sum that reads it, what it computes."""

    value: str
    reader: onnx.NodeProto
    source: str  # the tensor the branch reads (the value itself for a bare tensor)
    node: onnx.NodeProto | None = None  # the Conv or BatchNormalization, None for a bare x
    # filled by the checks
    geometry: ConvGeometry | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    dtype: np.dtype | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    why: str = ""  # why it does not merge
    invalid: bool = False

    @property
    def kind(self) -> str:
        if self.node is None:
            return "x"
        return "conv" if self.node.op_type == "Conv" else "bn"

    def describe(self) -> str:
        if self.node is None:
            return f"identity '{self.value}'"
        if self.kind == "bn":
            return f"identity BatchNormalization '{node_label(self.node)}'"
        return f"Conv '{node_label(self.node)}'"


@dataclass
class _Tree:
    """A sum and the Add/Sum nodes under it whose results only it reads."""

    root: onnx.NodeProto
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    leaves: list[tuple[str, onnx.NodeProto]] = field(default_factory=list)  # (value, reader)


def _sum_tree(index: GraphIndex, root: onnx.NodeProto) -> _Tree:
    """The operands of ``root``'s sum, left to right, through intermediate sums (a loop, not
    recursion: a chain of thousands of Adds costs a loop)."""
    tree = _Tree(root)
    work: list[tuple[str, onnx.NodeProto] | onnx.NodeProto] = [root]
    while work:
        item = work.pop()
        if isinstance(item, tuple):
            value, reader = item
            producer = index.producer.get(value)
            if (
                producer is not None
                and _is_sum(producer)
                and index.sole_reader(value, reader) is None
            ):
                work.append(producer)
            else:
                tree.leaves.append(item)
            continue
        tree.nodes.append(item)
        work.extend((value, item) for value in reversed(item.input) if value)
    return tree


def _is_zero(index: GraphIndex, value: str, rank: int) -> bool:
    """A constant 0 operand that adds nothing: one element, no more axes than the sum's."""
    try:
        const = index.const_array(value)
    except NotLoadedError:
        return False
    return const is not None and const.size == 1 and const.ndim <= rank and not const.any()


def conv_geometry(node: onnx.NodeProto, weight_shape: Sequence[int]) -> ConvGeometry:
    """A Conv node's geometry from its attributes; raises the reason when it is not known
    without the input's size (``auto_pad=SAME_*`` with a stride) or the attributes disagree."""
    n = len(weight_shape) - 2
    kernel = tuple(int(k) for k in weight_shape[2:])
    declared = attr(node, "kernel_shape")
    if declared is not None and tuple(declared) != kernel:
        raise _Skip(f"kernel_shape {list(declared)} differs from the weight's {list(kernel)}")
    strides = tuple(attr(node, "strides", [1] * n))
    dilations = tuple(attr(node, "dilations", [1] * n))
    group = int(attr(node, "group", 1))
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if len(strides) != n or len(dilations) != n:
        raise _Skip("strides/dilations do not match the kernel's rank")
    if auto_pad in ("NOTSET", ""):
        pads = tuple(attr(node, "pads", [0] * 2 * n))
        if len(pads) != 2 * n:
            raise _Skip("pads do not match the kernel's rank")
        begin, end = pads[:n], pads[n:]
    elif auto_pad == "VALID":
        begin = end = (0,) * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            raise _Skip(
                f"auto_pad={auto_pad} with a stride: its pads depend on the input size"
            )
        total = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
        small = tuple(t // 2 for t in total)
        large = tuple(t - t // 2 for t in total)
        # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning
        begin, end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    else:
        raise _Skip(f"auto_pad={auto_pad} is not understood")
    return ConvGeometry(kernel, strides, dilations, tuple(begin), tuple(end), group)


def _check_conv(index: GraphIndex, branch: _Branch) -> None:
    """Constant weights, a geometry known without the input size; raises the reason."""
    node = branch.node
    assert node is not None
    if len(node.output) != 1 or node.output[0] != branch.value:
        raise _Skip("the sum reads a secondary output")
    w, b, dtype = _weights(index, node, "branch")
    if w.ndim < 3:
        raise _Skip(f"weight of rank {w.ndim} is not a convolution kernel")
    branch.geometry = conv_geometry(node, w.shape)
    group = branch.geometry.group
    if group < 1 or w.shape[0] % group:
        raise _Skip(f"{w.shape[0]} output channels do not split into group={group}")
    if b is not None and np.asarray(b).size != w.shape[0]:
        raise _Skip(f"bias has {np.asarray(b).size} values for {w.shape[0]} output channels")
    branch.weight, branch.bias, branch.dtype = w, b, dtype


def _check_branch(index: GraphIndex, branch: _Branch) -> None:
    """The checks every branch passes on its own; raises the reason it cannot merge."""
    if branch.node is not None:
        if (why := index.sole_reader(branch.value, branch.reader)) is not None:
            raise _Skip(why)
        if branch.kind == "conv":
            _check_conv(index, branch)
        else:
            branch.scale, branch.shift = batch_norm_affine(index, branch.node)


def _classify(index: GraphIndex, value: str, reader: onnx.NodeProto) -> _Branch | None:
    """The branch a summed operand is, or None for a constant."""
    node = index.producer.get(value)
    if node is None:
        return None if index.is_constant_initializer(value) else _Branch(value, reader, value)
    if not in_default_domain(node):
        return _Branch(value, reader, value)
    if node.op_type == "Constant":
        return None
    if node.op_type == "Conv" and node.input:
        return _Branch(value, reader, node.input[0], node)
    if is_batch_norm(node) and node.input:
        return _Branch(value, reader, node.input[0], node)
    return _Branch(value, reader, value)


@dataclass
class _Merge:
    """One group's outcome: the base Conv, the branches merged into it, those kept and why."""

    base: _Branch | None
    merged: list[_Branch]
    kept: list[_Branch]
    values: tuple[np.ndarray, np.ndarray] | None = None


def _plan_group(branches: list[_Branch]) -> _Merge:
    """Choose the base (the largest valid kernel) and align every other branch to it."""
    convs = [b for b in branches if b.kind == "conv" and not b.why]
    if not convs:
        refused = "; ".join(f"{b.describe()}: {b.why}" for b in branches if b.kind == "conv")
        for b in branches:
            b.why = b.why or f"no Conv branch on the same input merges ({refused})"
        return _Merge(None, [], branches)
    base = max(convs, key=lambda b: int(np.prod(b.geometry.kernel)) if b.geometry else 0)
    assert base.geometry is not None and base.weight is not None
    c_out = base.weight.shape[0]
    c_in = base.weight.shape[1] * base.geometry.group
    merged, kept = [base], []
    for b in branches:
        if b is base or b.why:
            if b is not base:
                kept.append(b)
            continue
        b.why = _fit_reason(base, b, c_in, c_out) or ""
        (kept if b.why else merged).append(b)
    return _Merge(base, merged, kept)


def _fit_reason(base: _Branch, b: _Branch, c_in: int, c_out: int) -> str | None:
    """Why branch ``b`` does not merge into ``base`` (both passed their own checks)."""
    assert base.geometry is not None and base.dtype is not None
    if b.kind == "conv":
        assert b.geometry is not None and b.weight is not None
        if b.dtype != base.dtype:
            return f"weight dtype {b.dtype} differs from the base's {base.dtype}"
        if b.weight.shape[0] != c_out or b.weight.shape[1] * b.geometry.group != c_in:
            return (
                f"{b.weight.shape[1] * b.geometry.group}→{b.weight.shape[0]} channels, the "
                f"base has {c_in}→{c_out}"
            )
        return alignment_reason(base.geometry, b.geometry)
    if c_in != c_out:
        return f"an identity needs as many input as output channels ({c_in}→{c_out})"
    if b.scale is not None and len(b.scale) != c_out:
        return f"{len(b.scale)} channels, the base Conv has {c_out}"
    if any(s != 1 for s in base.geometry.strides):
        return "the base Conv has a stride; an identity branch has none"
    return alignment_reason(base.geometry, ConvGeometry.identity(base.geometry))


def _merged_values(plan: _Merge) -> tuple[np.ndarray, np.ndarray]:
    base = plan.base
    assert base is not None and base.geometry is not None and base.weight is not None
    convs, identities = [], []
    for b in plan.merged:
        if b.kind == "conv":
            assert b.geometry is not None and b.weight is not None
            convs.append(ConvTerm(b.weight, b.bias, tap_offsets(base.geometry, b.geometry)))
        else:
            c = base.weight.shape[0]
            scale = np.ones(c) if b.scale is None else b.scale
            shift = np.zeros(c) if b.shift is None else b.shift
            offsets = tap_offsets(base.geometry, ConvGeometry.identity(base.geometry))
            identities.append(IdentityTerm(scale, shift, offsets))
    return merge_branches(base.weight.shape, base.geometry.group, convs, identities)


class MergeParallelBranches(GraphPass):
    """Merge every group of summed linear branches on the same input into one Conv, in place."""

    name = "merge-branches"
    in_place = True
    # Its per-node entries are the identity BatchNormalizations it merged or refused; sums have
    # their own entries (op Add/Sum).
    subject = "BatchNormalization"
    stage = "merge"

    def requires(self, model: onnx.ModelProto, source: str) -> None:
        validate_for_folding(model, source)

    def call(self, model: onnx.ModelProto) -> PassResult:
        names = NameAllocator(model, "_merged")
        ledger = self._merge_graph(model.graph, names, "main")
        return PassResult(model, any(e.applied for e in ledger), tuple(ledger))

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        super().ensures(model, result)
        left = {node_label(n) for n in model.graph.node if is_batch_norm(n)}
        for e in result.ledger:
            if e.action == MERGED and not e.op and e.node in left:
                raise PassContractError(f"{self.name}: '{e.node}' merged but still present")

    def _merge_graph(
        self, graph: onnx.GraphProto, names: NameAllocator, graph_name: str
    ) -> list[LedgerEntry]:
        index = GraphIndex.of(graph)
        editor = GraphEditor(graph, index, names)
        per_tree: list[list[LedgerEntry]] = []
        absorbed: set[int] = set()
        # from the last node up: a chain's outermost sum comes first and takes in the rest
        for root in [n for n in reversed(graph.node) if _is_sum(n)]:
            if id(root) in absorbed:
                continue
            tree = _sum_tree(index, root)
            absorbed.update(id(n) for n in tree.nodes)
            per_tree.append(self._merge_tree(editor, tree, graph_name))
        editor.finish()
        return [e for entries in reversed(per_tree) for e in entries]  # in graph order

    def _merge_tree(
        self, editor: GraphEditor, tree: _Tree, graph_name: str
    ) -> list[LedgerEntry]:
        index = editor.index
        branches = [_classify(index, value, reader) for value, reader in tree.leaves]
        groups: dict[str, list[_Branch]] = {}
        for b in branches:
            if b is not None:
                groups.setdefault(b.source, []).append(b)
        candidates = [
            g for g in groups.values() if len(g) > 1 and any(b.kind == "conv" for b in g)
        ]
        if not candidates:
            return []
        label, op = node_label(tree.root), tree.root.op_type  # before the edit
        plans = []
        for group in candidates:
            for b in group:
                try:
                    _check_branch(index, b)
                except NotLoadedError as exc:  # noqa: PERF203
                    b.why = str(exc)
                except _Skip as skip:
                    b.why, b.invalid = str(skip), isinstance(skip, _Invalid)
            plan = _plan_group(group)
            if len(plan.merged) > 1:
                w, bias = _merged_values(plan)
                assert plan.base is not None and plan.base.dtype is not None
                if (why := fit_reason([w, bias], bias, plan.base.dtype)) is not None:
                    for b in plan.merged:
                        b.why = f"merged values do not fit: {why}"
                    plan = _Merge(plan.base, [], [*plan.merged, *plan.kept])
                else:
                    plan.values = (w, bias)
            plans.append(plan)
        # Non-linear operands that read a grouped tensor: say why they stay.
        grouped = {b.source for group in candidates for b in group}
        others = [
            b
            for b in branches
            if b is not None
            and b.source not in grouped
            and (node := index.producer.get(b.value)) is not None
            and any(i in grouped for i in node.input)
        ]
        merged_plans = [p for p in plans if p.values is not None]
        zeros: set[str] = set()
        if merged_plans:
            base = merged_plans[0].base
            assert base is not None and base.weight is not None
            zeros = {
                value
                for (value, _), b in zip(tree.leaves, branches, strict=True)
                if b is None and _is_zero(index, value, base.weight.ndim)
            }
            self._apply(editor, tree, merged_plans, branches, zeros)
        # after the edit: an unnamed base is labelled by its output, which may have changed
        targets = [node_label(p.base.node) for p in merged_plans if p.base and p.base.node]
        ledger = self._bn_entries(plans, graph_name, label, op)
        ledger.append(
            LedgerEntry(
                label,
                graph_name,
                MERGED if merged_plans else KEPT,
                target=", ".join(targets),
                target_op="Conv" if merged_plans else "",
                reason=self._tree_detail(merged_plans, plans, others, index)
                + (f"; dropped {len(zeros)} constant 0 operand(s)" if zeros else ""),
                op=op,
            )
        )
        return ledger

    @staticmethod
    def _bn_entries(
        plans: list[_Merge], graph_name: str, label: str, op: str
    ) -> list[LedgerEntry]:
        entries = []
        for plan in plans:
            for b in plan.merged:
                if b.kind == "bn" and b.node is not None:
                    assert plan.base is not None and plan.base.node is not None
                    target = node_label(plan.base.node)
                    entries.append(
                        LedgerEntry(
                            node_label(b.node),
                            graph_name,
                            MERGED,
                            target=target,
                            target_op="Conv",
                            reason=f"identity BN merged into Conv '{target}' with "
                            f"{len(plan.merged)} branches",
                        )
                    )
            entries += [
                LedgerEntry(
                    node_label(b.node),
                    graph_name,
                    KEPT,
                    reason=f"identity branch of {op} '{label}' not merged: {b.why}",
                    invalid=b.invalid,
                )
                for b in plan.kept
                if b.kind == "bn" and b.node is not None
            ]
        return entries

    @staticmethod
    def _tree_detail(
        merged: list[_Merge], plans: list[_Merge], others: list[_Branch], index: GraphIndex
    ) -> str:
        parts = []
        for plan in merged:
            assert plan.base is not None
            rest = [b.describe() for b in plan.merged if b is not plan.base]
            parts.append(
                f"{len(plan.merged)} branches into {plan.base.describe()}: " + ", ".join(rest)
            )
        kept = [b for plan in plans for b in plan.kept]
        parts += [f"kept {b.describe()}: {b.why}" for b in kept]
        for b in others:
            node = index.producer.get(b.value)
            assert node is not None
            parts.append(f"kept {node.op_type} '{node_label(node)}': not a linear branch")
        return "; ".join(parts)

    @staticmethod
    def _apply(
        editor: GraphEditor,
        tree: _Tree,
        plans: list[_Merge],
        branches: list[_Branch | None],
        zeros: set[str],
    ) -> None:
        """Write each group's merged weights into its base, drop the merged branches, and make
        the root sum the remaining operands (or the base produce the root's output)."""
        gone: set[int] = set()
        for plan in plans:
            base = plan.base
            assert base is not None and base.node is not None and plan.values is not None
            assert base.dtype is not None
            w, b = plan.values
            editor.set_input_constant(base.node, 1, w.astype(base.dtype), "W")
            editor.set_input_constant(base.node, 2, b.astype(base.dtype), "B")
            for branch in plan.merged:
                if branch is base:
                    continue
                gone.add(id(branch))
                if branch.node is not None:
                    editor.remove_node(branch.node)
        operands = [
            value
            for (value, _), branch in zip(tree.leaves, branches, strict=True)
            if (branch is None and value not in zeros)
            or (branch is not None and id(branch) not in gone)
        ]
        root = tree.root
        for node in tree.nodes:
            if node is not root:
                editor.remove_node(node)
        if len(operands) == 1:
            (only,) = plans
            assert only.base is not None and only.base.node is not None
            out = root.output[0]
            editor.remove_node(root)
            editor.rename_output(only.base.node, 0, out)
            return
        editor.index.detach(root)
        editor.candidates.extend(v for v in root.input if v)
        del root.input[:]
        root.input.extend(operands)
        # Sum (opset 8+) broadcasts like Add; fold-bn requires opset 9.
        root.op_type = "Add" if len(operands) == 2 else "Sum"
        editor.index.attach(root)


class FoldBatchNormAndMerge(Sequential):
    """fold-bn with branch merging: fold every BatchNorm that folds, then merge the summed
    branches that the folds left (the identity BatchNorms no fold can remove)."""

    name = "fold-bn"
    subject = "BatchNormalization"
    stage = "fold"

    def __init__(self) -> None:
        super().__init__(FoldBatchNorm(), MergeParallelBranches())

    def requires(self, model: onnx.ModelProto, source: str) -> None:
        # both passes require the same (validate_for_folding): run onnx.checker once
        validate_for_folding(model, source)

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        super().ensures(model, result)
        left = sum(1 for n in model.graph.node if is_batch_norm(n))
        kept = sum(
            1 for e in result.ledger if e.graph == "main" and e.action == KEPT and not e.op
        )
        if left != kept:
            raise PassContractError(
                f"{self.name}: {left} BatchNormalization left in the graph, ledger keeps {kept}"
            )
        assert all(e.action in (FOLDED, MERGED, KEPT) for e in result.ledger)
