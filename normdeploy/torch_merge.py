"""Merge summed parallel conv branches of a module into one conv, with torch.fx (RepVGG-style).

The module-level side of :mod:`normdeploy.passes.merge_branches`: after
:mod:`normdeploy.torch_fold` folded each branch's BatchNorm into its conv, a forward that sums
``conv_a(x) + conv_b(x) + bn(x)`` (or ``+ x``), through any chain of ``+``, computes one
convolution. The arithmetic and its exact conditions are :mod:`normdeploy.passes.merge_math`'s.

The module whose forward does the sum (found from the fx trace's module stack) is traced on its
own, the sum and the merged branches are replaced by a call of the largest conv with the merged
weights, and that module becomes a :class:`torch.fx.GraphModule` of the new graph, at the same
path. Its other submodules, parameters, buffers and plain attributes stay attached (the merged
branches included, unchanged and no longer called), so code elsewhere that reads them keeps
working. Every sum with branches to merge gets a ledger entry: merged into which conv, or why not.
A branch merges only when the fold could prove the same about it: exact module types, zero
padding mode, used once through its own forward (not shared, no hooks, parameters not read
directly), and for an identity BatchNorm running statistics and a provable channel axis.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normdeploy.passes.fold_math import bn_scale_shift, fit_reason
from normdeploy.passes.merge_math import (
    ConvGeometry,
    ConvTerm,
    IdentityTerm,
    alignment_reason,
    merge_branches,
    tap_offsets,
)
from normdeploy.torch_fold import _BATCH_NORMS, _FIXED_RANK, _trace_tree, _Usage

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_ADDS = (operator.add, torch.add)


@dataclass(frozen=True)
class BranchMergeEntry:
    """One sum of parallel branches: merged into ``merged_into``, or kept because of ``reason``."""

    block: str  # the module whose forward computes the sum ("" for the root)
    node: str  # the fx node of the sum
    merged_into: str | None = None
    branches: tuple[str, ...] = ()  # the branches merged into it (module paths, or the input)
    reason: str = ""

    @property
    def merged(self) -> bool:
        return self.merged_into is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "node": self.node,
            "merged": self.merged,
            "merged_into": self.merged_into,
            "branches": list(self.branches),
            "reason": self.reason,
        }


@dataclass
class MergeOutcome:
    """What merging did: the (possibly new) root, one entry per sum, and per identity
    BatchNorm (by module id) the conv it merged into or why it did not."""

    root: nn.Module
    entries: list[BranchMergeEntry] = field(default_factory=list)
    bn_merged: dict[int, tuple[str, str]] = field(default_factory=dict)  # id → (conv, note)
    bn_kept: dict[int, str] = field(default_factory=dict)  # id → reason


class _Refused(Exception):
    """A branch that does not merge; the message is the ledger's reason."""


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target == "add"


@dataclass
class _Tree:
    root: fx.Node
    nodes: list[fx.Node]
    leaves: list[Any]  # fx.Node or a Python number


def _identity_call(owner: nn.Module, node: Any) -> bool:
    """A call of an ``nn.Identity`` (a BatchNorm the fold replaced, timm's drop_path/attn at
    inference) on one tensor, without hooks: looking through it changes nothing."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    module = owner.get_submodule(str(node.target))
    return (
        type(module) is nn.Identity
        and not (module._forward_hooks or module._forward_pre_hooks)
        and len(node.args) == 1
        and not node.kwargs
        and isinstance(node.args[0], fx.Node)
    )


def _add_tree(owner: nn.Module, root: fx.Node) -> _Tree:
    """The operands of a chain of additions whose intermediate sums only the chain reads
    (also through Identity calls between them)."""
    tree = _Tree(root, [], [])
    work: list[tuple[Any, bool]] = [(root, True)]
    while work:
        item, inner = work.pop()
        if not inner:
            tree.leaves.append(item)
            continue
        tree.nodes.append(item)
        for arg in reversed(item.args):
            node, through = arg, []
            while _identity_call(owner, node) and len(node.users) == 1:
                through.append(node)
                node = node.args[0]
            if isinstance(node, fx.Node) and _is_add(node) and len(node.users) == 1:
                tree.nodes += through
                work.append((node, True))
            else:
                work.append((arg, False))
    return tree


@dataclass
class _Branch:
    """One operand of the sum: the conv or BatchNorm it calls (with its module path) or the
    tensor itself, and the fx nodes that go when it merges."""

    value: Any
    source: Any  # the fx node the branch reads
    kind: str  # "conv" | "bn" | "x" | "other"
    path: str = ""
    module: nn.Module | None = None
    nodes: tuple[fx.Node, ...] = ()  # the call (and a folded BatchNorm's Identity after it)
    geometry: ConvGeometry | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    rank: int | None = None  # a BatchNorm's input rank, when known
    why: str = ""

    def describe(self) -> str:
        if self.kind == "x":
            return f"identity '{self.value}'"
        return f"{type(self.module).__name__} '{self.path}'"


def _classify(owner: nn.Module, prefix: str, value: Any) -> _Branch:
    """What a summed operand is; Python numbers are ``other`` (zeros are dropped on merge)."""
    if not isinstance(value, fx.Node):
        return _Branch(value, None, "other")
    node, stubs = value, []
    # a BatchNorm the fold replaced by nn.Identity: look through it to its conv
    while _identity_call(owner, node):
        stubs.append(node)
        node = cast(fx.Node, node.args[0])
    if node.op == "call_module":
        module = owner.get_submodule(str(node.target))
        kind = (
            "conv" if type(module) in _CONVS else "bn" if type(module) in _BATCH_NORMS else ""
        )
        if kind and len(node.args) == 1 and not node.kwargs:
            source = node.args[0]
            return _Branch(
                value, source, kind, prefix + str(node.target), module, (*stubs, node)
            )
    if stubs:
        return _Branch(value, value, "other")
    return _Branch(value, value, "x")


def _f64(t: torch.Tensor | None, n: int, default: float) -> np.ndarray:
    if t is None:
        return np.full(n, default, np.float64)
    return t.detach().to("cpu", torch.float64).reshape(-1).numpy()


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(str(dtype).removeprefix("torch."))


def _conv_geometry(conv: nn.modules.conv._ConvNd) -> ConvGeometry:
    n = len(conv.kernel_size)
    kernel = tuple(int(k) for k in conv.kernel_size)
    dilations = tuple(int(d) for d in conv.dilation)
    if conv.padding == "same":
        # torch pads total = d·(k−1), the odd pixel at the end
        total = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
        begin = tuple(t // 2 for t in total)
        end = tuple(t - t // 2 for t in total)
    elif conv.padding == "valid":
        begin = end = (0,) * n
    else:
        begin = end = tuple(int(p) for p in cast(tuple[int, ...], conv.padding))
    strides = tuple(int(s) for s in conv.stride)
    return ConvGeometry(kernel, strides, dilations, begin, end, int(conv.groups))


def _check(b: _Branch, usage: _Usage, ranks: dict[int, set[int]]) -> None:
    """The checks a branch passes on its own; raises the reason it cannot merge."""
    if b.kind == "x":
        return
    assert b.module is not None
    if any(len(n.users) != 1 for n in b.nodes):
        raise _Refused("its output has other users")
    if (why := usage.sharing_reason(b.module, f"this {type(b.module).__name__}")) is not None:
        raise _Refused(why)
    if b.kind == "conv":
        conv = cast(nn.modules.conv._ConvNd, b.module)
        if conv.padding_mode != "zeros":
            raise _Refused(f"padding_mode='{conv.padding_mode}' does not pad with zeros")
        if not conv.weight.is_floating_point():
            raise _Refused("weight is not a float tensor")
        b.geometry = _conv_geometry(conv)
        b.weight = conv.weight.detach().to("cpu", torch.float64).numpy()
        b.bias = None if conv.bias is None else _f64(conv.bias, conv.out_channels, 0.0)
        return
    bn = cast(_BatchNorm, b.module)
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise _Refused("no running statistics (track_running_stats=False)")
    c = bn.num_features
    mean, var = _f64(bn.running_mean, c, 0.0), _f64(bn.running_var, c, 0.0)
    gamma, beta = _f64(bn.weight, c, 1.0), _f64(bn.bias, c, 0.0)
    if not all(np.isfinite(a).all() for a in (mean, var, gamma, beta)):
        raise _Refused("non-finite running statistics or affine parameters")
    if not (var + bn.eps > 0).all():
        raise _Refused("running_var + eps is not positive")
    b.scale, b.shift = bn_scale_shift(gamma, beta, mean, var, bn.eps)
    b.rank = _FIXED_RANK.get(type(bn))
    seen = ranks.get(id(bn))
    if b.rank is None and seen and len(seen) == 1:
        b.rank = next(iter(seen))


def _fit(base: _Branch, b: _Branch) -> str | None:
    """Why branch ``b`` does not merge into ``base`` (both passed their own checks)."""
    base_conv = cast(nn.modules.conv._ConvNd, base.module)
    assert base.geometry is not None
    c_out, c_in = base_conv.out_channels, base_conv.in_channels
    if b.kind == "conv":
        conv = cast(nn.modules.conv._ConvNd, b.module)
        assert b.geometry is not None
        if type(conv) is not type(base_conv):
            return f"a {type(conv).__name__}, the base is a {type(base_conv).__name__}"
        if conv.weight.dtype != base_conv.weight.dtype:
            return f"weight dtype {conv.weight.dtype}, the base's is {base_conv.weight.dtype}"
        if (conv.in_channels, conv.out_channels) != (c_in, c_out):
            return (
                f"{conv.in_channels}→{conv.out_channels} channels, the base has {c_in}→{c_out}"
            )
        return alignment_reason(base.geometry, b.geometry)
    if c_in != c_out:
        return f"an identity needs as many input as output channels ({c_in}→{c_out})"
    if b.kind == "bn":
        bn = cast(_BatchNorm, b.module)
        if bn.num_features != c_out:
            return f"{bn.num_features} features, the base conv has {c_out} channels"
        rank = b.rank
        if rank != len(base.geometry.kernel) + 2:
            return (
                f"cannot prove {type(bn).__name__}'s axis 1 is the conv's channel axis "
                "(its input rank is unknown; pass example_inputs)"
                if rank is None
                else f"{type(bn).__name__} input has rank {rank}: axis 1 is not the channel axis"
            )
    if any(s != 1 for s in base.geometry.strides):
        return "the base conv has a stride; an identity branch has none"
    return alignment_reason(base.geometry, ConvGeometry.identity(base.geometry))


@dataclass
class _Plan:
    base: _Branch
    merged: list[_Branch]
    kept: list[_Branch]
    values: tuple[np.ndarray, np.ndarray] | None = None


def _plan(group: list[_Branch], usage: _Usage, ranks: dict[int, set[int]]) -> _Plan | None:
    """Check each branch, choose the base (the largest valid kernel), align the others."""
    for b in group:
        try:
            _check(b, usage, ranks)
        except _Refused as refused:  # noqa: PERF203
            b.why = str(refused)
    convs = [b for b in group if b.kind == "conv" and not b.why]
    if not convs:
        for b in group:
            b.why = b.why or "no conv branch on the same input to merge into"
        return None
    base = max(convs, key=lambda b: int(np.prod(b.geometry.kernel)) if b.geometry else 0)
    plan = _Plan(base, [base], [])
    for b in group:
        if b is base:
            continue
        b.why = b.why or _fit(base, b) or ""
        (plan.kept if b.why else plan.merged).append(b)
    if len(plan.merged) < 2:
        return plan
    conv = cast(nn.modules.conv._ConvNd, base.module)
    assert base.geometry is not None
    terms, identities = [], []
    for b in plan.merged:
        if b.kind == "conv":
            assert b.geometry is not None and b.weight is not None
            terms.append(ConvTerm(b.weight, b.bias, tap_offsets(base.geometry, b.geometry)))
        else:
            c = conv.out_channels
            scale = np.ones(c) if b.scale is None else b.scale
            shift = np.zeros(c) if b.shift is None else b.shift
            offsets = tap_offsets(base.geometry, ConvGeometry.identity(base.geometry))
            identities.append(IdentityTerm(scale, shift, offsets))
    w, bias = merge_branches(tuple(conv.weight.shape), conv.groups, terms, identities)
    if (why := fit_reason([w, bias], bias, _np_dtype(conv.weight.dtype))) is not None:
        for b in plan.merged:
            b.why = f"merged values do not fit: {why}"
        return _Plan(base, [], [*plan.merged, *plan.kept])
    plan.values = (w, bias)
    return plan


def _innermost(node: fx.Node) -> str | None:
    """The module (relative path) whose forward created ``node``; "" for the traced root."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _groups(
    owner: nn.Module, prefix: str, tree: _Tree
) -> tuple[list[_Branch], dict[Any, list[_Branch]]]:
    """Every operand as a branch, and the groups worth merging: two or more branches that read
    the same tensor, one of them a conv."""
    branches = [_classify(owner, prefix, leaf) for leaf in tree.leaves]
    by_source: dict[Any, list[_Branch]] = {}
    for b in branches:
        if b.kind != "other":
            by_source.setdefault(b.source, []).append(b)
    groups = {
        src: g
        for src, g in by_source.items()
        if len(g) > 1 and any(b.kind == "conv" for b in g)
    }
    return branches, groups


def _trees(owner: nn.Module, graph: fx.Graph) -> list[_Tree]:
    """Every chain of additions in ``owner``'s traced ``graph``, outermost sum first."""
    trees, seen = [], set()
    for node in reversed(list(graph.nodes)):
        if node in seen or not _is_add(node):
            continue
        tree = _add_tree(owner, node)
        seen.update(tree.nodes)
        trees.append(tree)
    return trees


def _rewrite(
    graph: fx.Graph, tree: _Tree, plans: list[_Plan], branches: list[_Branch]
) -> None:
    """Replace the sum by the merged convs plus what stays; erase what merged."""
    gone = {id(b) for p in plans for b in p.merged if b is not p.base}
    # a merged Python 0 adds nothing; any other number stays an operand
    operands: list[Any] = []
    for b in branches:
        if id(b) in gone or (
            b.kind == "other"
            and not isinstance(b.value, fx.Node)
            and b.value == 0
            and not isinstance(b.value, bool)
        ):
            continue
        operands.append(b.value)
    base_values = {id(p.base.value): p.base for p in plans}
    with graph.inserting_before(tree.root):
        values = []
        for v in operands:
            base = base_values.get(id(v))
            # the base conv's own call replaces its Identity stubs
            values.append(base.nodes[-1] if base is not None else v)
        acc = values[0]
        for v in values[1:]:
            acc = graph.call_function(operator.add, (acc, v))
    tree.root.replace_all_uses_with(acc)
    dead = [*tree.nodes]
    for p in plans:
        dead += list(p.base.nodes[:-1])
        for b in p.merged:
            if b is not p.base:
                dead += list(b.nodes)
    for node in sorted(dead, key=_position(graph), reverse=True):
        graph.erase_node(node)


def _position(graph: fx.Graph) -> Any:
    order = {node: k for k, node in enumerate(graph.nodes)}
    return order.__getitem__


def _keep_attached(original: nn.Module, gm: fx.GraphModule) -> None:
    """Attach to ``gm`` every submodule, parameter, buffer and plain attribute of ``original``
    that its graph no longer uses, so code that reads them still finds them."""
    for path, module in original.named_modules():
        if not path:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = gm.get_submodule(parent_path)
        if name not in parent._modules:
            parent.add_module(name, module)
    for kind, items in (
        ("parameter", original.named_parameters()),
        ("buffer", original.named_buffers()),
    ):
        for path, tensor in items:
            owner_path, _, name = path.rpartition(".")
            holder = gm.get_submodule(owner_path)
            if name in holder._parameters or name in holder._buffers:
                continue
            if kind == "parameter":
                holder.register_parameter(name, cast(nn.Parameter, tensor))
            else:
                holder.register_buffer(name, tensor)
    for name, value in vars(original).items():
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            setattr(gm, name, value)


def merge_module_branches(root: nn.Module, ranks: dict[int, set[int]]) -> MergeOutcome:
    """Merge the summed parallel conv branches of ``root`` (modified in place; the returned
    root is a GraphModule when the root's own forward did a sum)."""
    graphs, untraceable = _trace_tree(root)
    usage = _Usage.collect(root, graphs)
    owners: dict[str, list[str]] = {}
    for prefix, graph in graphs:
        traced = root.get_submodule(prefix[:-1]) if prefix else root
        for tree in _trees(traced, graph):
            _, groups = _groups(traced, prefix, tree)
            inner = _innermost(tree.root)
            if groups and inner is not None:
                path = prefix + inner if inner else prefix[:-1]
                owners.setdefault(path, []).append(tree.root.name)
    outcome = MergeOutcome(root)
    note = (
        "; the untraceable forward around it is assumed to call it only as a whole"
        if "" in untraceable
        else ""
    )
    for path in sorted(owners, key=lambda p: p.count(".") + bool(p), reverse=True):
        _merge_owner(outcome, path, owners[path], usage, ranks, note)
    return outcome


def _merge_owner(
    outcome: MergeOutcome,
    path: str,
    sums: list[str],
    usage: _Usage,
    ranks: dict[int, set[int]],
    note: str,
) -> None:
    owner = outcome.root.get_submodule(path)
    label = path or "the module"
    refusal = None
    if len(usage.paths[id(owner)]) > 1:
        refusal = f"'{label}' is registered at {len(usage.paths[id(owner)])} paths"
    elif owner._forward_hooks or owner._forward_pre_hooks:
        refusal = f"'{label}' has forward hooks (a GraphModule would drop them)"
    if refusal is None:
        try:
            graph = fx.Tracer().trace(owner)
        except Exception as exc:  # any failure means "not provable here"
            refusal = (
                f"forward of '{label}' cannot be traced on its own ({type(exc).__name__})"
            )
    if refusal is not None:
        outcome.entries += [BranchMergeEntry(path, name, reason=refusal) for name in sums]
        return
    prefix = f"{path}." if path else ""
    changed = False
    for tree in _trees(owner, graph):
        if _innermost(tree.root) != "":
            continue  # a sum in a submodule's forward: that submodule's own turn
        branches, groups = _groups(owner, prefix, tree)
        if not groups:
            continue
        plans = [p for g in groups.values() if (p := _plan(g, usage, ranks)) is not None]
        merged = [p for p in plans if p.values is not None]
        for p in merged:
            assert p.values is not None
            conv = cast(nn.modules.conv._ConvNd, p.base.module)
            w, b = p.values
            grad = conv.weight.requires_grad
            device, dtype = conv.weight.device, conv.weight.dtype
            conv.weight = nn.Parameter(
                torch.from_numpy(w).to(device, dtype), requires_grad=grad
            )
            conv.bias = nn.Parameter(torch.from_numpy(b).to(device, dtype), requires_grad=grad)
        if merged:
            _rewrite(graph, tree, merged, branches)
            changed = True
        _record(outcome, path, tree.root.name, plans, groups, branches, note)
    if changed:
        graph.lint()
        gm = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
        _keep_attached(owner, gm)
        gm.train(owner.training)
        if path:
            parent_path, _, name = path.rpartition(".")
            setattr(outcome.root.get_submodule(parent_path), name, gm)
        else:
            outcome.root = gm


def _record(
    outcome: MergeOutcome,
    path: str,
    node: str,
    plans: list[_Plan],
    groups: dict[Any, list[_Branch]],
    branches: list[_Branch],
    note: str,
) -> None:
    parts = []
    merged = [p for p in plans if p.values is not None]
    for p in merged:
        rest = [b.describe() for b in p.merged if b is not p.base]
        parts.append(f"{len(p.merged)} branches into {p.base.describe()}: {', '.join(rest)}")
        for b in p.merged:
            if b.kind == "bn":
                outcome.bn_merged[id(b.module)] = (
                    p.base.path,
                    f"identity BN merged into {p.base.describe()} with {len(p.merged)} "
                    f"branches{note}",
                )
    kept = [b for g in groups.values() for b in g if b.why]
    parts += [f"kept {b.describe()}: {b.why}" for b in kept]
    for b in kept:
        if b.kind == "bn":
            outcome.bn_kept[id(b.module)] = (
                f"identity branch of '{path or 'the root module'}' not merged: {b.why}"
            )
    sources = set(groups)
    parts += [
        f"kept '{b.value}': not a linear branch"
        for b in branches
        if isinstance(b.value, fx.Node)
        and b.source not in sources
        and any(a in sources for a in b.value.all_input_nodes)
    ]
    outcome.entries.append(
        BranchMergeEntry(
            path,
            node,
            merged[0].base.path if merged else None,
            tuple(b.path or str(b.value) for p in merged for b in p.merged),
            "; ".join(parts) + (note if merged else ""),
        )
    )
