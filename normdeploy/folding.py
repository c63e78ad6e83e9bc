"""The file flow around a graph pass: plan → load → pass → stage → verify → write.

:func:`run_pass` applies a pass to a model (or a file, in memory) and checks the result against
the original on onnxruntime CPU with optimizations off; :func:`run_pass_on_file` does the same
from file to file: every file it will write is planned and checked first
(:class:`~normdeploy.io.OutputPlan`), the output is staged beside its target and published only
when the check passed, so a failed check leaves no output behind (``keep_failed`` keeps it as
``NAME.failed.onnx``). :func:`fold_bn` and :func:`fold_bn_file` are these with
:class:`~normdeploy.passes.fold_bn.FoldBatchNorm`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from normdeploy.arguments import check_bool, check_int, onnx_model_arg, path_arg
from normdeploy.errors import InvalidModelError, NormdeployError, VerificationFailed
from normdeploy.io import (
    OutputPlan,
    check_input_file,
    data_file_for,
    failed_file_for,
    model_header,
    read_onnx,
    restage_as,
    stage_onnx,
    staging_dir,
)
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.passes import FOLDED, KEPT, GraphPass, LedgerEntry, PassResult
from normdeploy.passes.fold_bn import FoldBatchNorm
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.verification.compare import (
    GRAPH_VS_ORIGINAL,
    Check,
    compare_graphs,
    failed_check,
)
from normdeploy.verification.feeds import make_feeds
from normdeploy.verification.results import worst
from normdeploy.verification.runners import CPU, OrtRunner, ort_message


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

    @property
    def folded(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.action == FOLDED]

    @property
    def applied(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.applied]

    @property
    def skipped(self) -> list[LedgerEntry]:
        return [e for e in self.ledger if e.action == KEPT]

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
        return "folded" if self.pass_name == "fold-bn" else "rewritten"

    def _rows(self) -> list[list[str]]:
        return [
            [
                e.node,
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
        culprit = worst(self.verification)
        assert culprit is not None
        comp = culprit.comparison
        status = "PASS" if self.verified else "FAIL"
        return (
            f"{status}: {self._verb} vs original on onnxruntime CPU (optimizations off), "
            f"{len(self.verification)} output(s) × batch sizes, worst '{comp.name}' "
            f"max |Δ| = {fmt_num(comp.max_abs)} (atol={comp.atol:g}, rtol={comp.rtol:g})"
            + (f"; {comp.detail}" if comp.detail else "")
        )

    def _summary(self) -> str:
        counts = Counter(e.action for e in self.applied if e.action != FOLDED)
        parts = [f"{len(self.folded)} of {len(self.ledger)} {self.subject} folded"]
        parts += [f"{n} {action}" for action, n in counts.items()]
        return ", ".join(parts) + f", {len(self.skipped)} kept"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "source": self.source,
            "folded": len(self.folded),
            "kept": len(self.skipped),
            "ledger": [e.to_dict() for e in self.ledger],
            "verified": self.verified,
            "checked": self.checked,
            "verification": None
            if self.verification is None
            else [c.to_dict() for c in self.verification],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def to_text(self) -> str:
        lines = [f"{self.pass_name} {self.source}: {self._summary()}"]
        if self.ledger:
            lines += ["", text_table((self.subject, *self._HEADERS), self._rows())]
        lines += ["", f"verification: {self._verify_line()}"]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"## {self.pass_name}: {self._summary()}", ""]
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
) -> FoldResult:
    return FoldResult(
        done.model, done.ledger, source, checks, timings, graph_pass.name, graph_pass.subject
    )


def _raise_if_failed(result: FoldResult, what: str) -> None:
    if result.verified is False:
        assert result.verification is not None
        culprit = worst(result.verification)
        assert culprit is not None
        comp = culprit.comparison
        measured = (
            f"max |Δ| {fmt_num(comp.max_abs)}, atol {comp.atol:g}, rtol {comp.rtol:g}"
            if comp.max_abs is not None
            else comp.detail
        )
        raise VerificationFailed(
            f"{result.source}: {result.pass_name} output differs from the original on output "
            f"'{comp.name}' ({measured}); {what}",
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


def _self_check(
    original: onnx.ModelProto | Path | bytes,
    rewritten: onnx.ModelProto | Path,
    source: str,
    pass_name: str,
    seed: int,
) -> tuple[Check, ...]:
    """The rewritten graph against the original on onnxruntime CPU (optimizations off).

    A graph onnxruntime cannot load or run is the input's fault when the original fails on its
    own (a user error naming the input); when only the rewrite fails it is a failed check.
    """
    try:
        return compare_graphs(original, rewritten, seed=seed)
    except NormdeployError:
        raise
    except Exception as exc:
        cause = exc
    skip = f"{pass_name} cannot check its result on it (verify=False skips the check)"
    try:
        runner = OrtRunner(original, CPU).open(source)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{exc}; {skip}") from None
    try:
        runner.infer(make_feeds(graph_input_specs(model_header(original)), 1, seed))
    except NormdeployError:
        raise
    except Exception as exc:
        raise InvalidModelError(
            f"{source}: onnxruntime cannot run it: {ort_message(exc)}; {skip}"
        ) from None
    return (
        failed_check(GRAPH_VS_ORIGINAL, CPU, "-", f"running the {pass_name} output", cause),
    )


def run_pass(
    graph_pass: GraphPass,
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
) -> FoldResult:
    """Apply ``graph_pass`` to a model, its bytes or a file (in memory); verify against the
    original.

    A caller's ModelProto is copied first (one more copy of its weights) unless
    ``inplace=True``; a file is loaded and rewritten in memory. Raises VerificationFailed when
    the result differs from the original beyond the output dtype's tolerance.
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
    start = time.perf_counter()
    done = graph_pass(work, source)
    timings[graph_pass.stage] = time.perf_counter() - start
    checks = None
    if verify:
        start = time.perf_counter()
        checks = (
            _self_check(original, done.model, source, graph_pass.name, seed)
            if done.modified
            else ()
        )
        timings["verify"] = time.perf_counter() - start
    result = _result(graph_pass, done, source, checks, timings)
    _raise_if_failed(result, "rewritten in place" if inplace else "the input was not changed")
    return result


def run_pass_on_file(
    graph_pass: GraphPass,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    seed: int = 0,
    keep_failed: bool = False,
) -> FoldResult:
    """Apply ``graph_pass`` to a file and write the result to another. Every file it may write
    is checked before the input is read; the output is staged beside its target, verified
    against the input, and only then published.

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
            checks = (
                _self_check(loaded.path, staged, source, graph_pass.name, seed)
                if done.modified
                else ()
            )
            timings["verify"] = time.perf_counter() - start
        result = _result(graph_pass, done, source, checks, timings)
        if result.verified is False and failed is not None:
            kept = restage_as(staged, failed.name)
            plan.publish([(f, failed.parent / f.name) for f in kept])
            _raise_if_failed(result, f"{out} not written; the graph is kept as {failed}")
        _raise_if_failed(result, f"{out} not written")
        plan.publish([(f, out.parent / f.name) for f in written])
    return result


def fold_bn(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
) -> FoldResult:
    """Fold BatchNormalization in a model, its bytes or a file; verify against the original by
    default.

    See :mod:`normdeploy.passes.fold_bn` for what folds and :func:`run_pass` for the flow.
    """
    return run_pass(FoldBatchNorm(), model, verify=verify, inplace=inplace, seed=seed)


def fold_bn_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    seed: int = 0,
    keep_failed: bool = False,
) -> FoldResult:
    """Fold a file into another (see :func:`run_pass_on_file`)."""
    return run_pass_on_file(
        FoldBatchNorm(), input_path, output_path, overwrite=overwrite, verify=verify,
        seed=seed, keep_failed=keep_failed,
    )  # fmt: skip
