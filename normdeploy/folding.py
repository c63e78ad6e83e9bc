"""The file flow around a graph pass: load → pass → verify → stage → write.

:func:`run_pass` applies a pass to a model (or a file, in memory) and checks the result against
the original on onnxruntime CPU with optimizations off; :func:`run_pass_on_file` does the same
from file to file, staging the output beside its target and renaming it into place only when the
check passed, so a failed check leaves no output behind. :func:`fold_bn` and :func:`fold_bn_file`
are these with :class:`~normdeploy.passes.fold_bn.FoldBatchNorm`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from normdeploy.errors import InvalidModelError, OutputPathError, VerificationFailed
from normdeploy.io import check_output_path, read_onnx, save_model_streaming, save_onnx
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.passes import FOLDED, KEPT, GraphPass, LedgerEntry, PassResult
from normdeploy.passes.fold_bn import FoldBatchNorm
from normdeploy.report import markdown_table, text_table
from normdeploy.verification.compare import Check, compare_graphs
from normdeploy.verification.float64 import Float64Graph
from normdeploy.verification.results import describe_verdict, worst

# A fold is per-channel arithmetic: one batch > 1 proves it as well as several, and each
# onnxruntime run of a large graph costs as much as reading it (BENCHMARKS.md, fold-bn).
CHECK_BATCH_SIZES = (2,)


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
        """True/False after a numerical check, None when it was not run."""
        return None if self.verification is None else all(self.verification)

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
        shapes = "; ".join(dict.fromkeys(c.input_shapes for c in self.verification))
        return (
            f"{status}: {self._verb} vs original on onnxruntime CPU (optimizations off), "
            f"{len(self.verification)} check(s) on {shapes or 'the stress inputs'}; worst "
            f"'{comp.name}': {describe_verdict(comp)}"
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
        measured = describe_verdict(comp) if comp.max_abs is not None else comp.detail
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


def run_pass(
    graph_pass: GraphPass,
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
) -> FoldResult:
    """Apply ``graph_pass`` to a model or file (in memory); verify against the original.

    A caller's ModelProto is copied first (one more copy of its weights) unless
    ``inplace=True``; a file is loaded and rewritten in memory. Raises VerificationFailed when
    the result differs from the original beyond the output dtype's tolerance.
    """
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
    # The float64 reference is made before the pass rewrites the proto (inplace, or a file's).
    truth = Float64Graph.of(work) if verify else None
    start = time.perf_counter()
    done = graph_pass(work, source)
    timings[graph_pass.stage] = time.perf_counter() - start
    checks = None
    if verify:
        start = time.perf_counter()
        checks = (
            compare_graphs(
                original, done.model, seed=seed, truth=truth, batch_sizes=CHECK_BATCH_SIZES
            )
            if done.modified
            else ()
        )
        timings["verify"] = time.perf_counter() - start
    result = _result(graph_pass, done, source, checks, timings)
    _raise_if_failed(result, "rewritten in place" if inplace else "the input was not changed")
    return result


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    """The external data files an (unloaded) model refers to."""
    files = set()
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            files.add((base / info.location).resolve())
    return files


def _check_data_file(loaded_path: Path, out: Path) -> None:
    # The header is small when the weights are external; it still names the data files.
    header = onnx.load_model(str(loaded_path), load_external_data=False)
    data_out = (out.parent / (out.name + ".data")).resolve()
    if data_out in _external_files(header, loaded_path.parent):
        raise OutputPathError(
            f"{out}: its external data file '{data_out.name}' is the input's; "
            "choose another output name"
        )


def _stage(model: onnx.ModelProto, staged: Path, external: bool, out: Path) -> None:
    if external:
        save_onnx(model, staged, external_data=True)
        return
    try:
        save_model_streaming(model, staged)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot write ({exc.strerror or exc})") from None


def run_pass_on_file(
    graph_pass: GraphPass,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    seed: int = 0,
) -> FoldResult:
    """Apply ``graph_pass`` to a file and write the result to another. The output is staged
    beside its target, verified against the input, and only then renamed into place.

    Keeps external data when the input had it (``OUT.data`` beside ``OUT``). The returned
    model is the new proto; after an external-data save its tensors point at that file.
    """
    out = check_output_path(output_path, inputs=(input_path,), overwrite=overwrite)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = read_onnx(input_path)
    if loaded.external_data:
        _check_data_file(loaded.path, out)
    source = str(loaded.path)
    timings["load"] = time.perf_counter() - start
    specs = graph_input_specs(loaded.model)
    truth = Float64Graph.of(loaded.model) if verify else None
    start = time.perf_counter()
    done = graph_pass(loaded.model, source)
    timings[graph_pass.stage] = time.perf_counter() - start
    _raise_if_invalid(graph_pass, done, source)
    checks: tuple[Check, ...] | None = None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        start = time.perf_counter()
        _stage(done.model, staged, loaded.external_data, out)
        timings["save"] = time.perf_counter() - start
        if verify:
            start = time.perf_counter()
            checks = (
                compare_graphs(
                    loaded.path,
                    staged,
                    seed=seed,
                    truth=truth,
                    specs=specs,
                    batch_sizes=CHECK_BATCH_SIZES,
                )
                if done.modified
                else ()
            )
            timings["verify"] = time.perf_counter() - start
        result = _result(graph_pass, done, source, checks, timings)
        _raise_if_failed(result, f"{out} not written")
        data = staged.parent / (out.name + ".data")
        if data.exists():
            os.replace(data, out.parent / data.name)
        os.replace(staged, out)
    return result


def fold_bn(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    verify: bool = True,
    inplace: bool = False,
    seed: int = 0,
) -> FoldResult:
    """Fold BatchNormalization in a model or file; verify against the original by default.

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
) -> FoldResult:
    """Fold a file into another (see :func:`run_pass_on_file`)."""
    return run_pass_on_file(
        FoldBatchNorm(), input_path, output_path, overwrite=overwrite, verify=verify, seed=seed
    )
