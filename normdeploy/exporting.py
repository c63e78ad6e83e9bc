"""PyTorch → ONNX with eval semantics enforced, a dynamic batch axis that is checked, and a census.

The caller's module is never touched: a deep copy is put in eval mode and exported. A module
handed over in train mode is reported (which submodules were training, and how far its train-mode
output is from eval on the example input, measured on another copy). The exported graph is run in
onnxruntime at batch 1 and batch 3 and compared with PyTorch eval before it is written.

Defaults (measured on the reference models with torch 2.13, see ``python cli.py export --help``):
the dynamo exporter (exports all 14 reference models with a dynamic batch at opsets 17/18/21 and
folds BatchNorm into Conv/ConvTranspose/Gemm; TorchScript fails on InstanceNorm with running
statistics and keeps BatchNormalization after ConvTranspose/Linear), opset 18 (dynamo's native
opset, native LayerNormalization, and GroupNorm as the InstanceNormalization+Reshape construction,
which onnxruntime CPU runs 2-3x faster than the native GroupNormalization-21; ``opset=21`` gives
the native op), and onnxsim only after the TorchScript exporter (dynamo's output is already
optimized).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from normdeploy import __version__, census
from normdeploy.arguments import (
    check_bool,
    check_int,
    example_inputs_arg,
    module_arg,
    optional_int,
    optional_str,
    path_arg,
)
from normdeploy.budget import release_memory
from normdeploy.census.modules import Confirmation
from normdeploy.census.results import Census
from normdeploy.errors import (
    ExportError,
    InvalidArgumentError,
    UserCodeError,
    first_line,
    user_code,
)
from normdeploy.io import (
    PROTOBUF_LIMIT,
    OutputPlan,
    data_file_for,
    failed_file_for,
    needs_external_data,
    restage_as,
    stage_onnx,
    staging_dir,
)
from normdeploy.modelspec import forward_input_names
from normdeploy.modes import TrainModeReport, training_report
from normdeploy.onnx_graph import default_opset, graph_input_specs, without_weight_data
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.shapes import (
    EXAMPLE,
    AxesRequest,
    DtypeRequest,
    DynamicDim,
    InputPlan,
    Shape,
    ShapeRequest,
    dynamic_axes_arg,
    dynamic_dims,
    names_arg,
    other_size,
    plan_inputs,
    requested_axes,
)
from normdeploy.verification.compare import (
    DEFAULT_POLICY,
    REFERENCE,
    Check,
    compare_graphs,
    compare_outputs,
    failed_check,
    pooled_floors,
)
from normdeploy.verification.feeds import FeedSet, leading_samples, make_feeds
from normdeploy.verification.results import describe_verdict, fmt_margin, worst
from normdeploy.verification.runners import (
    CPU,
    OrtRunner,
    ReferenceMemo,
    TorchRunner,
    named_module_outputs,
    ort_message,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
# Opsets the test matrix covers. LayerNormalization needs 17; GroupNormalization-18 has
# per-group scale/bias, 21 per-channel (PyTorch's semantics).
OFFERED_OPSETS = (17, 18, 21)
# 18: the dynamo exporter's native opset (no version conversion), native LayerNormalization,
# and GroupNorm as the InstanceNormalization construction, which onnxruntime CPU runs 2-3x
# faster than GroupNormalization-21 (BENCHMARKS.md, "Norm representations"). --opset 21 gives
# the native op for runtimes that have a fused GroupNorm kernel.
DEFAULT_OPSET = 18
MIN_OPSET = 13
DYNAMO_NATIVE_OPSET = 18  # the dynamo exporter writes >= 18; lower opsets are converted
CHECK_BATCH_SIZES = (1, 3)
METADATA_PREFIX = "normdeploy."
_TRACE_SIZE = 2  # torch.export specializes a size-1 dim to a constant: trace dynamic dims at 2


@dataclass(frozen=True)
class BatchCheck:
    """The export check's records at one batch size (a view over :class:`Check` records)."""

    batch_size: int
    checks: tuple[Check, ...] = ()
    label: str = ""  # the input set: 'b1/seed0', or 'b1/seed0 height=96' for another size

    @property
    def variant(self) -> str:
        """'height=96' for a dynamic dim at another size than the example's, else ''."""
        return self.label.partition(" ")[2]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks)

    @property
    def error(self) -> str:
        """Why a run failed (no statistics), or ''."""
        return next(
            (c.comparison.detail for c in self.checks if c.comparison.max_abs is None), ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "inputs": self.label,
            "passed": self.passed,
            "error": self.error,
            "comparisons": [
                c.comparison.to_dict() for c in self.checks if not self._failed(c)
            ],
        }

    @staticmethod
    def _failed(check: Check) -> bool:
        return check.comparison.max_abs is None and check.comparison.name == "-"


@dataclass(frozen=True)
class SimplifyOutcome:
    """Whether onnxsim ran, whether its graph was kept, and why not."""

    requested: bool
    applied: bool = False
    nodes_before: int | None = None
    nodes_after: int | None = None
    note: str = ""

    def summary(self) -> str:
        if not self.requested:
            return "not run"
        if self.applied:
            return f"applied ({self.nodes_before} → {self.nodes_after} nodes)"
        return f"kept the unsimplified graph: {self.note}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "applied": self.applied,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "note": self.note,
        }


@dataclass(frozen=True)
class ExportResult:
    """What was exported, how, and the evidence that it computes what PyTorch eval computes."""

    path: Path
    model_name: str
    source: str
    exporter: str
    opset: int
    dynamic_batch: bool
    train_mode: TrainModeReport
    batch_checks: tuple[BatchCheck, ...]
    census: Census
    simplify: SimplifyOutcome
    external_data: bool
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # The file written: ``path`` when the check passed, ``NAME.failed.onnx`` when it failed and
    # keep_failed asked for it, None when nothing was written.
    written: Path | None = None
    # Every symbolic dim of the graph's inputs: 'height (x:2)'; and each graph input's example
    # shape (what a pass's self-check on this graph feeds it).
    dynamic_axes: tuple[str, ...] = ()
    example_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # The module's outputs and float64 truth on the check's inputs, for a verify that follows
    # (deploy's); not part of the report.
    reference: ReferenceMemo | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """True when every batch check and every numerical census confirmation passed."""
        return all(c.passed for c in self.batch_checks) and self.census.passed

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "model_name": self.model_name,
            "source": self.source,
            "exporter": self.exporter,
            "opset": self.opset,
            "dynamic_batch": self.dynamic_batch,
            "dynamic_axes": list(self.dynamic_axes),
            "example_shapes": {k: list(v) for k, v in self.example_shapes.items()},
            "external_data": self.external_data,
            "written": None if self.written is None else str(self.written),
            "passed": self.passed,
            "train_mode": self.train_mode.to_dict(),
            "batch_checks": [c.to_dict() for c in self.batch_checks],
            "simplify": self.simplify.to_dict(),
            "census": self.census.to_dict(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": list(self.notes),
        }

    def _check_rows(self) -> list[list[str]]:
        rows = []
        for group in self.batch_checks:
            batch = ", ".join(filter(None, (str(group.batch_size), group.variant)))
            for c in group.checks:
                comp = c.comparison
                if comp.max_abs is None:
                    fail = f"FAIL: {comp.detail}"
                    rows.append([batch, comp.name, *["-"] * 6, fail])
                    continue
                rows.append([
                    batch, comp.name, c.input_shapes or "-",
                    fmt_num(comp.max_abs), fmt_num(comp.error), fmt_num(comp.floor_used),
                    fmt_num(comp.ratio), fmt_margin(comp), "ok" if comp.passed else "FAIL",
                ])  # fmt: skip
        return rows

    _CHECK_HEADERS = (
        "batch", "output", "inputs", "max abs", "error e", "floor f", "e/f", "margin",
        "result",
    )  # fmt: skip

    def failure_line(self) -> str:
        """One line for a failed export: the first failing check's cause and what was kept."""
        culprit = worst([c for g in self.batch_checks for c in g.checks if not c.passed])
        if culprit is not None:
            comp = culprit.comparison
            why = (
                comp.detail
                if comp.max_abs is None
                else f"output '{comp.name}' differs from PyTorch eval: {describe_verdict(comp)}"
            )
        else:
            why = "the census's numerical confirmation failed"
        kept = (
            f"kept as {self.written}"
            if self.written is not None
            else f"{self.path} not written (--keep-failed keeps it as NAME.failed.onnx)"
        )
        return f"FAIL: {why}; {kept}"

    def _written_words(self) -> str:
        if self.written is None:
            return (
                f"nothing: a check failed, so {self.path} was not written "
                "(--keep-failed keeps the failing graph as NAME.failed.onnx)"
            )
        extra = " (+ external data)" if self.external_data else ""
        if self.written != self.path:
            return f"{self.written}{extra} (the failing graph, kept; {self.path} not written)"
        return f"{self.written}{extra}"

    def _summary_pairs(self) -> list[tuple[str, str]]:
        timing = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        return [
            ("model", f"{self.model_name} ({self.source})"),
            ("written", self._written_words()),
            ("exporter", f"{self.exporter}, opset {self.opset}"),
            ("batch axis", "dynamic" if self.dynamic_batch else "static"),
            ("dynamic", ", ".join(self.dynamic_axes) or "none"),
            ("mode", self.train_mode.summary()),
            ("simplify", self.simplify.summary()),
            ("timings", timing),
            ("result", "PASS" if self.passed else "FAIL"),
        ]

    def to_text(self) -> str:
        lines = [f"{k + ':':12s} {v}" for k, v in self._summary_pairs()]
        lines += [
            "",
            "onnxruntime vs PyTorch eval:",
            text_table(self._CHECK_HEADERS, self._check_rows()),
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", self.census.to_text()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"## Export of `{self.model_name}`", ""]
        out += [f"- **{k}**: {v}" for k, v in self._summary_pairs()]
        out += [f"- note: {n}" for n in self.notes]
        out += ["", markdown_table(self._CHECK_HEADERS, self._check_rows()), ""]
        out.append(self.census.to_markdown())
        return "\n".join(out)


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def exporter_quiet(verbose: bool = False) -> Iterator[None]:
    """Silence exporter chatter: Python warnings, prints and C++ writes to fds 1 and 2."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        py_out = io.StringIO()
        try:
            with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_out):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            chatter = py_out.getvalue() + sink.read().decode("utf-8", "replace")
            if chatter.strip():
                logger.debug("exporter output:\n%s", chatter[-4000:])


@dataclass(frozen=True)
class ExportInterface:
    """The graph's interface: input names (one per example input), output names (None: the
    exporter's), and its dynamic dims."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...] | None
    dims: tuple[DynamicDim, ...]
    n_outputs: int

    @property
    def dynamic_batch(self) -> bool:
        return any(d.batch for d in self.dims)

    def describe(self) -> tuple[str, ...]:
        """'height (x:2)' per dynamic dim."""
        return tuple(f"{d.symbol} ({d.where(self.input_names)})" for d in self.dims)

    def without(self, dim: DynamicDim) -> str:
        """What to ask for instead of ``dim``: the other dynamic axes of its first input."""
        i, axis = dim.members[0]
        kept = [a for d in self.dims if d is not dim for j, a in d.members if j == i]
        if not kept:
            return f"leave axis {axis} static (dynamic_batch=False)"
        name = self.input_names[i]
        return f"leave axis {axis} static, e.g. dynamic_axes={name}={','.join(map(str, kept))}"


def _batch_axes(
    names: Sequence[str], args: Sequence[Any], batch_axis: int | Mapping[str, int] | None
) -> list[int | None]:
    """The batch axis of every tensor example input (``batch_axis``: one for all, or by the
    forward's parameter name; default 0); None for non-tensors and scalars."""
    import torch

    if isinstance(batch_axis, Mapping) and (unknown := sorted(set(batch_axis) - set(names))):
        raise InvalidArgumentError(
            f"batch_axis: no input named {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(names)})"
        )
    axes: list[int | None] = []
    for name, x in zip(names, args, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            axes.append(None)
            continue
        axis = batch_axis.get(name, 0) if isinstance(batch_axis, Mapping) else batch_axis or 0
        if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < x.dim():
            raise InvalidArgumentError(
                f"batch_axis: {axis!r} is not an axis of input '{name}' (shape {_shapes([x])})"
            )
        axes.append(axis)
    return axes


def _interface(
    module: torch.nn.Module,
    args: Sequence[Any],
    output_keys: Sequence[str | None],
    *,
    dynamic_batch: bool,
    dynamic_axes: AxesRequest | None,
    batch_axis: int | Mapping[str, int] | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
) -> ExportInterface:
    """Input and output names and dynamic dims from the arguments (see :func:`export`)."""
    import torch

    forward = forward_input_names(module, len(args))
    names = names_arg(input_names, "input_names")
    if names is not None and len(names) != len(args):
        raise InvalidArgumentError(
            f"input_names: {len(names)} name(s) for {len(args)} input(s) "
            f"({', '.join(forward)})"
        )
    graph_names = names or tuple(forward)
    outputs = _output_names(output_keys, names_arg(output_names, "output_names"), graph_names)
    axes_request = dynamic_axes_arg(dynamic_axes)
    if axes_request is not None and not dynamic_batch:
        raise InvalidArgumentError(
            "dynamic_axes: give dynamic_axes=() for a static export, not dynamic_axes with "
            "dynamic_batch=False"
        )
    if not dynamic_batch:
        axes_request = ()
    if isinstance(axes_request, Mapping):  # NAME=AXES names the forward's (or given) inputs
        axes_request = {
            graph_names[forward.index(k)] if k in forward and k not in graph_names else k: v
            for k, v in axes_request.items()
        }
    batch = _batch_axes(forward, args, batch_axis)
    tensors = [x if isinstance(x, torch.Tensor) else None for x in args]
    ranks = [None if x is None else x.dim() for x in tensors]
    wanted = requested_axes(graph_names, ranks, axes_request, batch)
    shapes = [None if x is None else tuple(int(n) for n in x.shape) for x in tensors]
    return ExportInterface(
        tuple(graph_names),
        outputs,
        dynamic_dims(graph_names, shapes, wanted, batch),
        len(output_keys),
    )


def _output_names(
    keys: Sequence[str | None], given: Sequence[str] | None, inputs: Sequence[str]
) -> tuple[str, ...] | None:
    """The graph's output names: ``given``, else the dict keys of the model's output (unkeyed
    outputs ``output_{i}``), else None (the exporter names them)."""
    if given is not None:
        if len(given) != len(keys):
            raise InvalidArgumentError(
                f"output_names: {len(given)} name(s) for {len(keys)} output(s) of the model"
            )
        if clash := sorted(set(given) & set(inputs)):
            raise InvalidArgumentError(
                f"output_names: {', '.join(map(repr, clash))} is also an input name"
            )
        return tuple(given)
    if all(k is None for k in keys):
        return None
    names = tuple(k if k is not None else f"output_{i}" for i, k in enumerate(keys))
    if len(set(names)) != len(names) or set(names) & set(inputs):
        return None  # keys that cannot name ONNX values uniquely: the exporter's names
    return names


def _trace_inputs(
    example_inputs: Sequence[Any], dims: Sequence[DynamicDim]
) -> tuple[Any, ...]:
    """Example inputs; a dynamic dim of size 1 repeated to 2 so that it stays symbolic."""
    out = list(example_inputs)
    for dim in dims:
        if dim.size != 1:
            continue
        for i, axis in dim.members:
            x = out[i]
            out[i] = x.repeat(*[_TRACE_SIZE if j == axis else 1 for j in range(x.dim())])
    return tuple(out)


def _shapes(args: Sequence[Any]) -> str:
    return ", ".join(
        "x".join(map(str, a.shape)) if hasattr(a, "shape") else type(a).__name__ for a in args
    )


def _export_dynamo(
    module: torch.nn.Module, args: tuple[Any, ...], opset: int, interface: ExportInterface
) -> onnx.ModelProto:
    import torch

    dynamic_shapes = None
    if interface.dims:
        per_input: list[dict[int, Any] | None] = [None] * len(args)
        for dim in interface.dims:
            shared = torch.export.Dim(dim.symbol, min=1)  # one object: one symbolic dim
            for i, axis in dim.members:
                per_input[i] = {**(per_input[i] or {}), axis: shared}
        dynamic_shapes = tuple(per_input)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=max(opset, DYNAMO_NATIVE_OPSET),
        dynamic_shapes=dynamic_shapes,
        # Graph inputs are the tensors among the arguments.
        input_names=[
            n for n, a in zip(interface.input_names, args, strict=True) if torch.is_tensor(a)
        ],
        output_names=None if interface.output_names is None else list(interface.output_names),
        optimize=True,
        verbose=False,
    )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportError("dynamo exporter returned no program")
    model = program.model_proto
    if opset >= DYNAMO_NATIVE_OPSET:
        return model
    # torch's own down-conversion leaves some graphs at 18 (e.g. ReduceMean from adaptive
    # pooling) and drops node metadata; onnx's converter handles them, metadata is restored.
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted)  # the converter can leave newer attributes behind
    except Exception as exc:
        raise ExportError(
            f"dynamo exporter: converting opset {DYNAMO_NATIVE_OPSET} to {opset} failed: "
            f"{first_line(exc, 300, innermost=True)}; use opset={DYNAMO_NATIVE_OPSET} or higher"
        ) from None
    restore_node_metadata(model, converted)
    return converted


def _export_torchscript(
    module: torch.nn.Module, args: tuple[Any, ...], opset: int, interface: ExportInterface
) -> onnx.ModelProto:
    import torch

    n_out = interface.n_outputs
    output_names = list(
        interface.output_names
        or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    )
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if interface.dims:
        dynamic_axes = {}
        for dim in interface.dims:
            for i, axis in dim.members:
                dynamic_axes.setdefault(interface.input_names[i], {})[axis] = dim.symbol
        # Outputs carry the batch where the inputs do when they agree on one axis; their
        # other dims follow from the graph.
        if batch := next((d for d in interface.dims if d.batch), None):
            shared = {a for d in interface.dims if d.batch for _, a in d.members}
            out_axis = shared.pop() if len(shared) == 1 else 0
            dynamic_axes.update({n: {out_axis: batch.symbol} for n in output_names})
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        args,
        buffer,  # type: ignore[arg-type]  # a file-like object is documented and works
        dynamo=False,
        opset_version=opset,
        input_names=list(interface.input_names),
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
    )
    return onnx.load_from_string(buffer.getvalue())


def _specialized(
    model: onnx.ModelProto, interface: ExportInterface
) -> list[tuple[DynamicDim, str, int, int]]:
    """(dim, input, axis, size) for every dynamic axis the graph fixed to a number."""
    specs = graph_input_specs(model)
    by_name = {s.name: s for s in specs}
    out = []
    for dim in interface.dims:
        for i, axis in dim.members:
            name = interface.input_names[i]
            spec = by_name.get(name) or (specs[i] if i < len(specs) else None)
            size = spec.shape[axis] if spec is not None and len(spec.shape) > axis else None
            if spec is not None and isinstance(size, int):
                out.append((dim, spec.name, axis, size))
    return out


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value


def restore_node_metadata(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """Copy node metadata (module scopes, rewrite rules) back by node name, in place.

    onnxsim and onnx's version converter drop it; the nodes they keep keep their names.
    """
    meta = {n.name: list(n.metadata_props) for n in original.graph.node if n.name}
    for node in rewritten.graph.node:
        if node.name in meta and not node.metadata_props:
            node.metadata_props.extend(meta[node.name])


def _simplify(
    model: onnx.ModelProto, batch_sizes: tuple[int, ...], shapes: InputPlan
) -> tuple[onnx.ModelProto, SimplifyOutcome]:
    """onnxsim, kept only if it succeeds and gives the same outputs; node metadata restored."""
    before = len(model.graph.node)
    if model.ByteSize() > PROTOBUF_LIMIT // 2:
        return model, SimplifyOutcome(True, False, before, None, "model too large for onnxsim")
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        note = f"onnxsim failed: {first_line(exc, 300, innermost=True)}"
        return model, SimplifyOutcome(True, False, before, None, note)
    if not ok:
        return model, SimplifyOutcome(True, False, before, None, "onnxsim's own check failed")
    restore_node_metadata(model, simplified)
    after = len(simplified.graph.node)
    try:
        diffs = compare_graphs(
            model, simplified, batch_sizes=batch_sizes, specs=shapes.specs(),
            axes=shapes.axes(),
        )  # fmt: skip
    except Exception as exc:
        note = f"simplified graph fails to run: {first_line(exc, 300, innermost=True)}"
        return model, SimplifyOutcome(True, False, before, after, note)
    culprit = worst([c for c in diffs if not c.passed])
    if culprit is not None:
        comp = culprit.comparison
        note = f"onnxsim changed numerics ({comp.name}: max abs {fmt_num(comp.max_abs)})"
        return model, SimplifyOutcome(True, False, before, after, note)
    return simplified, SimplifyOutcome(True, True, before, after)


def _graph_examples(
    model: onnx.ModelProto, args: Sequence[Any], interface: ExportInterface
) -> list[Any]:
    """The example input of every graph input, matched by name (an exporter may drop an input
    the model never reads), else by position among the tensors; [] when they do not match."""
    import torch

    specs = graph_input_specs(model)
    named = {
        n: a for n, a in zip(interface.input_names, args, strict=True) if torch.is_tensor(a)
    }
    if all(s.name in named for s in specs):
        return [named[s.name] for s in specs]
    tensors = list(named.values())
    return tensors if len(tensors) == len(specs) else []


def _example_shapes(model: onnx.ModelProto, examples: Sequence[Any]) -> dict[str, Shape]:
    """Graph input name → the shape of its example input ({} when they do not match)."""
    specs = graph_input_specs(model)
    if len(examples) != len(specs):
        return {}
    return {
        s.name: tuple(int(n) for n in x.shape) for s, x in zip(specs, examples, strict=True)
    }


@dataclass(frozen=True)
class _CheckSet:
    """One input set of the export check; ``dim``: the dynamic dim run at ``size`` (another
    size than the example's), None for the example's sizes."""

    feeds: FeedSet
    dim: DynamicDim | None = None
    size: int = 0

    @property
    def key(self) -> str:
        return self.feeds.label


def _check_sets(
    shapes: InputPlan,
    interface: ExportInterface,
    batch_sizes: tuple[int, ...],
    seed: int,
) -> tuple[list[_CheckSet], list[str]]:
    """The example's sizes at each batch size, and each non-batch dynamic dim at another size
    (:func:`~normdeploy.shapes.other_size`) at the first batch size; notes."""
    specs, axes = shapes.specs(), shapes.axes()
    # As verify draws them (smaller batches are the largest one's leading samples): deploy's
    # verify then finds the reference's outputs on them already computed.
    full = make_feeds(specs, max(batch_sizes), seed, axes=axes)
    sets = [
        _CheckSet(FeedSet(f"b{b}/seed{seed}", b, leading_samples(full, specs, axes, b), seed))
        for b in batch_sizes
    ]
    notes = []
    for dim in interface.dims:
        if dim.batch:
            continue
        if shapes.size_of(dim.symbol) is None:
            notes.append(
                f"dynamic dim '{dim.symbol}' is not a dim of the graph's inputs: not checked "
                "at another size"
            )
            continue
        other = other_size(dim.size)
        sized = shapes.sized({dim.symbol: other}, EXAMPLE)
        b = batch_sizes[0]
        feeds = make_feeds(sized.specs(), b, seed, axes=sized.axes())
        label = f"b{b}/seed{seed} {dim.symbol}={other}"
        sets.append(_CheckSet(FeedSet(label, b, feeds, seed), dim, other))
    return sets, notes


def _rejected(name: str, check: _CheckSet, interface: ExportInterface, exc: Exception) -> str:
    """The one line for a model that rejects a dynamic dim at another size."""
    assert check.dim is not None
    i, axis = check.dim.members[0]
    what = "" if isinstance(exc, UserCodeError) else f"{type(exc).__name__}: "
    return (
        f"dynamic_axes: {name} rejects {check.dim.symbol}={check.size} (axis {axis} of input "
        f"'{interface.input_names[i]}', {check.dim.size} in the example), which the graph "
        f"makes dynamic: {what}{first_line(exc, 200, innermost=True)}; "
        f"{interface.without(check.dim)}"
    )


def _export_checks(
    model: onnx.ModelProto,
    staged: Path,
    eval_module: torch.nn.Module,
    sets: Sequence[_CheckSet],
    interface: ExportInterface,
    name: str,
    confirmation: Confirmation | None = None,
    memo: ReferenceMemo | None = None,
) -> tuple[tuple[BatchCheck, ...], list[str]]:
    """onnxruntime (a session of ``staged``, the file ``model`` was written to) vs PyTorch
    eval on each input set, judged by the tolerance policy against the module in float64; and
    notes. A model that fails at another size of a dynamic dim rejects that dim:
    InvalidArgumentError naming axis and size.

    ``eval_module`` is export's own eval copy, run as it is: first in float32 on every set,
    then converted to float64 in place for the truth (so that the float64 reference costs no
    second copy; export needs the module no further). ``confirmation`` (the census's, on the
    first set's feeds) rides on the first set's forwards and takes its graph run in between.
    ``memo`` receives the module's outputs and truth on every set that ran.
    """
    import torch

    specs = graph_input_specs(model)
    names = [s.name for s in specs]
    release_memory()  # what the exporter freed, before the check's first peak
    runner = OrtRunner(str(staged), CPU)
    try:
        outputs = runner.output_names
    except Exception as exc:  # a graph onnxruntime cannot load: every check fails with why
        why = ort_message(exc)  # without the staged file's path
        return tuple(
            BatchCheck(
                c.feeds.batch_size or 0,
                (failed_check(REFERENCE, CPU, c.key, "onnxruntime", why, c.feeds.batch_size),),
                c.key,
            )
            for c in sets
        ), []
    eval32 = TorchRunner(eval_module, names, outputs, owned=True)
    notes: list[str] = []
    done: dict[str, tuple[Any, Any]] = {}
    failed: dict[str, Check] = {}
    ran_torch = False

    def confirming(check: _CheckSet, float64: bool) -> contextlib.AbstractContextManager[None]:
        """The census's hooks on the first set's forward (float32 or float64), else none."""
        if confirmation is None or check is not sets[0]:
            return contextlib.nullcontext()
        hooks = confirmation.float64_hooks if float64 else confirmation.float32_hooks
        return hooks(eval_module)

    for check in sets:
        fs, label, batch = check.feeds, check.key, check.feeds.batch_size
        expected = None
        # Another size of a dynamic dim: the model first, does it take that size at all? Only
        # where it ran at the example's sizes (sets come in that order): else the failure is
        # not the size's.
        if check.dim is not None and ran_torch:
            try:
                expected = eval32.infer(fs.feeds)
            except InvalidArgumentError:
                raise
            except Exception as exc:
                raise InvalidArgumentError(_rejected(name, check, interface, exc)) from None
        try:
            actual = runner.infer(fs.feeds)
        except Exception as exc:
            failed[label] = failed_check(REFERENCE, CPU, label, "onnxruntime", exc, batch)
            continue
        if expected is None:
            try:
                with confirming(check, float64=False):
                    expected = eval32.infer(fs.feeds)
            except InvalidArgumentError as exc:  # another number of outputs than the graph
                failed[label] = failed_check(
                    REFERENCE, CPU, label, "output matching", exc, batch
                )
                continue
            except Exception as exc:
                if confirmation is not None and check is sets[0]:
                    confirmation.float32_failed(exc)
                failed[label] = failed_check(REFERENCE, CPU, label, "PyTorch eval", exc, batch)
                continue
        ran_torch = True
        done[label] = (expected, actual)
    # Each stage's memory goes back before the next one's peak: the session before the
    # census's graph run, the census's values (released by the first float64 forward) before
    # the larger batches' float64 forwards.
    del runner
    release_memory()
    if confirmation is not None:
        confirmation.run_graph()
        release_memory()
    truths: dict[str, Any] = {}
    if done:
        try:
            eval64 = TorchRunner(eval_module, names, outputs, dtype=torch.float64, owned=True)
            for check in sets:
                if check.key in done:
                    with confirming(check, float64=True):
                        truths[check.key] = eval64.infer(check.feeds.feeds)
                    if check is sets[0]:
                        release_memory()
        except Exception as exc:  # no float64 module: the nominal floor applies
            notes.append(f"the float64 copy of the module fails: {first_line(exc, 160)}")
            if confirmation is not None:
                confirmation.float64_failed(exc)
            truths = {}
    if memo is not None:
        for check in sets:
            if check.key in done:
                expected, actual = done[check.key]
                memo.add(check.feeds.feeds, expected, truths.get(check.key))
                memo.add_graph_run(staged, CPU, check.feeds.feeds, actual)
    floors = (
        pooled_floors([d[0] for d in done.values()], [truths[k] for k in done])
        if done and len(truths) == len(done)
        else None
    )
    groups = []
    for check in sets:
        label, batch = check.key, check.feeds.batch_size or 0
        if label in failed:
            groups.append(BatchCheck(batch, (failed[label],), label))
            continue
        expected, actual = done[label]
        suffix = f"@b{batch}" + (f",{check.dim.symbol}={check.size}" if check.dim else "")
        checks = compare_outputs(
            expected, actual, kind=REFERENCE, provider=CPU, inputs=label,
            policy=DEFAULT_POLICY, batch_size=batch, suffix=suffix,
            truth=truths.get(label) if floors is not None else None, floors=floors,
            input_shapes=check.feeds.shapes(),
        )  # fmt: skip
        groups.append(BatchCheck(batch, tuple(checks), label))
    return tuple(groups), notes


def _validate(exporter: str, opset: int) -> None:
    if exporter not in EXPORTERS:
        raise InvalidArgumentError(
            f"exporter: '{exporter}' is not one of {', '.join(EXPORTERS)}"
        )
    max_opset = onnx.defs.onnx_opset_version()
    if (
        not isinstance(opset, int)
        or isinstance(opset, bool)
        or not MIN_OPSET <= opset <= max_opset
    ):
        raise InvalidArgumentError(
            f"opset: {opset} is outside {MIN_OPSET}..{max_opset} "
            f"(tested: {', '.join(map(str, OFFERED_OPSETS))})"
        )


def _example_args(example_inputs: Sequence[Any] | Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _run_in_eval(
    module: torch.nn.Module, args: tuple[Any, ...], name: str
) -> tuple[torch.nn.Module, list[tuple[str | None, Any]]]:
    """An eval-mode copy that has run once on ``args`` (a model that fails there is bad
    input), and its outputs, each with its dict key (None where there is none)."""
    eval_module = copy.deepcopy(module).eval()
    try:
        outputs = named_module_outputs(eval_module, args)
    except Exception as exc:
        what = "" if isinstance(exc, UserCodeError) else f"{type(exc).__name__}: "
        raise InvalidArgumentError(
            f"{name}: the model fails in eval mode on example inputs of shape {_shapes(args)}: "
            f"{what}{first_line(exc, 300, innermost=True)}"
        ) from None
    if not outputs:
        raise InvalidArgumentError(
            f"{name}: the model returns no tensors on example inputs of shape {_shapes(args)} "
            "(forward returned None or no tensor); an ONNX graph needs at least one output"
        )
    return eval_module, outputs


_EXPORT_FN = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _call_exporter(
    exporter: str,
    eval_module: torch.nn.Module,
    trace_args: tuple[Any, ...],
    opset: int,
    interface: ExportInterface,
    name: str,
) -> onnx.ModelProto:
    """One exporter's graph, its chatter silenced and the model's code guarded."""
    with exporter_quiet(logger.isEnabledFor(logging.INFO)), user_code(f"{name}'s forward"):
        return _EXPORT_FN[exporter](eval_module, trace_args, opset, interface)


def _what_works(
    exporter: str,
    eval_module: torch.nn.Module,
    trace_args: tuple[Any, ...],
    opset: int,
    interface: ExportInterface,
    name: str,
) -> str:
    """After ``exporter`` failed: the first of the other exporter, a static export, and the
    other exporter static that exports the model, in words; or that they fail too."""
    other = next(e for e in EXPORTERS if e != exporter)
    static = dataclasses.replace(interface, dims=())
    tries = [(other, interface, f"exporter='{other}' exports it")]
    if interface.dims:
        tries += [
            (exporter, static, "dynamic_batch=False exports it: the dynamic axes fail"),
            (other, static, f"exporter='{other}' with dynamic_batch=False exports it"),
        ]
    for candidate, iface, words in tries:
        try:
            _call_exporter(candidate, eval_module, trace_args, opset, iface, name)
        except Exception:  # this one fails too: try the next
            continue
        return words
    static_too = " and a static export" if interface.dims else ""
    return f"the {other} exporter{static_too} fail as well"


def _run_exporter(
    exporter: str,
    eval_module: torch.nn.Module,
    trace_args: tuple[Any, ...],
    opset: int,
    interface: ExportInterface,
    name: str,
) -> onnx.ModelProto:
    """The exporter's graph, checked for the requested opset and the dynamic axes asked for.
    On failure the message says which alternative exports the model (:func:`_what_works`)."""
    try:
        model = _call_exporter(exporter, eval_module, trace_args, opset, interface, name)
    except ExportError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {first_line(exc, 300, innermost=True)}"
        works = _what_works(exporter, eval_module, trace_args, opset, interface, name)
        raise ExportError(
            f"{exporter} exporter failed on {name} at opset {opset}: {why}; {works}"
        ) from None
    got_opset = default_opset(model)
    if got_opset != opset:
        raise ExportError(
            f"{exporter} exporter wrote opset {got_opset} for {name}, not the requested {opset} "
            "(its version conversion failed); use opset=18 or higher, or "
            "exporter='torchscript'"
        )
    fixed = _specialized(model, interface)
    if batch := [f"{inp}[axis {axis} = {size}]" for d, inp, axis, size in fixed if d.batch]:
        raise ExportError(
            f"{exporter} exporter specialized the batch dimension of {name} "
            f"(inputs {', '.join(batch)}); export with dynamic_batch=False or another exporter"
        )
    if fixed:
        dim, inp, axis, size = fixed[0]
        raise InvalidArgumentError(
            f"dynamic_axes: {name} fixes axis {axis} of input '{inp}' ({dim.symbol}) at "
            f"{size}: the {exporter} exporter made it static, so it cannot be dynamic; "
            f"{interface.without(dim)}"
        )
    return model


def export(
    module: torch.nn.Module,
    example_inputs: Sequence[Any] | Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    exporter: str | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: AxesRequest | None = None,
    batch_axis: int | Mapping[str, int] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    simplify: bool | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    source: str | None = None,
    seed: int = 0,
    keep_failed: bool = False,
) -> ExportResult:
    """Export ``module`` in eval mode to ``path``, check it in onnxruntime, and take its census.

    The dynamic batch dim (named ``batch``) is axis 0 of every tensor input unless
    ``batch_axis`` says another (one for all, or by the forward's parameter name).
    ``dynamic_axes`` makes other axes symbolic too: axis indices for every input (``(0, 1)``
    for batch and sequence, ``(0, 2, 3)`` for batch, height and width; an index beyond an
    input's rank is ignored for it) or ``{name: axes}``; ``()`` or ``dynamic_batch=False`` for
    none. The same axis index on several inputs whose example sizes agree is one dim (token
    ids and their attention mask); see :func:`normdeploy.shapes.dynamic_dims` for the names.
    The check runs the example's sizes at batch 1 and 3 and each other dynamic dim at another
    size (:func:`normdeploy.shapes.other_size`); a model that rejects that size is an
    InvalidArgumentError naming the axis. ``input_names``/``output_names`` name the graph's
    inputs and outputs; a model returning a dict names its outputs by the keys.
    ``simplify=None`` runs onnxsim after the TorchScript exporter only. The result is falsy when
    onnxruntime disagrees with PyTorch eval beyond the tolerance policy; then nothing is
    written, or with ``keep_failed`` the graph is kept as ``NAME.failed.onnx``
    (``ExportResult.written`` says which).
    """
    import torch

    exporter = exporter or DEFAULT_EXPORTER
    opset = DEFAULT_OPSET if opset is None else opset
    module_arg(module)
    plan = _plan_export(path, overwrite, keep_failed)
    if example_inputs is None:
        raise InvalidArgumentError("example_inputs: expected a tensor or a tuple of inputs")
    example_inputs_arg(example_inputs)
    optional_str(exporter, "exporter")
    optional_int(opset, "opset")
    check_bool(dynamic_batch, "dynamic_batch")
    if simplify is not None:
        check_bool(simplify, "simplify")
    optional_str(model_name, "model_name")
    optional_str(source, "source")
    check_int(seed, "seed")
    _validate(exporter, opset)
    out = plan.files[0].path
    args = _example_args(example_inputs)
    name = model_name or type(module).__name__
    timings: dict[str, float] = {}
    notes: list[str] = []

    eval_module, eval_outputs = _run_in_eval(module, args, name)
    interface = _interface(
        module, args, [key for key, _ in eval_outputs], dynamic_batch=dynamic_batch,
        dynamic_axes=dynamic_axes, batch_axis=batch_axis, input_names=input_names,
        output_names=output_names,
    )  # fmt: skip
    train = training_report(module, args, [array for _, array in eval_outputs])
    del eval_outputs
    if train.was_training:
        logger.warning("%s: %s", name, train.summary())
    trace_args = _trace_inputs(args, interface.dims)

    start = time.perf_counter()
    model = _run_exporter(exporter, eval_module, trace_args, opset, interface, name)
    timings["export"] = time.perf_counter() - start
    _set_metadata(model, {
        "source_model": source or name,
        "model_name": name,
        "exporter": f"{exporter} (torch {torch.__version__})",
        "opset": str(opset),
        "dynamic_batch": str(interface.dynamic_batch).lower(),
        "dynamic_axes": ", ".join(interface.describe()),
        "version": __version__,
    })  # fmt: skip

    examples = _graph_examples(model, args, interface)
    shapes = plan_inputs(graph_input_specs(model), examples=examples)
    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES
    if not interface.dynamic_batch:
        specs = graph_input_specs(model)
        axis = batch_axis if isinstance(batch_axis, int) else 0
        first = specs[0].shape[axis] if specs and len(specs[0].shape) > axis else None
        batch_sizes = (first if isinstance(first, int) else 1,)
    simplified = SimplifyOutcome(False)
    if (exporter == "torchscript") if simplify is None else simplify:
        start = time.perf_counter()
        model, simplified = _simplify(model, batch_sizes, shapes)
        timings["simplify"] = time.perf_counter() - start
        if not simplified.applied:
            notes.append(f"onnxsim result discarded: {simplified.note}")

    # The graph is staged first: onnxruntime's sessions are made from the staged file (the
    # weights are not held twice while it reads them), which is published only if it passes.
    taken = census.inspect(model)  # before staging: external data leaves the tensors on disk
    external = needs_external_data(model)
    written: Path | None = None
    with staging_dir(out.parent) as tmp:
        start = time.perf_counter()
        staged = tmp / out.name
        files = stage_onnx(model, staged, external_data=external, target=out)
        # What follows reads the graph, and runs the staged file: the weights need not be
        # held a second time (beside the module's) while the check's forwards run.
        model = without_weight_data(model)
        timings["save"] = time.perf_counter() - start

        start = time.perf_counter()
        sets, set_notes = _check_sets(shapes, interface, batch_sizes, seed)
        # The census confirms every norm module on the first set's feeds, during the check's
        # own forwards on them.
        confirmation = (
            Confirmation(model, eval_module, sets[0].feeds.feeds, staged=staged)
            if sets
            else None
        )
        memo = ReferenceMemo(train_mode=train)
        checks, check_notes = _export_checks(
            model, staged, eval_module, sets, interface, name, confirmation, memo
        )
        del eval_module  # float64 by now, and needed no further
        notes += set_notes + check_notes
        timings["check"] = time.perf_counter() - start

        start = time.perf_counter()
        entries, census_notes = confirmation.result() if confirmation else ([], [])
        taken = dataclasses.replace(
            taken, source=str(out), entries=tuple(entries), notes=tuple(census_notes)
        )
        timings["census"] = time.perf_counter() - start

        passed = all(c.passed for c in checks) and taken.passed
        if passed:
            plan.publish([(f, out.parent / f.name) for f in files])
            written = out
        elif keep_failed:
            failed = failed_file_for(out)
            plan.publish([(f, out.parent / f.name) for f in restage_as(staged, failed.name)])
            written = failed
    return ExportResult(
        path=out,
        model_name=name,
        source=source or name,
        exporter=exporter,
        opset=opset,
        dynamic_batch=interface.dynamic_batch,
        dynamic_axes=interface.describe(),
        example_shapes=_example_shapes(model, examples),
        train_mode=train,
        batch_checks=checks,
        census=taken,
        simplify=simplified,
        external_data=external,
        timings=timings,
        notes=tuple(notes),
        written=written,
        reference=memo,
    )


def _plan_export(path: object, overwrite: object, keep_failed: object) -> OutputPlan:
    """Every file export may write, checked before any work: the model, its external data
    (written only past 2 GB, planned always), and with ``keep_failed`` the failing graph."""
    plan = OutputPlan(overwrite=check_bool(overwrite, "overwrite"))
    out = plan.add_onnx(path_arg(path, "path"))
    if check_bool(keep_failed, "keep_failed"):
        failed = plan.add(failed_file_for(out), "failed graph")
        plan.add(data_file_for(failed), "failed graph's external data")
    return plan


def export_model(
    spec: str,
    path: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    input_shapes: ShapeRequest | None = None,
    input_dtypes: DtypeRequest | None = None,
    **options: Any,
) -> ExportResult:
    """Resolve a MODEL spec (reference name or ``package.module:factory``) and export it;
    ``input_shapes``/``input_dtypes`` make its example inputs
    (:func:`normdeploy.modelspec.example_inputs_for`)."""
    from normdeploy.modelspec import resolve_model

    # The outputs first: building a model is work, and a bad -o should not wait for it.
    _plan_export(path, options.get("overwrite", False), options.get("keep_failed", False))
    resolved = resolve_model(
        spec, weights=weights, input_shapes=input_shapes, input_dtypes=input_dtypes
    )
    options.setdefault("model_name", resolved.name)
    options.setdefault("source", resolved.source)
    return export(resolved.module, resolved.example_inputs, path, **options)
