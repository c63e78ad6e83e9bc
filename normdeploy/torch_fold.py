"""Fold eval-mode BatchNorm into the Conv/ConvTranspose/Linear module that feeds it, with torch.fx.

A BatchNorm that reads only the output of a producer (weight W, bias b, 0 when absent) folds into
it as ``W' = W·s`` along the producer's output channels and ``b' = b·s + t``, with
``(s, t)`` from the running statistics and affine parameters (1 and 0 when ``affine=False``).
The formula and the weight layouts (Linear as Conv's axis 0, ConvTranspose's axis 1 within each
group) are :mod:`normdeploy.passes.fold_math`'s, shared with the ONNX pass; the arithmetic runs
in float64 and is cast once to the parameter dtype.

The pass works on a deep copy (the caller's module, its mode and its statistics are left alone):
torch.fx traces the copy to find producer → BatchNorm pairs anywhere in the forward code, each pair is
checked for the conditions under which folding is exact (see :func:`_check_pair`), the producer's
parameters are replaced and the BatchNorm becomes ``nn.Identity``. The copy keeps its own class and
forward. When the forward cannot be traced, traceable submodules are folded on their own and the
rest is left as it was. Every BatchNorm gets a ledger entry: folded into which module, or why not.

Only a BatchNorm whose every use is the plain call folds: the forward code (traced, or run on the
example inputs) is watched for any other read of the BatchNorm (``self.bn.running_mean``,
``self.bn.eps``, ``isinstance(self.bn, …)``) or of the producer's weight and bias, since the
folded copy has neither; such a BatchNorm is kept with the reason. With example inputs the folded
copy is finally run against the unfolded eval copy, and a copy that fails or differs is never
returned: every fold is undone and the ledger says why.
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
from typing import Any, TypeGuard, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from normdeploy.errors import InvalidArgumentError, first_line, user_code
from normdeploy.passes.fold_math import bn_scale_shift, fold_into_producer, output_channels
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.verification.compare import Tolerance, compare_arrays
from normdeploy.verification.runners import flatten_outputs, to_numpy

logger = logging.getLogger(__name__)

__all__ = [
    "BnFoldEntry",
    "ModuleFoldResult",
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
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# BatchNorm2d/3d reject any other input rank, so their rank is known without running the model.
_FIXED_RANK: dict[type[nn.Module], int] = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)


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
    c_out = running_mean.numel()
    if running_var.numel() != c_out:
        raise InvalidArgumentError(
            f"running_var has {running_var.numel()} elements, running_mean has {c_out}"
        )

    def f64(t: torch.Tensor | None, default: float) -> np.ndarray:
        if t is None:
            return np.full(c_out, default, np.float64)
        if t.numel() != c_out:
            raise InvalidArgumentError(
                f"BatchNorm parameter has {t.numel()} elements, not {c_out}"
            )
        return t.detach().to("cpu", torch.float64).reshape(c_out).numpy()

    s, t = bn_scale_shift(
        f64(gamma, 1.0), f64(beta, 0.0), f64(running_mean, 0.0), f64(running_var, 0.0), eps
    )
    w = weight.detach().to("cpu", torch.float64).numpy()
    layout = "ConvTranspose" if transposed else "Conv"
    channels = output_channels(tuple(w.shape), layout, group=groups) if w.ndim >= 1 else None
    if channels != c_out:
        what = f"with groups={groups} " if transposed else ""
        raise InvalidArgumentError(
            f"{layout} weight {tuple(w.shape)} {what}does not have {c_out} output channels"
        )
    new_w, new_b = fold_into_producer(
        w, None if bias is None else f64(bias, 0.0), s, t, layout, group=groups
    )
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return (
        torch.from_numpy(new_w).to(device=weight.device, dtype=weight.dtype),
        torch.from_numpy(new_b).to(device=weight.device, dtype=bias_dtype),
    )


@dataclass(frozen=True)
class BnFoldEntry:
    """One BatchNorm: folded into ``folded_into``, or skipped because of ``reason``."""

    batch_norm: str
    bn_type: str
    folded_into: str | None = None
    producer_type: str | None = None
    reason: str = ""

    @property
    def folded(self) -> bool:
        return self.folded_into is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_norm": self.batch_norm,
            "bn_type": self.bn_type,
            "folded": self.folded,
            "folded_into": self.folded_into,
            "producer_type": self.producer_type,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ModuleFoldResult:
    """The folded copy (eval mode) and a ledger with one entry per BatchNorm."""

    module: nn.Module = field(repr=False, compare=False)
    entries: tuple[BnFoldEntry, ...]
    traced: bool
    trace_error: str | None = None
    shape_error: str | None = None

    @property
    def folded(self) -> tuple[BnFoldEntry, ...]:
        return tuple(e for e in self.entries if e.folded)

    @property
    def skipped(self) -> tuple[BnFoldEntry, ...]:
        return tuple(e for e in self.entries if not e.folded)

    @property
    def modified(self) -> bool:
        return bool(self.folded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "traced": self.traced,
            "trace_error": self.trace_error,
            "shape_error": self.shape_error,
            "folded": len(self.folded),
            "skipped": len(self.skipped),
            "entries": [e.to_dict() for e in self.entries],
        }

    def _rows(self) -> list[list[str]]:
        return [
            [
                e.batch_norm,
                e.bn_type,
                "folded" if e.folded else "skipped",
                "" if e.folded_into is None else f"{e.folded_into} ({e.producer_type})",
                e.reason,
            ]
            for e in self.entries
        ]

    def _summary(self) -> str:
        line = f"BatchNorm folding: {len(self.folded)} folded, {len(self.skipped)} skipped"
        if not self.traced:
            line += f"; forward not traceable by torch.fx ({self.trace_error})"
        if self.shape_error:
            line += f"; example inputs did not run ({self.shape_error})"
        return line

    _HEADERS = ("BatchNorm", "type", "status", "folded into", "reason")

    def to_text(self) -> str:
        return self._summary() + "\n" + text_table(self._HEADERS, self._rows())

    def to_markdown(self) -> str:
        return self._summary() + "\n\n" + markdown_table(self._HEADERS, self._rows())


def fold_bn_module(module: nn.Module, example_inputs: Any = None) -> nn.Module:
    """A folded deep copy of ``module`` in eval mode; see :func:`fold_bn_module_with_ledger`."""
    return fold_bn_module_with_ledger(module, example_inputs).module


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
    example_inputs: Any
    bn_training: dict[int, bool]  # mode as handed over, by module id
    trace_error: str | None
    attribute_reads: dict[int, set[str]] = field(default_factory=dict)  # see _AttributeWatch


_Fold = tuple[str, str, _ProducerLayout]  # (producer path, BatchNorm path, producer layout)


def _judge(ctx: _FoldContext, prefix: str, node: fx.Node) -> tuple[BnFoldEntry, _Fold | None]:
    """The ledger entry of the BatchNorm called at ``node``, and the fold to apply (if any)."""
    bn_path = prefix + str(node.target)
    bn = cast(_BatchNorm, ctx.work.get_submodule(bn_path))
    if (reason := _other_use_reason(ctx, prefix, node, bn)) is not None:
        return BnFoldEntry(bn_path, type(bn).__name__, reason=reason), None
    args = (ctx.work, node, prefix, bn_path, bn, ctx.usage, ctx.ranks, ctx.example_inputs)
    producer_path, reason = _check_pair(*args)
    if reason is not None or producer_path is None:
        return BnFoldEntry(bn_path, type(bn).__name__, reason=reason or ""), None
    producer = ctx.work.get_submodule(producer_path)
    notes = []
    if ctx.bn_training[id(bn)]:
        notes.append("handed over in train mode; folded with running statistics (eval)")
    if ctx.trace_error is not None:
        notes.append(
            f"inside traceable '{prefix[:-1]}'; the untraceable forward around it is "
            "assumed to call it only as a whole"
        )
    entry = BnFoldEntry(
        bn_path, type(bn).__name__, producer_path, type(producer).__name__, "; ".join(notes)
    )
    return entry, (producer_path, bn_path, _PRODUCERS[type(producer)])


def fold_bn_module_with_ledger(
    module: nn.Module, example_inputs: Any = None
) -> ModuleFoldResult:
    """Fold every provably foldable BatchNorm in a deep copy of ``module``; never touch ``module``.

    ``example_inputs`` (a tensor or a tuple of positional inputs) lets BatchNorm1d pairs be proved by
    the rank of the tensor BatchNorm actually sees; without it they are skipped with a reason.
    """
    work = _deep_copy(module)
    example_inputs = _example_inputs(example_inputs)
    # Mode as handed over. The result always has eval semantics (running statistics), which
    # is what deployment needs; the ledger says which BatchNorms arrived in train mode.
    bn_training = {id(m): m.training for m in work.modules() if _is_batch_norm(m)}
    work.eval()
    watch = _AttributeWatch(work)
    with watch.active():
        graphs, untraceable = _trace_tree(work)
        ranks, shape_error, expected = _bn_input_ranks(work, example_inputs)
    ctx = _FoldContext(
        work, _Usage.collect(work, graphs), ranks, example_inputs, bn_training,
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
    pristine = copy.deepcopy(work) if folds and expected is not None else None
    for producer_path, bn_path, layout in folds:
        _apply_fold(work, producer_path, bn_path, layout)
    if (
        pristine is not None
        and expected is not None
        and (why := _folded_copy_fault(work, example_inputs, expected)) is not None
    ):
        work = pristine  # never return a module that fails or differs: undo every fold
        entries = {
            key: BnFoldEntry(e.batch_norm, e.bn_type, reason=f"{why}; every fold undone")
            if e.folded
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
    )


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


def _check_pair(
    root: nn.Module,
    bn_node: fx.Node,
    prefix: str,
    bn_path: str,
    bn: _BatchNorm,
    usage: _Usage,
    ranks: dict[int, set[int]],
    example_inputs: Any,
) -> tuple[str | None, str | None]:
    """The producer path if BatchNorm ``bn_node`` folds exactly, else (None, reason)."""

    def fail(reason: str) -> tuple[None, str]:
        return None, reason

    if any(is_lazy(t) for t in bn.state_dict().values()):
        return fail("lazy BatchNorm is not initialised")
    if type(bn) not in _BATCH_NORMS:
        return fail(f"custom BatchNorm subclass {type(bn).__name__}; its forward is unknown")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return fail("no running statistics (track_running_stats=False): uses batch statistics")
    if (reason := usage.sharing_reason(bn, "BatchNorm")) is not None:
        return fail(reason)
    stats = [bn.running_mean, bn.running_var, bn.weight, bn.bias]
    if not all(torch.isfinite(t).all() for t in stats if t is not None):
        return fail("non-finite running statistics or affine parameters")
    if not bool((bn.running_var.double() + bn.eps > 0).all()):
        return fail("running_var + eps is not positive")

    src = bn_node.args[0] if bn_node.args else None
    if not isinstance(src, fx.Node) or len(bn_node.args) != 1 or bn_node.kwargs:
        return fail("BatchNorm is not called on a single tensor")
    if src.op != "call_module":
        what = (
            src.target
            if src.op != "call_function"
            else getattr(src.target, "__name__", src.target)
        )
        return fail(
            f"input comes from {src.op} '{what}', not a Conv/ConvTranspose/Linear module"
        )
    producer_path = prefix + str(src.target)
    producer = root.get_submodule(producer_path)
    layout = _PRODUCERS.get(type(producer))
    if layout is None:
        return fail(
            f"input comes from {type(producer).__name__} '{producer_path}', not foldable"
        )
    if (reason := usage.sharing_reason(producer, type(producer).__name__)) is not None:
        return fail(reason)
    if len(src.users) != 1:
        return fail(
            f"{type(producer).__name__} output has {len(src.users)} users, not only the BatchNorm"
        )
    out_channels = (
        producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    )
    if out_channels != bn.num_features:
        return fail(f"{out_channels} output channels but {bn.num_features} BatchNorm features")
    if (
        reason := _channel_axis_reason(producer, layout, bn, ranks, example_inputs)
    ) is not None:
        return fail(reason)
    return producer_path, None


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


def _apply_fold(
    root: nn.Module, producer_path: str, bn_path: str, layout: _ProducerLayout
) -> None:
    """Replace the producer's parameters with the folded ones and the BatchNorm with Identity."""
    producer = cast(_Producer, root.get_submodule(producer_path))
    bn = cast(_BatchNorm, root.get_submodule(bn_path))
    assert bn.running_mean is not None and bn.running_var is not None
    weight, bias = fold_bn_into_weights(
        producer.weight,
        producer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        transposed=layout.transposed,
        groups=getattr(producer, "groups", 1),
    )
    grad = producer.weight.requires_grad
    producer.weight = nn.Parameter(weight, requires_grad=grad)
    producer.bias = nn.Parameter(bias, requires_grad=grad)
    parent_path, _, name = bn_path.rpartition(".")
    setattr(root.get_submodule(parent_path), name, nn.Identity())


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


def _unseen_reason(path: str, untraceable: dict[str, str]) -> str:
    """Why a BatchNorm never appeared in a traced graph."""
    owners = [p for p in untraceable if p == "" or path.startswith(p + ".")]
    if owners:
        owner = max(owners, key=len)
        label = f"'{owner}'" if owner else "the module"
        return f"forward of {label} is not traceable by torch.fx ({untraceable[owner]})"
    return "not called in forward"
