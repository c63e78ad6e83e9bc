"""Fold eval-mode BatchNorm into the Conv/ConvTranspose/Linear module next to it, with torch.fx.

A BatchNorm that reads only the output of a producer (weight W, bias b, 0 when absent) folds into
it as ``W' = W·s`` along the producer's output channels and ``b' = b·s + t``, with
``(s, t)`` from the running statistics and affine parameters (1 and 0 when ``affine=False``).
A BatchNorm whose output only an unpadded Conv or a Linear reads (along its input features)
folds into that *following* module instead: its weight scales along the input channels and its
bias gains ``Σ W·t`` (a padded Conv would see zeros at its borders, not the shift ``t``). Both
directions also fold through ``transpose/permute/reshape/view/flatten/squeeze/unsqueeze`` calls
(and nn.Flatten/nn.Unflatten) when the shapes the example inputs produce prove that the
BatchNorm's channel axis is exactly the neighbour's feature axis
(:mod:`normdeploy.passes.axis_map`). The formula and the weight layouts (Linear as Conv's axis 0,
ConvTranspose's axis 1 within each group) are :mod:`normdeploy.passes.fold_math`'s, shared with
the ONNX pass; the arithmetic runs in float64 and is cast once to the parameter dtype.

The pass works on a deep copy (the caller's module, its mode and its statistics are left alone):
torch.fx traces the copy to find producer → BatchNorm pairs anywhere in the forward code, each pair is
checked for the conditions under which folding is exact (see :func:`_check_pair`), the producer's
parameters are replaced and the BatchNorm becomes ``nn.Identity``. The copy keeps its own class and
forward. When the forward cannot be traced, traceable submodules are folded on their own and the
rest is left as it was. Every BatchNorm gets a ledger entry: folded into which module, or why not.

Then (``merge=True``, the default) summed parallel conv branches on the same input — RepVGG's
``conv3x3(x) + conv1x1(x) + bn(x)`` — are merged into one conv by :mod:`normdeploy.torch_merge`;
the module whose forward does the sum becomes a ``torch.fx.GraphModule`` (the root itself when
the sum is in the root's forward), and its identity BatchNorms are ledgered as merged.

Only a BatchNorm whose every use is the plain call folds: the forward code (traced, or run on the
example inputs) is watched for any other read of the BatchNorm (``self.bn.running_mean``,
``self.bn.eps``, ``isinstance(self.bn, …)``) or of the module it folds into's weight and bias,
since the folded copy has neither; such a BatchNorm is kept with the reason. With example inputs
the folded (and merged) copy is finally run against the unfolded eval copy, and a copy that fails
or differs is never returned: every fold and merge is undone and the ledger says why.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from normdeploy.errors import InvalidArgumentError, first_line, user_code
from normdeploy.passes.axis_map import ShapeStep, trace_back, trace_forward
from normdeploy.passes.fold_math import (
    bn_scale_shift,
    fold_into_producer,
    output_channels,
    scale_conv_input_channels,
    scale_gemm_input_features,
)
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.verification.compare import Tolerance, compare_arrays
from normdeploy.verification.runners import flatten_outputs, to_numpy

if TYPE_CHECKING:
    from normdeploy.torch_merge import BranchMergeEntry

logger = logging.getLogger(__name__)

__all__ = [
    "BnFoldEntry",
    "ModuleFoldResult",
    "fold_bn_into_following_weights",
    "fold_bn_into_weights",
    "fold_bn_module",
    "fold_bn_module_with_ledger",
]


@dataclass(frozen=True)
class _ProducerLayout:
    """Where a producer's output channels sit in its output and in its weight."""

    spatial_dims: int  # output rank is spatial_dims + 2 (batched conv) or 2 (Linear)
    transposed: (
        bool  # weight is (C_in, C_out/groups, k...) instead of (C_out, C_in/groups, k...)
    )


# Exact types only: a subclass may transform its weight in forward (weight standardization,
# parametrizations), which would make folding into the stored weight wrong.
_PRODUCERS: dict[type[nn.Module], _ProducerLayout] = {
    nn.Linear: _ProducerLayout(0, transposed=False),
    nn.Conv1d: _ProducerLayout(1, transposed=False),
    nn.Conv2d: _ProducerLayout(2, transposed=False),
    nn.Conv3d: _ProducerLayout(3, transposed=False),
    nn.ConvTranspose1d: _ProducerLayout(1, transposed=True),
    nn.ConvTranspose2d: _ProducerLayout(2, transposed=True),
    nn.ConvTranspose3d: _ProducerLayout(3, transposed=True),
}
_Producer = nn.Linear | nn.modules.conv._ConvNd
# Modules a BatchNorm before them folds into: scaling input channels needs zero padding and no
# transposed layout.
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Calls that only regroup or reorder a tensor's elements (shape-only).
_SHAPE_METHODS = frozenset(
    ("transpose", "permute", "reshape", "view", "flatten", "squeeze", "unsqueeze",
     "reshape_as", "view_as", "contiguous", "swapaxes", "swapdims")
)  # fmt: skip
_SHAPE_FUNCTIONS = (
    torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.swapaxes, torch.swapdims,
)  # fmt: skip
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
# Calls that read only a tensor's shape: a fold that changes its values leaves them alone.
_SHAPE_TEMPLATES = frozenset(("reshape_as", "view_as", "expand_as", "size", "dim"))
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# BatchNorm2d/3d reject any other input rank, so their rank is known without running the model.
_FIXED_RANK: dict[type[nn.Module], int] = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)


def _f64(t: torch.Tensor | None, n: int, default: float) -> np.ndarray:
    """A BatchNorm parameter as n float64 values (``default`` when absent)."""
    if t is None:
        return np.full(n, default, np.float64)
    if t.numel() != n:
        raise InvalidArgumentError(f"BatchNorm parameter has {t.numel()} elements, not {n}")
    return t.detach().to("cpu", torch.float64).reshape(n).numpy()


def _scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of a BatchNorm in float64, BN(x) = x·s + t per channel."""
    n = running_mean.numel()
    if running_var.numel() != n:
        raise InvalidArgumentError(
            f"running_var has {running_var.numel()} elements, running_mean has {n}"
        )
    return bn_scale_shift(
        _f64(gamma, n, 1.0), _f64(beta, n, 0.0), _f64(running_mean, n, 0.0),
        _f64(running_var, n, 0.0), eps,
    )  # fmt: skip


def _like(
    new_w: np.ndarray, new_b: np.ndarray, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded float64 values cast once to the parameters' device and dtype (the weight's for
    a bias that did not exist)."""
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return (
        torch.from_numpy(new_w).to(device=weight.device, dtype=weight.dtype),
        torch.from_numpy(new_b).to(device=weight.device, dtype=bias_dtype),
    )


def fold_bn_into_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the producer with the BatchNorm folded in; pure, float64 inside.

    The arithmetic and the weight layouts are :mod:`normdeploy.passes.fold_math`'s, the same the
    ONNX pass uses. ``transposed`` selects the ConvTranspose layout (C_in, C_out/groups, k…);
    ``groups`` matters only there. Results have ``weight``'s device and dtype (``bias``'s dtype
    for b' if given).
    """
    s, t = _scale_shift(running_mean, running_var, eps, gamma, beta)
    c_out = len(s)
    w = weight.detach().to("cpu", torch.float64).numpy()
    layout = "ConvTranspose" if transposed else "Conv"
    channels = output_channels(tuple(w.shape), layout, group=groups) if w.ndim >= 1 else None
    if channels != c_out:
        what = f"with groups={groups} " if transposed else ""
        raise InvalidArgumentError(
            f"{layout} weight {tuple(w.shape)} {what}does not have {c_out} output channels"
        )
    new_w, new_b = fold_into_producer(
        w, None if bias is None else _f64(bias, c_out, 0.0), s, t, layout, group=groups
    )
    return _like(new_w, new_b, weight, bias)


def fold_bn_into_following_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    linear: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of a Conv (``linear=False``, unpadded) or Linear that reads the BatchNorm's
    output, with the BatchNorm folded in; pure, float64 inside (fold_math's formulas).

    The weight scales along its input channels by ``s``; the bias gains ``Σ W·t``.
    """
    s, t = _scale_shift(running_mean, running_var, eps, gamma, beta)
    w = weight.detach().to("cpu", torch.float64).numpy()
    in_features = w.shape[1] * (1 if linear else groups) if w.ndim >= 2 else None
    if in_features != len(s):
        raise InvalidArgumentError(
            f"weight {tuple(w.shape)} does not read {len(s)} input channels"
        )
    if linear:  # torch's (out, in) is Gemm's B with transB=1
        new_w, delta = scale_gemm_input_features(w, s, t, trans_b=True)
    else:
        new_w, delta = scale_conv_input_channels(w, s, t, groups)
    base = np.zeros(w.shape[0]) if bias is None else _f64(bias, w.shape[0], 0.0)
    return _like(new_w, base + delta, weight, bias)


@dataclass(frozen=True)
class BnFoldEntry:
    """One BatchNorm: folded (or, an identity branch, merged) into ``folded_into``, or skipped
    because of ``reason``."""

    batch_norm: str
    bn_type: str
    folded_into: str | None = None
    producer_type: str | None = None  # the type of the module it folded into
    reason: str = ""  # why it was kept, or notes on how it was folded
    direction: str = ""  # "preceding" (into the producer) | "following" (into the reader)
    merged: bool = False

    @property
    def folded(self) -> bool:
        return self.folded_into is not None and not self.merged

    @property
    def status(self) -> str:
        return "merged" if self.merged else "folded" if self.folded else "skipped"

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_norm": self.batch_norm,
            "bn_type": self.bn_type,
            "folded": self.folded,
            "merged": self.merged,
            "folded_into": self.folded_into,
            "producer_type": self.producer_type,
            "direction": self.direction,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ModuleFoldResult:
    """The folded copy (eval mode), a ledger with one entry per BatchNorm, and one entry per
    sum of parallel branches that merging looked at."""

    module: nn.Module = field(repr=False, compare=False)
    entries: tuple[BnFoldEntry, ...]
    traced: bool
    trace_error: str | None = None
    shape_error: str | None = None
    merges: tuple[BranchMergeEntry, ...] = ()

    @property
    def folded(self) -> tuple[BnFoldEntry, ...]:
        return tuple(e for e in self.entries if e.folded)

    @property
    def merged(self) -> tuple[BnFoldEntry, ...]:
        return tuple(e for e in self.entries if e.merged)

    @property
    def skipped(self) -> tuple[BnFoldEntry, ...]:
        return tuple(e for e in self.entries if e.folded_into is None)

    @property
    def modified(self) -> bool:
        return bool(self.folded) or any(m.merged for m in self.merges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "traced": self.traced,
            "trace_error": self.trace_error,
            "shape_error": self.shape_error,
            "folded": len(self.folded),
            "merged": len(self.merged),
            "skipped": len(self.skipped),
            "entries": [e.to_dict() for e in self.entries],
            "merges": [m.to_dict() for m in self.merges],
        }

    def _rows(self) -> list[list[str]]:
        return [
            [
                e.batch_norm,
                e.bn_type,
                e.status,
                ""
                if e.folded_into is None
                else f"{e.folded_into} ({e.producer_type}"
                + (", following)" if e.direction == "following" else ")"),
                e.reason,
            ]
            for e in self.entries
        ]

    def _summary(self) -> str:
        line = f"BatchNorm folding: {len(self.folded)} folded, "
        if self.merged:
            line += f"{len(self.merged)} merged, "
        line += f"{len(self.skipped)} skipped"
        if self.merges:
            done = sum(m.merged for m in self.merges)
            line += f"; {done} of {len(self.merges)} sums of parallel branches merged"
        if not self.traced:
            line += f"; forward not traceable by torch.fx ({self.trace_error})"
        if self.shape_error:
            line += f"; example inputs did not run ({self.shape_error})"
        return line

    _HEADERS = ("BatchNorm", "type", "status", "folded into", "reason")
    _MERGE_HEADERS = ("sum", "in module", "status", "merged into", "detail")

    def _merge_rows(self) -> list[list[str]]:
        return [
            [
                m.node,
                m.block or "(root)",
                "merged" if m.merged else "kept",
                m.merged_into or "",
                m.reason,
            ]
            for m in self.merges
        ]

    def to_text(self) -> str:
        text = self._summary() + "\n" + text_table(self._HEADERS, self._rows())
        if self.merges:
            text += "\n\n" + text_table(self._MERGE_HEADERS, self._merge_rows())
        return text

    def to_markdown(self) -> str:
        text = self._summary() + "\n\n" + markdown_table(self._HEADERS, self._rows())
        if self.merges:
            text += "\n\n" + markdown_table(self._MERGE_HEADERS, self._merge_rows())
        return text


def fold_bn_module(
    module: nn.Module, example_inputs: Any = None, *, merge: bool = True
) -> nn.Module:
    """A folded deep copy of ``module`` in eval mode; see :func:`fold_bn_module_with_ledger`."""
    return fold_bn_module_with_ledger(module, example_inputs, merge=merge).module


def _example_inputs(value: Any) -> Any:
    """``example_inputs`` as given (a tensor or a tuple/list of inputs), or a typed error."""
    if value is None or isinstance(value, (torch.Tensor, tuple)):
        return value
    if isinstance(value, list):
        return tuple(value)
    raise InvalidArgumentError(
        f"example_inputs: expected a tensor or a tuple of inputs, got {type(value).__name__}"
    )


def _deep_copy(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(
            f"module: expected an nn.Module, got {type(module).__name__}"
        )
    try:
        return copy.deepcopy(module)
    except Exception as exc:
        raise InvalidArgumentError(
            f"module: {type(module).__name__} cannot be deep-copied ({exc}); "
            "folding never modifies the caller's module"
        ) from exc


@dataclass
class _FoldContext:
    """What every pair check needs: the working copy and the facts collected about it."""

    work: nn.Module
    usage: _Usage
    ranks: dict[int, set[int]]
    shapes: dict[fx.Node, tuple[int, ...]]  # output shape of every traced node that ran
    example_inputs: Any
    bn_training: dict[int, bool]  # mode as handed over, by module id
    trace_error: str | None
    attribute_reads: dict[int, set[str]] = field(default_factory=dict)  # see _AttributeWatch


@dataclass(frozen=True)
class _Fold:
    """One fold to apply: the BatchNorm, the module it goes into, and in which direction."""

    direction: str  # "preceding" | "following"
    target_path: str
    bn_path: str
    chain: tuple[str, ...] = ()  # labels of the shape-only calls in between


class _Skip(Exception):
    """A fold that is not provably exact; the message is the ledger's reason."""


def _judge(ctx: _FoldContext, prefix: str, node: fx.Node) -> tuple[BnFoldEntry, _Fold | None]:
    """The ledger entry of the BatchNorm called at ``node``, and the fold to apply (if any)."""
    bn_path = prefix + str(node.target)
    bn = cast(_BatchNorm, ctx.work.get_submodule(bn_path))
    if (reason := _other_use_reason(ctx, prefix, node, bn)) is not None:
        return BnFoldEntry(bn_path, type(bn).__name__, reason=reason), None
    fold = None
    try:
        _check_bn(ctx, bn, node)
        reasons = []
        for attempt in (_check_preceding, _check_following):
            try:
                fold = attempt(ctx, prefix, node, bn)
                break
            except _Skip as why:
                reasons.append(str(why))
        else:
            raise _Skip("; ".join(reasons))
    except _Skip as why:
        return BnFoldEntry(bn_path, type(bn).__name__, reason=str(why)), None
    target = ctx.work.get_submodule(fold.target_path)
    if read := ctx.attribute_reads.get(id(target)):
        reason = (
            f"forward reads {type(target).__name__} '{fold.target_path}''s "
            f"{', '.join(sorted(read))} besides calling it (folding changes them)"
        )
        return BnFoldEntry(bn_path, type(bn).__name__, reason=reason), None
    notes = []
    if fold.chain:
        notes.append("through " + ", ".join(fold.chain))
    if ctx.bn_training[id(bn)]:
        notes.append("handed over in train mode; folded with running statistics (eval)")
    if ctx.trace_error is not None:
        notes.append(
            f"inside traceable '{prefix[:-1]}'; the untraceable forward around it is "
            "assumed to call it only as a whole"
        )
    entry = BnFoldEntry(
        bn_path, type(bn).__name__, fold.target_path, type(target).__name__,
        "; ".join(notes), fold.direction,
    )  # fmt: skip
    return entry, fold


def fold_bn_module_with_ledger(
    module: nn.Module, example_inputs: Any = None, *, merge: bool = True
) -> ModuleFoldResult:
    """Fold every provably foldable BatchNorm in a deep copy of ``module``; never touch ``module``.

    ``example_inputs`` (a tensor or a tuple of positional inputs) lets BatchNorm1d pairs be proved by
    the rank of the tensor BatchNorm actually sees, and folds through shape-only calls by the
    shapes they produce; without it those are skipped with a reason.
    With ``merge`` (the default), summed parallel conv branches are then merged into one conv
    (:mod:`normdeploy.torch_merge`); the result may then be a ``torch.fx.GraphModule``.
    """
    example_inputs = _example_inputs(example_inputs)
    work = _deep_copy(module)
    # Mode as handed over. The result always has eval semantics (running statistics), which
    # is what deployment needs; the ledger says which BatchNorms arrived in train mode.
    bn_training = {id(m): m.training for m in work.modules() if _is_batch_norm(m)}
    work.eval()
    watch = _AttributeWatch(work)
    with watch.active():
        graphs, untraceable = _trace_tree(work)
        ranks, shape_error, expected = _bn_input_ranks(work, example_inputs)
    shapes = {} if shape_error else _node_shapes(work, graphs, example_inputs)
    ctx = _FoldContext(
        work, _Usage.collect(work, graphs), ranks, shapes, example_inputs, bn_training,
        untraceable.get(""), watch.reads,
    )  # fmt: skip

    entries: dict[int, BnFoldEntry] = {}
    folds: list[_Fold] = []
    for prefix, graph in graphs:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _FUNCTIONAL_BN:
                entries[id(node)] = BnFoldEntry(
                    f"{prefix}{node.name}", "F.batch_norm",
                    reason="functional batch_norm call, not a module",
                )  # fmt: skip
                continue
            if node.op != "call_module":
                continue
            bn = work.get_submodule(prefix + str(node.target))
            if not _is_batch_norm(bn) or id(bn) in entries:
                continue
            entries[id(bn)], fold = _judge(ctx, prefix, node)
            if fold is not None:
                folds.append(fold)

    for path, mod in work.named_modules():
        if _is_batch_norm(mod) and id(mod) not in entries:
            entries[id(mod)] = BnFoldEntry(
                path, type(mod).__name__, reason=_unseen_reason(path, untraceable)
            )
    pristine = copy.deepcopy(work) if expected is not None else None
    for fold in folds:
        _apply_fold(work, fold)
    merges: tuple[BranchMergeEntry, ...] = ()
    if merge:
        work, merges = _merge(work, entries, ranks)
    changed = bool(folds) or any(m.merged for m in merges)
    if (
        changed
        and pristine is not None
        and expected is not None
        and (why := _folded_copy_fault(work, example_inputs, expected)) is not None
    ):
        work, merges = pristine, ()  # never return a module that fails or differs: undo all
        entries = {
            key: BnFoldEntry(e.batch_norm, e.bn_type, reason=f"{why}; every fold undone")
            if e.folded or e.merged
            else e
            for key, e in entries.items()
        }
    ledger = tuple(entries.values())
    for e in ledger:
        logger.debug("%s: %s", e.batch_norm, e.reason)
    logger.info("folded %d of %d BatchNorm layers", sum(e.folded for e in ledger), len(ledger))
    return ModuleFoldResult(
        module=work.eval(),
        entries=ledger,
        traced=ctx.trace_error is None,
        trace_error=ctx.trace_error,
        shape_error=shape_error,
        merges=merges,
    )


def _merge(
    work: nn.Module, entries: dict[int, BnFoldEntry], ranks: dict[int, set[int]]
) -> tuple[nn.Module, tuple[BranchMergeEntry, ...]]:
    """Merge summed branches of the folded copy; an identity BatchNorm's entry says merged
    (into which conv) or why it was not, in place of the fold's reason."""
    from normdeploy.torch_merge import merge_module_branches  # it builds on this module

    outcome = merge_module_branches(work, ranks)
    for key, (conv_path, note) in outcome.bn_merged.items():
        old = entries[key]
        conv_type = type(outcome.root.get_submodule(conv_path)).__name__
        entries[key] = BnFoldEntry(
            old.batch_norm, old.bn_type, conv_path, conv_type, note, merged=True
        )
    for key, reason in outcome.bn_kept.items():
        if key in entries:
            old = entries[key]
            entries[key] = BnFoldEntry(old.batch_norm, old.bn_type, reason=reason)
    return outcome.root, tuple(outcome.entries)


def _is_batch_norm(m: nn.Module) -> TypeGuard[_BatchNorm]:
    return isinstance(m, _BatchNorm)


def _trace_tree(root: nn.Module) -> tuple[list[tuple[str, fx.Graph]], dict[str, str]]:
    """fx graphs of the root, or of its outermost traceable submodules when the root fails.

    Returns ``[(prefix, graph)]`` (prefix: qualified name + '.') and ``{path: trace error}``.
    """
    tracer = fx.Tracer()
    graphs: list[tuple[str, fx.Graph]] = []
    untraceable: dict[str, str] = {}

    def visit(mod: nn.Module, path: str) -> None:
        try:
            with user_code("the model's forward"):
                graph = fx.Tracer().trace(mod)
        except Exception as exc:  # any failure means "not provable here"; look inside
            untraceable[path] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            for name, child in mod.named_children():
                if not tracer.is_leaf_module(child, name):
                    visit(child, f"{path}.{name}" if path else name)
            return
        graphs.append((f"{path}." if path else "", graph))

    visit(root, "")
    if "" in untraceable:
        logger.info("forward is not traceable by torch.fx (%s)", untraceable[""])
    return graphs, untraceable


def _bn_input_ranks(
    root: nn.Module, example_inputs: Any
) -> tuple[dict[int, set[int]], str | None, list[torch.Tensor] | None]:
    """Ranks of the tensors each BatchNorm receives when the eval copy runs the example inputs,
    and the copy's outputs there (what the folded copy must reproduce)."""
    if example_inputs is None:
        return {}, None, None
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    ranks: dict[int, set[int]] = defaultdict(set)

    def record(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            ranks[id(mod)].add(inputs[0].dim())

    handles = [
        m.register_forward_pre_hook(record) for m in root.modules() if _is_batch_norm(m)
    ]
    try:
        with torch.no_grad(), user_code("the model's forward"):
            outputs = flatten_outputs(root(*args))
    except Exception as exc:
        logger.warning("example inputs did not run through the module: %s", exc)
        return {}, f"{type(exc).__name__}: {exc}", None
    finally:
        for h in handles:
            h.remove()
    return dict(ranks), None, [t.detach().clone() for t in outputs]


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph and records the shape of every tensor a node returns."""

    def __init__(self, module: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
        super().__init__(module)
        self.shapes = shapes

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _node_shapes(
    root: nn.Module, graphs: list[tuple[str, fx.Graph]], example_inputs: Any
) -> dict[fx.Node, tuple[int, ...]]:
    """Output shapes of the traced graphs' nodes on the example inputs (hooks capture what
    each traced submodule receives); {} without example inputs."""
    if example_inputs is None:
        return {}
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    received: dict[str, tuple[Any, ...]] = {}

    def capture(path: str) -> Any:
        def hook(_mod: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if path not in received and not kwargs:
                received[path] = inputs

        return hook

    handles = [
        root.get_submodule(prefix[:-1]).register_forward_pre_hook(
            capture(prefix), with_kwargs=True
        )
        for prefix, _ in graphs
        if prefix
    ]
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    try:
        with torch.no_grad():
            if any(not prefix for prefix, _ in graphs):
                received[""] = args
            else:
                root(*args)
            for prefix, graph in graphs:
                if prefix in received:
                    module = root.get_submodule(prefix[:-1]) if prefix else root
                    _ShapeRecorder(fx.GraphModule(module, graph), shapes).run(
                        *received[prefix]
                    )
    except Exception as exc:  # shapes are evidence, not a requirement: folds needing them skip
        logger.info("recording shapes for the fold failed: %s", exc)
    finally:
        for h in handles:
            h.remove()
    return shapes


@dataclass(frozen=True)
class _Usage:
    """Who uses what, over the whole tree and every traced graph."""

    paths: dict[int, list[str]]  # module id → every path it is registered at
    calls: Counter[int]  # module id → call_module count over all graphs
    attr_reads: Counter[int]  # module id → get_attr reads of its parameters/buffers
    param_owners: Counter[int]  # parameter id → registrations

    @classmethod
    def collect(cls, root: nn.Module, graphs: Iterable[tuple[str, fx.Graph]]) -> _Usage:
        paths: dict[int, list[str]] = defaultdict(list)
        for path, mod in root.named_modules(remove_duplicate=False):
            paths[id(mod)].append(path)
        calls: Counter[int] = Counter()
        attr_reads: Counter[int] = Counter()
        for prefix, graph in graphs:
            for node in graph.nodes:
                if node.op == "call_module":
                    calls[id(root.get_submodule(prefix + str(node.target)))] += 1
                elif node.op == "get_attr":
                    owner, _, _ = (prefix + str(node.target)).rpartition(".")
                    with contextlib.suppress(AttributeError):
                        attr_reads[id(root.get_submodule(owner))] += 1
        param_owners = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
        return cls(paths, calls, attr_reads, param_owners)

    def sharing_reason(self, mod: nn.Module, what: str) -> str | None:
        """Why ``mod`` is not used exactly once through its own forward, or None."""
        if len(self.paths[id(mod)]) > 1:
            return f"{what} is registered at {len(self.paths[id(mod)])} paths (shared module)"
        if self.calls[id(mod)] != 1:
            return f"{what} is called {self.calls[id(mod)]} times (shared weights)"
        if self.attr_reads[id(mod)]:
            return f"{what}'s parameters are also read directly in forward"
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"{what} has forward hooks"
        for name, p in mod.named_parameters(recurse=False):
            if self.param_owners[id(p)] > 1:
                return f"{what}'s {name} is shared with another module"
        return None


def _check_bn(ctx: _FoldContext, bn: _BatchNorm, node: fx.Node) -> None:
    """Raise _Skip when the BatchNorm itself cannot be folded in either direction."""
    if any(is_lazy(t) for t in bn.state_dict().values()):
        raise _Skip("lazy BatchNorm is not initialised")
    if type(bn) not in _BATCH_NORMS:
        raise _Skip(f"custom BatchNorm subclass {type(bn).__name__}; its forward is unknown")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise _Skip("no running statistics (track_running_stats=False): uses batch statistics")
    if (reason := ctx.usage.sharing_reason(bn, "BatchNorm")) is not None:
        raise _Skip(reason)
    stats = [bn.running_mean, bn.running_var, bn.weight, bn.bias]
    if not all(torch.isfinite(t).all() for t in stats if t is not None):
        raise _Skip("non-finite running statistics or affine parameters")
    if not bool((bn.running_var.double() + bn.eps > 0).all()):
        raise _Skip("running_var + eps is not positive")
    if not isinstance(node.args[0] if node.args else None, fx.Node) or len(node.args) != 1:
        raise _Skip("BatchNorm is not called on a single tensor")
    if node.kwargs:
        raise _Skip("BatchNorm is not called on a single tensor")


def _call_label(root: nn.Module, prefix: str, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(root.get_submodule(prefix + str(node.target))).__name__} '{node.name}'"
    what = node.target if node.op == "call_method" else getattr(node.target, "__name__", "?")
    return f"{what} '{node.name}'"


def _is_shape_call(root: nn.Module, prefix: str, node: fx.Node) -> bool:
    """A call that only regroups or reorders its first argument's elements."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    if node.op == "call_module":
        return type(root.get_submodule(prefix + str(node.target))) in _SHAPE_MODULES
    return False


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read ``node``'s elements (not only its shape, as reshape_as(node) does)."""
    users = []
    for user in node.users:
        shape_only = (
            user.op == "call_method"
            and user.target in _SHAPE_TEMPLATES
            and (user.target in ("size", "dim") or user.args[0] is not node)
            and node not in user.kwargs.values()
        ) or (
            user.op == "call_function" and user.target is getattr and user.args[1] == "shape"
        )
        if not shape_only:
            users.append(user)
    return users


def _permutation(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The permutation a transpose/permute/swapaxes call applies, None if it is not one."""
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args: list[Any] = list(node.args[1:])
    if target in ("transpose", "swapaxes", "swapdims"):
        dims = args or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
            return None
        perm = list(range(rank))
        a, b = (int(d) % rank for d in dims)
        perm[a], perm[b] = perm[b], perm[a]
        return tuple(perm)
    if target == "permute":
        given: Any = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        given = given or node.kwargs.get("dims", [])
        if len(given) != rank or not all(isinstance(d, int) for d in given):
            return None
        return tuple(int(d) % rank for d in given)
    return None


def _shape_steps(ctx: _FoldContext, prefix: str, chain: list[fx.Node]) -> list[ShapeStep]:
    """The chain as ShapeSteps, from the shapes the example inputs produced."""
    labels = ", ".join(_call_label(ctx.work, prefix, n) for n in chain)
    steps = []
    for node in chain:
        label = _call_label(ctx.work, prefix, node)
        src = node.args[0]
        assert isinstance(src, fx.Node)
        in_shape, out_shape = ctx.shapes.get(src), ctx.shapes.get(node)
        if in_shape is None or out_shape is None:
            why = (
                "pass example_inputs"
                if ctx.example_inputs is None
                else "they did not run through this code"
            )
            raise _Skip(f"cannot prove the channel axis through {labels} (no shapes; {why})")
        perm = None
        if node.op != "call_module" and node.target not in (
            "reshape", "view", "flatten", "squeeze", "unsqueeze", "reshape_as", "view_as",
            "contiguous", torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
        ):  # fmt: skip
            perm = _permutation(node, len(in_shape))
            if perm is None:
                raise _Skip(f"{label}: its permutation is not a constant")
        steps.append(ShapeStep(label, in_shape, out_shape, perm))
    return steps


def _neighbour_rank(ctx: _FoldContext, bn: _BatchNorm) -> int | None:
    """The rank of the tensor the BatchNorm sees (the same as it returns), if proved."""
    seen = ctx.ranks.get(id(bn))
    if seen:
        return next(iter(seen)) if len(seen) == 1 else None
    return _FIXED_RANK.get(type(bn))


def _feature_axis_reason(
    module: nn.Module, axis: int, rank: int, side: str, bn: _BatchNorm
) -> str | None:
    """None when ``axis`` of a ``rank``-D tensor is ``module``'s feature axis (its output for
    the preceding side, its input for the following side)."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        if axis == rank - 1 and rank >= 2:
            return None
        return (
            f"the {type(bn).__name__}'s channel axis is axis {axis} of a rank-{rank} tensor; "
            f"{name}'s features are the last axis"
        )
    layout = _PRODUCERS[type(module)]
    if rank == layout.spatial_dims + 2 and axis == 1:
        return None
    return (
        f"the {type(bn).__name__}'s channel axis is axis {axis} of a rank-{rank} tensor; "
        f"{name}'s channels are axis 1 of rank {layout.spatial_dims + 2} (unbatched?)"
    )


def _check_preceding(ctx: _FoldContext, prefix: str, node: fx.Node, bn: _BatchNorm) -> _Fold:
    """The fold of the BatchNorm into the module whose output it reads, or _Skip."""
    src = node.args[0]
    chain: list[fx.Node] = []
    while isinstance(src, fx.Node) and _is_shape_call(ctx.work, prefix, src):
        reader = chain[0] if chain else node
        if [u for u in _value_users(src) if u is not reader]:
            raise _Skip(
                f"{_call_label(ctx.work, prefix, src)} output has {len(_value_users(src))} "
                "users, not only the BatchNorm"
            )
        chain.insert(0, src)
        src = src.args[0]
    assert isinstance(src, fx.Node)
    if src.op != "call_module":
        what: Any = src.target
        if src.op == "call_function":
            what = getattr(src.target, "__name__", "")
        raise _Skip(
            f"input comes from {src.op} '{what}', not a Conv/ConvTranspose/Linear module"
        )
    producer_path = prefix + str(src.target)
    producer = ctx.work.get_submodule(producer_path)
    pname = type(producer).__name__
    if type(producer) not in _PRODUCERS:
        raise _Skip(f"input comes from {pname} '{producer_path}', not foldable")
    if (reason := ctx.usage.sharing_reason(producer, pname)) is not None:
        raise _Skip(reason)
    if len(_value_users(src)) != 1:
        raise _Skip(f"{pname} output has {len(src.users)} users, not only the BatchNorm")
    out_channels = (
        producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    )
    if out_channels != bn.num_features:
        raise _Skip(f"{out_channels} output channels but {bn.num_features} BatchNorm features")
    labels: tuple[str, ...] = ()
    if chain:
        steps = _shape_steps(ctx, prefix, chain)
        found = trace_back(steps, 1)
        if found.axis is None:
            raise _Skip(found.reason)
        rank = len(steps[0].in_shape or ())
        if (
            why := _feature_axis_reason(producer, found.axis, rank, "preceding", bn)
        ) is not None:
            raise _Skip(why)
        labels = tuple(step.label for step in steps)
    elif (
        reason := _channel_axis_reason(
            producer, _PRODUCERS[type(producer)], bn, ctx.ranks, ctx.example_inputs
        )
    ) is not None:
        raise _Skip(reason)
    return _Fold("preceding", producer_path, prefix + str(node.target), labels)


def _check_following(ctx: _FoldContext, prefix: str, node: fx.Node, bn: _BatchNorm) -> _Fold:
    """The fold of the BatchNorm into the one unpadded Conv or Linear reading its output."""
    chain: list[fx.Node] = []
    value = node
    while True:
        users = list(value.users)
        if len(users) != 1:
            who = "BatchNorm" if value is node else _call_label(ctx.work, prefix, value)
            raise _Skip(f"following: {who} output has {len(users)} users")
        user = users[0]
        if not _is_shape_call(ctx.work, prefix, user) or user.args[0] is not value:
            break
        chain.append(user)
        value = user
    if user.op != "call_module" or user.args != (value,) or user.kwargs:
        what: Any = user.target
        if user.op == "call_function":
            what = getattr(user.target, "__name__", "")
        raise _Skip(f"following: output goes to {user.op} '{what}', not a Conv/Linear module")
    path = prefix + str(user.target)
    consumer = ctx.work.get_submodule(path)
    cname = type(consumer).__name__
    if type(consumer) not in _CONSUMERS:
        raise _Skip(f"following: output goes to {cname} '{path}', not a Conv/Linear")
    if (reason := ctx.usage.sharing_reason(consumer, cname)) is not None:
        raise _Skip(f"following: {reason}")
    if isinstance(consumer, nn.Linear):
        in_features = consumer.in_features
    else:
        conv = cast(nn.modules.conv._ConvNd, consumer)
        in_features = conv.in_channels
        if conv.padding != "valid" and (conv.padding == "same" or any(conv.padding)):
            raise _Skip(
                f"following: padded {cname} (borders see zeros, not the BatchNorm shift): "
                "not exact"
            )
    if in_features != bn.num_features:
        raise _Skip(
            f"following: {cname} reads {in_features} channels, BatchNorm has {bn.num_features}"
        )
    labels: tuple[str, ...] = ()
    if chain:
        steps = _shape_steps(ctx, prefix, chain)
        found = trace_forward(steps, 1)
        if found.axis is None:
            raise _Skip(f"following: {found.reason}")
        axis, rank = found.axis, len(steps[-1].out_shape or ())
        labels = tuple(step.label for step in steps)
    else:
        seen = _neighbour_rank(ctx, bn)
        if seen is None:
            hint = "pass example_inputs" if ctx.example_inputs is None else "it did not run"
            raise _Skip(f"following: rank of the BatchNorm's input unknown ({hint})")
        axis, rank = 1, seen
    if (why := _feature_axis_reason(consumer, axis, rank, "following", bn)) is not None:
        raise _Skip(f"following: {why}")
    return _Fold("following", path, prefix + str(node.target), labels)


def _channel_axis_reason(
    producer: nn.Module,
    layout: _ProducerLayout,
    bn: nn.Module,
    ranks: dict[int, set[int]],
    example_inputs: Any,
) -> str | None:
    """None when BatchNorm's axis 1 is provably the producer's output-channel axis."""
    expected = layout.spatial_dims + 2 if layout.spatial_dims else 2
    pname = type(producer).__name__
    seen = ranks.get(id(bn))
    if seen:
        if seen == {expected}:
            return None
        got = ", ".join(str(r) for r in sorted(seen))
        if isinstance(producer, nn.Linear):
            return (
                f"BatchNorm input has rank {got}: it normalizes axis 1, Linear's features are the "
                "last axis"
            )
        return f"BatchNorm input has rank {got} (unbatched?): axis 1 is not {pname}'s channel axis"
    fixed = _FIXED_RANK.get(type(bn))
    if fixed is not None:
        if fixed == expected:
            return None
        return (
            f"{type(bn).__name__} input has rank {fixed}: axis 1 is not {pname}'s channel axis"
        )
    why = "pass example_inputs" if example_inputs is None else "BatchNorm did not run on them"
    return (
        f"cannot prove {type(bn).__name__}'s axis 1 is {pname}'s output-channel axis "
        f"(input rank unknown; {why})"
    )


def _apply_fold(root: nn.Module, fold: _Fold) -> None:
    """Replace the target's parameters with the folded ones and the BatchNorm with Identity."""
    target = cast(_Producer, root.get_submodule(fold.target_path))
    bn = cast(_BatchNorm, root.get_submodule(fold.bn_path))
    assert bn.running_mean is not None and bn.running_var is not None
    stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    if fold.direction == "preceding":
        layout = _PRODUCERS[type(target)]
        weight, bias = fold_bn_into_weights(
            target.weight, target.bias, *stats,
            transposed=layout.transposed, groups=getattr(target, "groups", 1),
        )  # fmt: skip
    else:
        weight, bias = fold_bn_into_following_weights(
            target.weight, target.bias, *stats,
            linear=isinstance(target, nn.Linear), groups=getattr(target, "groups", 1),
        )  # fmt: skip
    grad = target.weight.requires_grad
    target.weight = nn.Parameter(weight, requires_grad=grad)
    target.bias = nn.Parameter(bias, requires_grad=grad)
    parent_path, _, name = fold.bn_path.rpartition(".")
    setattr(root.get_submodule(parent_path), name, nn.Identity())


def _unseen_reason(path: str, untraceable: dict[str, str]) -> str:
    """Why a BatchNorm never appeared in a traced graph."""
    owners = [p for p in untraceable if p == "" or path.startswith(p + ".")]
    if owners:
        owner = max(owners, key=len)
        label = f"'{owner}'" if owner else "the module"
        return f"forward of {label} is not traceable by torch.fx ({untraceable[owner]})"
    return "not called in forward"


# Code that is not the model's own: reads from here are torch's machinery, the tracer, or ours.
_LIBRARY_DIRS = (
    *(
        os.path.join(os.path.dirname(os.path.abspath(f)), "")
        for f in (torch.__file__, __file__)
    ),
    os.path.join(sysconfig.get_paths()["stdlib"], ""),
)
_PRODUCER_STATE = frozenset(("weight", "bias", "_parameters"))


def _is_library_code(filename: str) -> bool:
    return filename.startswith("<") or filename.startswith(_LIBRARY_DIRS)


class _AttributeWatch:
    """Which BatchNorms (any attribute) and producers (weight/bias) the model's own code reads
    other than by calling them, while tracing and running the forward.

    Each watched instance gets, for the duration of :meth:`active`, a subclass of its own class
    whose ``__getattribute__`` notes reads made from frames outside torch, the standard library
    and normdeploy. Calling a module looks ``__call__`` up on its type, so a plain call is never
    a read.
    """

    def __init__(self, root: nn.Module) -> None:
        self.modules = [
            m for m in root.modules() if _is_batch_norm(m) or type(m) in _PRODUCERS
        ]
        self.reads: dict[int, set[str]] = defaultdict(set)

    def _watched(self, cls: type[nn.Module], producer: bool) -> type[nn.Module]:
        reads = self.reads
        base = cls.__getattribute__

        def __getattribute__(self: nn.Module, name: str) -> Any:  # noqa: N807
            if (not producer or name in _PRODUCER_STATE) and not _is_library_code(
                sys._getframe(1).f_code.co_filename
            ):
                reads[id(self)].add(name)
            return base(self, name)

        namespace = {
            "__getattribute__": __getattribute__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        return type(cls.__name__, (cls,), namespace)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        originals = [(m, type(m)) for m in self.modules]
        for m, cls in originals:
            m.__class__ = self._watched(cls, producer=cls in _PRODUCERS)
        try:
            yield
        finally:
            for m, cls in originals:
                m.__class__ = cls


def _other_use_reason(
    ctx: _FoldContext, prefix: str, node: fx.Node, bn: nn.Module
) -> str | None:
    """Why the BatchNorm at ``node`` (or its producer) is used other than by the plain call."""
    if read := ctx.attribute_reads.get(id(bn)):
        return (
            f"forward reads BatchNorm attribute(s) {', '.join(sorted(read))} besides calling "
            "it (the folded copy has no BatchNorm there)"
        )
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src.op == "call_module":
        with contextlib.suppress(AttributeError):
            producer = ctx.work.get_submodule(prefix + str(src.target))
            if read := ctx.attribute_reads.get(id(producer)):
                return (
                    f"forward reads the producer's {', '.join(sorted(read))} besides calling "
                    "it (folding changes them)"
                )
    if ctx.trace_error is not None and ctx.example_inputs is None:
        return (
            f"inside traceable '{prefix[:-1]}', but the forward around it is not traceable and "
            "no example_inputs were given to watch how it uses the BatchNorm"
        )
    return None


def _folded_copy_fault(
    work: nn.Module, example_inputs: Any, expected: list[torch.Tensor]
) -> str | None:
    """Why the folded copy cannot be returned (it fails, or differs from the unfolded eval
    copy beyond the package's tolerance on the example inputs), or None."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad(), user_code("the folded model's forward"):
            got = flatten_outputs(work(*args))
    except Exception as exc:
        return f"the folded copy fails on example_inputs ({type(exc).__name__}: {first_line(exc)})"
    if len(got) != len(expected):
        return f"the folded copy returns {len(got)} tensor(s), the model {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, got, strict=True)):
        want = to_numpy(e)
        eps = torch.finfo(e.dtype).eps if e.is_floating_point() else 0.0
        tolerance = _fault_tolerance(want, eps)
        comparison = compare_arrays(f"output {i}", want, to_numpy(a), tolerance)
        if not comparison.passed:
            return (
                f"the folded copy differs from the model on example_inputs (output {i}: "
                f"max |Δ| {fmt_num(comparison.max_abs)}, over {comparison.atol:.3g})"
            )
    return None


def _fault_tolerance(expected: np.ndarray, eps: float) -> Tolerance:
    """How far a folded output may be from the unfolded one before it is a fault, not rounding.

    Folding is exact up to rounding, and that rounding is small relative to the output's scale
    even where it exceeds an elementwise tolerance (a large mean subtracted, a tiny variance):
    over 600 random Conv/ConvTranspose+BN cases, at most 3.3e-7 of max|output| in float32 and
    7e-16 in float64. A fault (a BatchNorm the forward still needs) changes outputs by O(1) of
    their scale. So: 1e-3 of the scale, or 10 machine epsilons (``eps``, of the output's torch
    dtype) where that is coarser (float16, bfloat16).
    """
    finite = np.abs(expected[np.isfinite(expected)].astype(np.float64))
    scale = float(finite.max()) if finite.size else 0.0
    return Tolerance(max(1e-3, 10 * eps) * scale, 0.0)
