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
import inspect
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
    stage_onnx,
    staging_dir,
)
from normdeploy.modes import TrainModeReport, training_report
from normdeploy.onnx_graph import default_opset, graph_input_specs
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.verification.compare import (
    DEFAULT_POLICY,
    REFERENCE,
    Check,
    compare_graphs,
    compare_outputs,
    failed_check,
    pooled_floors,
)
from normdeploy.verification.feeds import batch_axes, make_feeds
from normdeploy.verification.results import describe_verdict, fmt_margin, worst
from normdeploy.verification.runners import (
    CPU,
    OrtRunner,
    TorchRunner,
    module_outputs,
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
_TRACE_BATCH = 2  # torch.export specializes a size-1 dim to a constant: trace at batch 2


@dataclass(frozen=True)
class BatchCheck:
    """The export check's records at one batch size (a view over :class:`Check` records)."""

    batch_size: int
    checks: tuple[Check, ...] = ()

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
            for c in group.checks:
                comp = c.comparison
                if comp.max_abs is None:
                    fail = f"FAIL: {comp.detail}"
                    rows.append([str(group.batch_size), comp.name, *["-"] * 6, fail])
                    continue
                rows.append([
                    str(group.batch_size), comp.name, c.input_shapes or "-",
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


def _input_names(module: torch.nn.Module, count: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


Axes = tuple[int | None, ...]  # per example input: its batch axis, None when not dynamic


def _batch_axes(
    module: torch.nn.Module,
    args: Sequence[Any],
    dynamic_batch: bool,
    batch_axis: int | Mapping[str, int] | None,
) -> Axes:
    """The dynamic batch axis of every example input (``batch_axis``: one for all, or by the
    forward's parameter name; default 0); None for non-tensors and when not dynamic."""
    import torch

    names = _input_names(module, len(args))
    if isinstance(batch_axis, Mapping) and (unknown := sorted(set(batch_axis) - set(names))):
        raise InvalidArgumentError(
            f"batch_axis: no input named {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(names)})"
        )
    axes: list[int | None] = []
    for name, x in zip(names, args, strict=True):
        if not dynamic_batch or not isinstance(x, torch.Tensor) or x.dim() == 0:
            axes.append(None)
            continue
        axis = batch_axis.get(name, 0) if isinstance(batch_axis, Mapping) else batch_axis or 0
        if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < x.dim():
            raise InvalidArgumentError(
                f"batch_axis: {axis!r} is not an axis of input '{name}' (shape {_shapes([x])})"
            )
        axes.append(axis)
    return tuple(axes)


def _trace_inputs(example_inputs: Sequence[Any], axes: Axes) -> tuple[Any, ...]:
    """Example inputs; a batch of 1 repeated to 2 so the batch dim stays symbolic."""
    out = []
    for x, axis in zip(example_inputs, axes, strict=True):
        if axis is not None and x.shape[axis] == 1:
            x = x.repeat(*[_TRACE_BATCH if i == axis else 1 for i in range(x.dim())])
        out.append(x)
    return tuple(out)


def _shapes(args: Sequence[Any]) -> str:
    return ", ".join(
        "x".join(map(str, a.shape)) if hasattr(a, "shape") else type(a).__name__ for a in args
    )


def _export_dynamo(
    module: torch.nn.Module, args: tuple[Any, ...], opset: int, axes: Axes
) -> onnx.ModelProto:
    import torch

    dynamic_shapes = None
    if any(a is not None for a in axes):
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple(None if a is None else {a: batch} for a in axes)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=max(opset, DYNAMO_NATIVE_OPSET),
        dynamic_shapes=dynamic_shapes,
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
    module: torch.nn.Module, args: tuple[Any, ...], opset: int, axes: Axes
) -> onnx.ModelProto:
    import torch

    n_out = len(module_outputs(module, args))
    input_names = _input_names(module, len(args))
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if any(a is not None for a in axes):
        dynamic_axes = {
            n: {a: "batch"} for n, a in zip(input_names, axes, strict=True) if a is not None
        }
        # Outputs carry the batch where the inputs do when they agree on one axis.
        shared = {a for a in axes if a is not None}
        out_axis = shared.pop() if len(shared) == 1 else 0
        dynamic_axes.update({n: {out_axis: "batch"} for n in output_names})
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        args,
        buffer,  # type: ignore[arg-type]  # a file-like object is documented and works
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
    )
    return onnx.load_from_string(buffer.getvalue())


def _static_batch_inputs(model: onnx.ModelProto, axes: Axes) -> list[str]:
    """Graph inputs whose batch dim is a fixed number (the exporter specialized the batch)."""
    dynamic = [a for a in axes if a is not None]
    return [
        f"{s.name}{list(s.shape)}"
        for s, axis in zip(graph_input_specs(model), dynamic, strict=False)
        if len(s.shape) > axis and isinstance(s.shape[axis], int)
    ]


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
    model: onnx.ModelProto, batch_sizes: tuple[int, ...]
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
        diffs = compare_graphs(model, simplified, batch_sizes=batch_sizes)
    except Exception as exc:
        note = f"simplified graph fails to run: {first_line(exc, 300, innermost=True)}"
        return model, SimplifyOutcome(True, False, before, after, note)
    culprit = worst([c for c in diffs if not c.passed])
    if culprit is not None:
        comp = culprit.comparison
        note = f"onnxsim changed numerics ({comp.name}: max abs {fmt_num(comp.max_abs)})"
        return model, SimplifyOutcome(True, False, before, after, note)
    return simplified, SimplifyOutcome(True, True, before, after)


def _batch_checks(
    model: onnx.ModelProto,
    eval_module: torch.nn.Module,
    batch_sizes: tuple[int, ...],
    seed: int,
) -> tuple[tuple[BatchCheck, ...], list[str]]:
    """onnxruntime vs PyTorch eval on seeded stress inputs at each batch size, judged by the
    tolerance policy against a float64 copy of the module; and notes."""
    import torch

    specs = graph_input_specs(model)
    names = [s.name for s in specs]
    runner = OrtRunner(model, CPU)
    try:
        outputs = runner.output_names
    except Exception as exc:  # a graph onnxruntime cannot load: every check fails with why
        return tuple(
            BatchCheck(
                b, (failed_check(REFERENCE, CPU, f"b{b}/seed{seed}", "onnxruntime", exc, b),)
            )
            for b in batch_sizes
        ), []
    eval32 = TorchRunner(eval_module, names, outputs)
    eval64: TorchRunner | None = TorchRunner(eval_module, names, outputs, dtype=torch.float64)
    notes: list[str] = []
    done: list[tuple[int, str, dict[str, Any], Any, Any, str]] = []
    failed: dict[int, Check] = {}
    axes = batch_axes(specs)  # the graph's dims named "batch"
    for batch in batch_sizes:
        feeds = make_feeds(specs, batch, seed, axes=axes)
        label = f"b{batch}/seed{seed}"
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        try:
            actual = runner.infer(feeds)
        except Exception as exc:
            failed[batch] = failed_check(REFERENCE, CPU, label, "onnxruntime", exc, batch)
            continue
        try:
            expected = eval32.infer(feeds)
        except InvalidArgumentError as exc:  # another number of outputs than the graph
            failed[batch] = failed_check(REFERENCE, CPU, label, "output matching", exc, batch)
            continue
        except Exception as exc:
            failed[batch] = failed_check(REFERENCE, CPU, label, "PyTorch eval", exc, batch)
            continue
        truth = None
        if eval64 is not None:
            try:
                truth = eval64.infer(feeds)
            except Exception as exc:  # no float64 copy: the nominal floor applies
                notes.append(f"the float64 copy of the module fails: {first_line(exc, 160)}")
                eval64 = None
        done.append((batch, label, expected, actual, truth, shapes))
    floors = (
        pooled_floors([d[2] for d in done], [d[4] for d in done])
        if done and all(d[4] is not None for d in done)
        else None
    )
    groups = []
    for batch in batch_sizes:
        if batch in failed:
            groups.append(BatchCheck(batch, (failed[batch],)))
            continue
        _, label, expected, actual, truth, shapes = next(d for d in done if d[0] == batch)
        checks = compare_outputs(
            expected, actual, kind=REFERENCE, provider=CPU, inputs=label,
            policy=DEFAULT_POLICY, batch_size=batch, suffix=f"@b{batch}",
            truth=truth if floors is not None else None, floors=floors, input_shapes=shapes,
        )  # fmt: skip
        groups.append(BatchCheck(batch, tuple(checks)))
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


def _run_in_eval(module: torch.nn.Module, args: tuple[Any, ...], name: str) -> torch.nn.Module:
    """An eval-mode copy that has run once on ``args``: a model that fails there is bad input."""
    eval_module = copy.deepcopy(module).eval()
    try:
        outputs = module_outputs(eval_module, args)
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
    return eval_module


def _run_exporter(
    exporter: str,
    eval_module: torch.nn.Module,
    trace_args: tuple[Any, ...],
    opset: int,
    axes: Axes,
    name: str,
) -> onnx.ModelProto:
    """The exporter's graph, checked for the requested opset and a symbolic batch."""
    export_fn = _export_dynamo if exporter == "dynamo" else _export_torchscript
    dynamic_batch = any(a is not None for a in axes)
    try:
        with exporter_quiet(logger.isEnabledFor(logging.INFO)), user_code(f"{name}'s forward"):
            model = export_fn(eval_module, trace_args, opset, axes)
    except ExportError:
        raise
    except Exception as exc:
        hint = " (try dynamic_batch=False)" if dynamic_batch else ""
        raise ExportError(
            f"{exporter} exporter failed on {name} at opset {opset}{hint}: "
            f"{type(exc).__name__}: {first_line(exc, 300, innermost=True)}"
        ) from None
    got_opset = default_opset(model)
    if got_opset != opset:
        raise ExportError(
            f"{exporter} exporter wrote opset {got_opset} for {name}, not the requested {opset} "
            "(its version conversion failed); use opset=18 or higher, or "
            "exporter='torchscript'"
        )
    if dynamic_batch and (fixed := _static_batch_inputs(model, axes)):
        raise ExportError(
            f"{exporter} exporter specialized the batch dimension of {name} "
            f"(inputs {', '.join(fixed)}); export with dynamic_batch=False or another exporter"
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
    batch_axis: int | Mapping[str, int] | None = None,
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

    eval_module = _run_in_eval(module, args, name)
    train = training_report(module, args)
    if train.was_training:
        logger.warning("%s: %s", name, train.summary())
    axes = _batch_axes(module, args, dynamic_batch, batch_axis)
    trace_args = _trace_inputs(args, axes)

    start = time.perf_counter()
    model = _run_exporter(exporter, eval_module, trace_args, opset, axes, name)
    timings["export"] = time.perf_counter() - start
    _set_metadata(model, {
        "source_model": source or name,
        "model_name": name,
        "exporter": f"{exporter} (torch {torch.__version__})",
        "opset": str(opset),
        "dynamic_batch": str(dynamic_batch).lower(),
        "version": __version__,
    })  # fmt: skip

    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES
    if not dynamic_batch:
        specs = graph_input_specs(model)
        axis = batch_axis if isinstance(batch_axis, int) else 0
        first = specs[0].shape[axis] if specs and len(specs[0].shape) > axis else None
        batch_sizes = (first if isinstance(first, int) else 1,)
    simplified = SimplifyOutcome(False)
    if (exporter == "torchscript") if simplify is None else simplify:
        start = time.perf_counter()
        model, simplified = _simplify(model, batch_sizes)
        timings["simplify"] = time.perf_counter() - start
        if not simplified.applied:
            notes.append(f"onnxsim result discarded: {simplified.note}")

    start = time.perf_counter()
    checks, check_notes = _batch_checks(model, eval_module, batch_sizes, seed)
    notes += check_notes
    timings["check"] = time.perf_counter() - start

    start = time.perf_counter()
    taken = census.inspect(model, module=eval_module, example_inputs=trace_args, seed=seed)
    taken = dataclasses.replace(taken, source=str(out))
    timings["census"] = time.perf_counter() - start

    start = time.perf_counter()
    external = needs_external_data(model)
    passed = all(c.passed for c in checks) and taken.passed
    written = out if passed else failed_file_for(out) if keep_failed else None
    if written is not None:
        with staging_dir(out.parent) as tmp:
            files = stage_onnx(
                model, tmp / written.name, external_data=external, target=written
            )
            plan.publish([(f, out.parent / f.name) for f in files])
    timings["save"] = time.perf_counter() - start
    return ExportResult(
        path=out,
        model_name=name,
        source=source or name,
        exporter=exporter,
        opset=opset,
        dynamic_batch=dynamic_batch,
        train_mode=train,
        batch_checks=checks,
        census=taken,
        simplify=simplified,
        external_data=external,
        timings=timings,
        notes=tuple(notes),
        written=written,
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
    input_shapes: Sequence[Sequence[int]] | None = None,
    **options: Any,
) -> ExportResult:
    """Resolve a MODEL spec (reference name or ``package.module:factory``) and export it."""
    from normdeploy.modelspec import resolve_model

    # The outputs first: building a model is work, and a bad -o should not wait for it.
    _plan_export(path, options.get("overwrite", False), options.get("keep_failed", False))
    resolved = resolve_model(spec, weights=weights, input_shapes=input_shapes)
    options.setdefault("model_name", resolved.name)
    options.setdefault("source", resolved.source)
    return export(resolved.module, resolved.example_inputs, path, **options)
