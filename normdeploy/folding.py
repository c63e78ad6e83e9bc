"""The file flow around a graph pass: plan → load → pass → stage → verify → write.

:func:`run_pass` applies a pass to a model (or a file, in memory) and checks the result against
the original on onnxruntime CPU with optimizations off; :func:`run_pass_on_file` does the same
from file to file: every file it will write is planned and checked first
(:class:`~normdeploy.io.OutputPlan`), the output is staged beside its target and published only
when the check passed, so a failed check leaves no output behind (``keep_failed`` keeps it as
``NAME.failed.onnx``). :func:`fold_bn` and :func:`fold_bn_file` are these with
:class:`~normdeploy.passes.fold_bn.FoldBatchNorm`, followed (``merge=True``, the default) by
:class:`~normdeploy.passes.merge_branches.MergeParallelBranches`; :func:`fuse_norms` and
:func:`fuse_norms_file` with :class:`~normdeploy.passes.fuse_norms.FuseNorms`, whose per-norm
confirmation runs here (:func:`confirm_outputs`).

With ``opset``, the whole model is first converted to that opset
(:mod:`normdeploy.passes.opset`) and the converted graph is proven to compute what the input
computes before the pass sees it; the final check is still against the input itself.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from normdeploy.arguments import check_bool, check_int, feeds_arg, onnx_model_arg, path_arg
from normdeploy.errors import (
    InvalidArgumentError,
    InvalidModelError,
    NormdeployError,
    VerificationFailed,
    first_line,
)
from normdeploy.io import (
    OutputPlan,
    check_input_file,
    data_file_for,
    failed_file_for,
    read_onnx,
    restage_as,
    stage_onnx,
    staging_dir,
)
from normdeploy.onnx_graph import default_opset, graph_input_specs
from normdeploy.passes import FOLDED, KEPT, MERGED, GraphPass, LedgerEntry, PassResult
from normdeploy.passes.fold_bn import FoldBatchNorm
from normdeploy.passes.fuse_norms import Confirmation, FuseNorms
from normdeploy.passes.merge_branches import FoldBatchNormAndMerge
from normdeploy.passes.opset import CONVERTER, convert_opset
from normdeploy.report import markdown_table, text_table
from normdeploy.shapes import InputPlan, ShapeRequest, input_shapes_arg, plan_inputs
from normdeploy.verification.compare import (
    GRAPH_VS_ORIGINAL,
    ArrayComparison,
    Check,
    compare_graphs,
    failed_check,
)
from normdeploy.verification.feeds import FeedSet, load_feeds, make_feeds, size_free_dims
from normdeploy.verification.float64 import Float64Graph
from normdeploy.verification.results import describe_verdict, worst
from normdeploy.verification.runners import CPU, OrtRunner, ort_message

# A rewrite by a pass is per-channel (or per-node) arithmetic: one batch > 1 proves it as well as
# several, and each onnxruntime run of a large graph costs as much as reading it (BENCHMARKS.md,
# fold-bn).
CHECK_BATCH_SIZES = (2,)


def _measured(comp: ArrayComparison) -> str:
    """The verdict's numbers (e, f, bound, margin), or why nothing was measured."""
    return describe_verdict(comp) if comp.max_abs is not None else comp.detail


def _checks_line(checks: tuple[Check, ...], what: str) -> str:
    """'PASS: <what> on onnxruntime CPU (optimizations off), N check(s) on <shapes>; worst …'."""
    culprit = worst(checks)
    assert culprit is not None
    comp = culprit.comparison
    status = "PASS" if all(checks) else "FAIL"
    shapes = "; ".join(dict.fromkeys(c.input_shapes for c in checks))
    return (
        f"{status}: {what} on onnxruntime CPU (optimizations off), {len(checks)} check(s) on "
        f"{shapes or 'the stress inputs'}; worst '{comp.name}': {describe_verdict(comp)}"
        + (f"; {comp.detail}" if comp.detail else "")
    )


@dataclass(frozen=True)
class OpsetConversion:
    """The whole model converted to a newer opset before a pass, and the proof that the
    converted graph computes what the input computes (None: not checked)."""

    from_opset: int | None
    to_opset: int
    tool: str
    checks: tuple[Check, ...] | None

    @property
    def verified(self) -> bool | None:
        return None if self.checks is None else all(self.checks)

    def line(self) -> str:
        head = f"opset {self.from_opset} → {self.to_opset} ({self.tool})"
        if not self.checks:
            return f"{head}: not verified (--no-verify)"
        return f"{head}: {_checks_line(self.checks, 'converted vs input')}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_opset": self.from_opset,
            "to_opset": self.to_opset,
            "tool": self.tool,
            "verified": self.verified,
            "checks": None if self.checks is None else [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class FoldResult:
    """A pass's output model, its ledger (one entry per candidate node) and the self-check."""

    model: onnx.ModelProto
    ledger: tuple[LedgerEntry, ...]
    source: str = "<model>"
    verification: tuple[Check, ...] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pass_name: str = "fold-bn"
    subject: str = "BatchNormalization"
    action: str = FOLDED  # what the summary counts: "3 of 4 … folded"
    notes: tuple[str, ...] = ()
    conversion: OpsetConversion | None = None

    @property
    def folded(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.action == FOLDED]

    @property
    def applied(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.applied]

    @property
    def skipped(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.action == KEPT and not e.op]

    @property
    def merged(self) -> list[LedgerEntry]:
        """Subject nodes merged into a neighbour (identity BatchNorms merged into a Conv)."""
        return [e for e in self.ledger if e.action == MERGED and not e.op]

    @property
    def sums(self) -> list[LedgerEntry]:
        """Entries of other nodes the pass rewrote or kept (the Add/Sum of merged branches)."""
        return [e for e in self.ledger if e.op]

    @property
    def modified(self) -> bool:
        return bool(self.applied)

    @property
    def verified(self) -> bool | None:
        """True/False after a numerical check, None when none ran (``verify=False``, or
        nothing changed so there was nothing to compare: :meth:`checked` says which)."""
        if not self.verification:
            return None
        return all(self.verification)

    @property
    def checked(self) -> str:
        """What the self-check compared, in words (the ``verification:`` line)."""
        return self._verify_line()

    def __bool__(self) -> bool:
        return self.verified is not False

    _HEADERS = ("graph", "result", "into", "detail")

    @property
    def _verb(self) -> str:
        return self.action

    def _rows(self) -> list[list[str]]:
        return [
            [
                f"{e.node} ({e.op})" if e.op else e.node,
                e.graph,
                f"{e.action} ({e.direction})" if e.direction else e.action,
                f"{e.target_op} {e.target}" if e.applied else "-",
                e.reason or "-",
            ]
            for e in self.ledger
        ]

    def _verify_line(self) -> str:
        if self.verification is None:
            return "not verified (--no-verify)"
        if not self.verification:
            return f"nothing {self._verb}: the graph is unchanged, nothing to check"
        what = self._verb if self.applied else "converted"  # only the opset changed
        return _checks_line(self.verification, f"{what} vs original")

    def _summary(self) -> str:
        subjects = [e for e in self.ledger if not e.op]
        counts = Counter(e.action for e in subjects if e.applied and e.action != self.action)
        done = sum(1 for e in subjects if e.action == self.action)
        parts = [f"{done} of {len(subjects)} {self.subject} {self.action}"]
        parts += [f"{n} {action}" for action, n in counts.items()]
        line = ", ".join(parts) + f", {len(self.skipped)} kept"
        if self.sums:
            done = sum(e.applied for e in self.sums)
            line += f"; {done} of {len(self.sums)} sums of parallel branches merged"
        return line

    def to_dict(self) -> dict[str, Any]:
        out = {
            "pass": self.pass_name,
            "source": self.source,
            "folded": len(self.folded),
            "kept": len(self.skipped),
            "merged": len(self.merged),
            "sums_merged": sum(e.applied for e in self.sums),
            "sums_kept": sum(not e.applied for e in self.sums),
            "ledger": [e.to_dict() for e in self.ledger],
            "verified": self.verified,
            "checked": self.checked,
            "verification": None
            if self.verification is None
            else [c.to_dict() for c in self.verification],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": list(self.notes),
            "opset_conversion": None if self.conversion is None else self.conversion.to_dict(),
        }
        if self.action != FOLDED:
            out[self.action] = sum(1 for e in self.ledger if e.action == self.action)
        return out

    def _preamble(self) -> list[str]:
        """The opset conversion and the notes, one line each."""
        lines = [] if self.conversion is None else [self.conversion.line()]
        return lines + list(self.notes)

    def to_text(self) -> str:
        lines = [f"{self.pass_name} {self.source}: {self._summary()}"]
        lines += [f"note: {line}" for line in self._preamble()]
        if self.ledger:
            lines += ["", text_table((self.subject, *self._HEADERS), self._rows())]
        lines += ["", f"verification: {self._verify_line()}"]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"## {self.pass_name}: {self._summary()}", ""]
        if preamble := self._preamble():
            out += [*(f"- {line}" for line in preamble), ""]
        if self.ledger:
            out += [markdown_table((self.subject, *self._HEADERS), self._rows()), ""]
        out.append(f"Verification: {self._verify_line()}")
        return "\n".join(out)


def _result(
    graph_pass: GraphPass,
    done: PassResult,
    source: str,
    checks: tuple[Check, ...] | None,
    timings: dict[str, float],
    conversion: OpsetConversion | None = None,
    notes: tuple[str, ...] = (),
) -> FoldResult:
    return FoldResult(
        done.model, done.ledger, source, checks, timings, graph_pass.name,
        graph_pass.subject, graph_pass.action, (*notes, *done.notes), conversion,
    )  # fmt: skip


def _raise_if_failed(result: FoldResult, what: str) -> None:
    if result.verified is False:
        assert result.verification is not None
        culprit = worst(result.verification)
        assert culprit is not None
        measured = _measured(culprit.comparison)
        raise VerificationFailed(
            f"{result.source}: {result.pass_name} output differs from the original on output "
            f"'{culprit.comparison.name}' ({measured}); {what}",
            result,
        )


def _raise_if_invalid(graph_pass: GraphPass, done: PassResult, source: str) -> None:
    """A node the pass kept because its own parameters compute NaN/inf: the input is broken."""
    if broken := next((e for e in done.ledger if e.invalid), None):
        raise InvalidModelError(
            f"{source}: {graph_pass.subject} '{broken.node}' has {broken.reason}; the input "
            "model itself computes NaN/inf there: fix its statistics"
        )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@dataclass
class CheckInputs:
    """What a pass's self-check feeds both graphs: the input shapes (see
    :mod:`normdeploy.shapes`), the batch sizes, and user feeds that run as well. Free symbolic
    dims are sized on the first comparison, by probing ``original`` until it runs."""

    original: onnx.ModelProto | Path | bytes
    source: str
    shapes: InputPlan
    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES
    extra: tuple[FeedSet, ...] = ()
    seed: int = 0

    def sized(self) -> InputPlan:
        """The shapes with every free symbolic dim sized (probed once, on first use)."""
        if self.shapes.free():
            runner = OrtRunner(self.original, CPU).open(self.source)
            self.shapes = size_free_dims(self.shapes, runner.infer, self.source, self.seed)
        return self.shapes

    def compare(
        self,
        original: onnx.ModelProto | Path | bytes,
        rewritten: onnx.ModelProto | Path,
        truth: Float64Graph | None,
    ) -> tuple[Check, ...]:
        shapes = self.sized()
        return compare_graphs(
            original, rewritten, seed=self.seed, truth=truth, specs=shapes.specs(),
            axes=shapes.axes(), batch_sizes=self.batch_sizes, extra=self.extra,
        )  # fmt: skip


def check_inputs(
    header: onnx.ModelProto,
    original: onnx.ModelProto | Path | bytes,
    source: str,
    *,
    verify: bool,
    input_shapes: ShapeRequest | None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None,
    seed: int,
) -> CheckInputs:
    """The self-check's inputs for ``original`` (``header``: its proto, weights not needed):
    ``input_shapes`` checked against its declared inputs, ``inputs`` (an ``.npz`` or a
    mapping) loaded and checked. Bad input is refused even when ``verify=False``, before any
    work."""
    specs = graph_input_specs(header)
    shapes = plan_inputs(specs, input_shapes=input_shapes_arg(input_shapes))
    if inputs is not None and not verify:
        raise InvalidArgumentError("inputs: verify=False runs no check to feed them")
    extra: tuple[FeedSet, ...] = ()
    if inputs is not None:
        label, feeds = load_feeds(feeds_arg(inputs) or {}, specs)
        extra = (FeedSet(label, None, feeds),)
    batch_sizes = (shapes.user_batch,) if shapes.user_batch else CHECK_BATCH_SIZES
    return CheckInputs(original, source, shapes, batch_sizes, extra, seed)


def _self_check(
    rewritten: onnx.ModelProto | Path,
    pass_name: str,
    inputs: CheckInputs,
    truth: Float64Graph | None = None,
) -> tuple[Check, ...]:
    """The rewritten graph against the original on onnxruntime CPU (optimizations off), with
    ``truth`` (a float64 copy of the original) as ground truth when there is one.

    A graph onnxruntime cannot load or run is the input's fault when the original fails on its
    own (a user error naming the input); when only the rewrite fails it is a failed check.
    """
    skip = f"{pass_name} cannot check its result on it (verify=False skips the check)"
    try:
        return inputs.compare(inputs.original, rewritten, truth)
    except InvalidModelError as exc:  # the original cannot be loaded, or run at any size
        raise InvalidModelError(f"{exc}; {skip}") from None
    except NormdeployError:
        raise
    except Exception as exc:
        cause = exc
    source = inputs.source
    try:
        runner = OrtRunner(inputs.original, CPU).open(source)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{exc}; {skip}") from None
    shapes = inputs.shapes
    feed_sets = [
        FeedSet("", None, make_feeds(shapes.specs(), inputs.batch_sizes[0], inputs.seed,
                                     axes=shapes.axes())),
        *inputs.extra,
    ]  # fmt: skip
    fs = feed_sets[0]
    try:
        for fs in feed_sets:
            runner.infer(fs.feeds)
    except NormdeployError:
        raise
    except Exception as exc:
        raise InvalidModelError(
            f"{source}: onnxruntime cannot run it on {fs.shapes()}: {ort_message(exc)}; {skip}"
        ) from None
    return (
        failed_check(GRAPH_VS_ORIGINAL, CPU, "-", f"running the {pass_name} output", cause),
    )


def _convert(
    graph_pass: GraphPass,
    work: onnx.ModelProto,
    opset: int | None,
    original: onnx.ModelProto | Path | bytes,
    source: str,
    *,
    verify: bool,
    seed: int,
    timings: dict[str, float],
    what: str,
    inputs: CheckInputs,
    truth: Float64Graph | None = None,
) -> OpsetConversion | None:
    """Convert ``work`` in place to ``opset`` (None, or the opset it has: nothing to do) and,
    when verifying, prove the converted graph equal to ``original`` before any pass runs."""
    current = default_opset(work)
    if opset is None or opset == current:
        return None
    start = time.perf_counter()
    converted = convert_opset(work, opset, source)
    work.CopyFrom(converted)
    del converted
    timings["convert"] = time.perf_counter() - start
    checks = None
    if verify:
        start = time.perf_counter()
        try:
            checks = inputs.compare(original, work, truth)
        except Exception as exc:  # onnxruntime's own error types
            raise InvalidModelError(
                f"{source}: the graph converted to opset {opset} cannot be checked: "
                f"onnxruntime: {first_line(exc)}"
            ) from None
        timings["verify-convert"] = time.perf_counter() - start
    conversion = OpsetConversion(current, opset, CONVERTER, checks)
    if conversion.verified is False:
        assert checks is not None
        comp = worst(checks)
        assert comp is not None
        raise VerificationFailed(
            f"{source}: converting opset {current} → {opset} changed output "
            f"'{comp.comparison.name}' ({_measured(comp.comparison)}); {what}",
            FoldResult(
                work,
                (),
                source,
                None,
                timings,
                graph_pass.name,
                graph_pass.subject,
                graph_pass.action,
                (),
                conversion,
            ),
        )
    return conversion


def run_pass(
    graph_pass: GraphPass,
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
    opset: int | None = None,
    input_shapes: ShapeRequest | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> FoldResult:
    """Apply ``graph_pass`` to a model, its bytes or a file (in memory); verify against the
    original.

    A caller's ModelProto is copied first (one more copy of its weights) unless
    ``inplace=True``; a file is loaded and rewritten in memory. With ``opset``, the model is
    converted to that opset (and checked) first. The check runs on seeded stress inputs of the
    graph's declared shapes: ``input_shapes`` (a shape per input, or ``{name: shape}``) sizes
    its symbolic dims, sizes at which the original runs are probed for the rest
    (:mod:`normdeploy.shapes`), and ``inputs`` (an ``.npz`` or a mapping) run as well. Raises
    VerificationFailed when the result differs from the original beyond the output dtype's
    tolerance.
    """
    model = onnx_model_arg(model, "model")
    check_bool(verify, "verify")
    check_bool(inplace, "inplace")
    check_int(seed, "seed")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    original: onnx.ModelProto | Path | bytes
    if isinstance(model, onnx.ModelProto):
        source, original = "<model>", model
        work = model if inplace else _copy(model)
        if inplace and verify:
            original = model.SerializeToString()  # the reference must not be the new proto
    else:
        loaded = read_onnx(model)
        source, original, work = str(loaded.path), loaded.path, loaded.model
    timings["load"] = time.perf_counter() - start
    what = "rewritten in place" if inplace else "the input was not changed"
    check_in = check_inputs(
        work, original, source, verify=verify, input_shapes=input_shapes, inputs=inputs,
        seed=seed,
    )  # fmt: skip
    # The float64 reference is made before the pass rewrites the proto (inplace, or a file's)
    # and before any opset conversion: it is the input's own.
    truth = Float64Graph.of(work) if verify else None
    conversion = _convert(
        graph_pass, work, opset, original, source, verify=verify, seed=seed,
        timings=timings, what=what, inputs=check_in, truth=truth,
    )  # fmt: skip
    start = time.perf_counter()
    done = graph_pass(work, source)
    timings[graph_pass.stage] = time.perf_counter() - start
    checks = None
    if verify:
        start = time.perf_counter()
        changed = done.modified or conversion is not None
        checks = _self_check(done.model, graph_pass.name, check_in, truth) if changed else ()
        timings["verify"] = time.perf_counter() - start
    result = _result(
        graph_pass, done, source, checks, timings, conversion, check_in.shapes.notes
    )
    _raise_if_failed(result, what)
    return result


def run_pass_on_file(
    graph_pass: GraphPass,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    seed: int = 0,
    opset: int | None = None,
    keep_failed: bool = False,
    input_shapes: ShapeRequest | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> FoldResult:
    """Apply ``graph_pass`` to a file and write the result to another. Every file it may write
    is checked before the input is read; the output is staged beside its target, verified
    against the input (on the inputs :func:`run_pass` describes), and only then published.
    With ``opset``, the model is converted to that opset (and checked) before the pass.

    Keeps external data when the input had it (``OUT.data`` beside ``OUT``). When the check
    fails nothing is written, or with ``keep_failed`` the graph is kept as ``NAME.failed.onnx``
    (then VerificationFailed names it). The returned model is the new proto; after an
    external-data save its tensors point at that file.
    """
    for flag, name in (
        (overwrite, "overwrite"),
        (verify, "verify"),
        (keep_failed, "keep_failed"),
    ):
        check_bool(flag, name)
    check_int(seed, "seed")
    plan = OutputPlan(overwrite=overwrite)
    path_arg(output_path, "output_path")
    src = check_input_file(path_arg(input_path, "input_path"), "ONNX")
    plan.add_input(src)
    out = plan.add(output_path)
    failed = plan.add(failed_file_for(out), "failed graph") if keep_failed else None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = read_onnx(src)
    plan.add_input(loaded.path, loaded.data_files)
    external = loaded.external_data
    if external:
        plan.add(data_file_for(out), "output's external data")
        if failed is not None:
            plan.add(data_file_for(failed), "failed graph's external data")
    source = str(loaded.path)
    timings["load"] = time.perf_counter() - start
    check_in = check_inputs(
        loaded.model, loaded.path, source, verify=verify, input_shapes=input_shapes,
        inputs=inputs, seed=seed,
    )  # fmt: skip
    # The float64 reference is the input's own: made before any conversion or rewrite.
    truth = Float64Graph.of(loaded.model) if verify else None
    conversion = _convert(
        graph_pass, loaded.model, opset, loaded.path, source, verify=verify, seed=seed,
        timings=timings, what=f"{out} not written", inputs=check_in, truth=truth,
    )  # fmt: skip
    start = time.perf_counter()
    done = graph_pass(loaded.model, source)
    timings[graph_pass.stage] = time.perf_counter() - start
    _raise_if_invalid(graph_pass, done, source)
    checks: tuple[Check, ...] | None = None
    with staging_dir(out.parent) as tmp:
        staged = tmp / out.name
        start = time.perf_counter()
        written = stage_onnx(done.model, staged, external_data=external, target=out)
        timings["save"] = time.perf_counter() - start
        if verify:
            start = time.perf_counter()
            changed = done.modified or conversion is not None
            checks = _self_check(staged, graph_pass.name, check_in, truth) if changed else ()
            timings["verify"] = time.perf_counter() - start
        result = _result(
            graph_pass, done, source, checks, timings, conversion, check_in.shapes.notes
        )
        if result.verified is False and failed is not None:
            kept = restage_as(staged, failed.name)
            plan.publish([(f, failed.parent / f.name) for f in kept])
            _raise_if_failed(result, f"{out} not written; the graph is kept as {failed}")
        _raise_if_failed(result, f"{out} not written")
        plan.publish([(f, out.parent / f.name) for f in written])
    return result


def _fold_pass(merge: bool) -> GraphPass:
    return FoldBatchNormAndMerge() if merge else FoldBatchNorm()


def fold_bn(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
    merge: bool = True,
    input_shapes: ShapeRequest | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> FoldResult:
    """Fold BatchNormalization in a model, its bytes or a file; verify against the original by
    default.

    With ``merge`` (the default) summed parallel branches on the same input are then merged
    into one Conv (RepVGG-style blocks: their identity BatchNorms go too). See
    :mod:`normdeploy.passes.fold_bn` and :mod:`normdeploy.passes.merge_branches` for what
    folds and merges, and :func:`run_pass` for the flow and the check's inputs.
    """
    return run_pass(
        _fold_pass(merge), model, verify=verify, inplace=inplace, seed=seed,
        input_shapes=input_shapes, inputs=inputs,
    )  # fmt: skip


def fold_bn_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    seed: int = 0,
    merge: bool = True,
    keep_failed: bool = False,
    input_shapes: ShapeRequest | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> FoldResult:
    """Fold a file into another (see :func:`run_pass_on_file` and :func:`fold_bn`)."""
    return run_pass_on_file(
        _fold_pass(merge), input_path, output_path, overwrite=overwrite, verify=verify,
        seed=seed, keep_failed=keep_failed, input_shapes=input_shapes, inputs=inputs,
    )  # fmt: skip


def confirm_outputs(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, *, seed: int = 0
) -> dict[str, Confirmation]:
    """Each output of ``candidate`` against the same-named output of ``reference`` (the one
    comparison, on stress inputs at batch 1 and 2): passed, and the numbers; every output
    fails with the cause when onnxruntime cannot run the pair."""
    try:
        checks = compare_graphs(reference, candidate, seed=seed)
    except Exception as exc:  # onnxruntime's own error types (an op it has no kernel for)
        why = Confirmation(False, f"onnxruntime cannot run the pair: {first_line(exc)}")
        return {o.name: why for o in candidate.graph.output}
    by_output: dict[str, list[Check]] = {}
    for check in checks:
        by_output.setdefault(check.comparison.name.rsplit("@", 1)[0], []).append(check)
    out = {}
    for name, group in by_output.items():
        culprit = worst(group)
        assert culprit is not None
        detail = _measured(culprit.comparison)
        passed = all(group)
        out[name] = Confirmation(
            passed, detail if passed else f"differs on stress inputs, {detail}"
        )
    return out


def _fuse_pass(verify: bool, seed: int) -> FuseNorms:
    if not verify:
        return FuseNorms()
    return FuseNorms(lambda ref, cand: confirm_outputs(ref, cand, seed=seed))


def fuse_norms(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    opset: int | None = None,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
    input_shapes: ShapeRequest | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> FoldResult:
    """Rewrite decomposed LayerNorm/RMSNorm as LayerNormalization/RMSNormalization in a model
    or file; each fused norm is confirmed against its decomposition, and the whole graph
    against the original, by default.

    The opset is never changed unless ``opset`` asks for it: then the model is converted first
    and the converted graph proven equal to the input. Without it, norms whose native op the
    model's opset lacks are kept and :attr:`FoldResult.notes` says which opset fuses them. See
    :mod:`normdeploy.passes.fuse_norms` for what fuses and :func:`run_pass` for the flow.
    """
    return run_pass(
        _fuse_pass(verify, seed), model, verify=verify, inplace=inplace, seed=seed,
        opset=opset, input_shapes=input_shapes, inputs=inputs,
    )  # fmt: skip


def fuse_norms_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    seed: int = 0,
    keep_failed: bool = False,
    input_shapes: ShapeRequest | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> FoldResult:
    """Fuse the norms of a file into another (see :func:`fuse_norms`, :func:`run_pass_on_file`);
    a file with nothing to fuse is written as it was."""
    return run_pass_on_file(
        _fuse_pass(verify, seed), input_path, output_path,
        overwrite=overwrite, verify=verify, seed=seed, opset=opset, keep_failed=keep_failed,
        input_shapes=input_shapes, inputs=inputs,
    )  # fmt: skip
