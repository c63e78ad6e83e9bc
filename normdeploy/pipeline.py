"""The main job in one call: export → census → fold-bn (→ fuse-norms) → verify, with reports a
person reads. fuse-norms runs when the census found decomposed LayerNorm/RMSNorm; it never
changes the export's opset (the advice says which opset gives the native op).

For each model it writes ``model.onnx`` (the folded, verified graph), ``report.json`` and
``report.md`` into its output directory. A MODEL that cannot be resolved is bad input: nothing is
written. Every other failure is recorded: the reports (the diagnosis) are written, the model only
when it passed (``keep_failed`` keeps a failing graph as ``model.failed.onnx``). All files are
planned and checked before any work and staged in one directory that is removed however the run
ends. One failing model does not stop the others; the summary says which failed and at which
stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normdeploy.arguments import (
    batch_sizes_arg,
    check_bool,
    check_str,
    example_inputs_arg,
    optional_int,
    optional_path,
    optional_str,
    path_arg,
    providers_arg,
)
from normdeploy.census.patterns import (
    DECOMPOSED_LAYERNORM,
    DECOMPOSED_RMSNORM,
    DECOMPOSITION,
    GROUPNORM_TRICK,
    NATIVE_FOR,
)
from normdeploy.census.results import Lint, lint_groups, lint_line
from normdeploy.errors import (
    InvalidArgumentError,
    ModelSpecError,
    NormdeployError,
    OutputPathError,
    UserCodeError,
    VerificationFailed,
    WeightsError,
)
from normdeploy.io import (
    OutputPlan,
    data_file_for,
    failed_file_for,
    needs_external_data,
    restage_as,
    stage_onnx,
    staging_dir,
    write_text_atomic,
)
from normdeploy.progress import Progress
from normdeploy.report import fmt_num, markdown_table, name_list, render, text_table
from normdeploy.verification.runners import provider_alias

if TYPE_CHECKING:
    import torch

    from normdeploy.exporting import ExportResult
    from normdeploy.folding import FoldResult
    from normdeploy.modelspec import ResolvedModel
    from normdeploy.shapes import AxesRequest, BatchAxis, DtypeRequest, ShapeRequest
    from normdeploy.verification.results import VerifyResult

STAGES = ("export", "fold-bn", "fuse-norms", "verify")
MODEL_FILE, JSON_FILE, MD_FILE = "model.onnx", "report.json", "report.md"


@dataclass(frozen=True)
class DeployResult:
    """Everything one model's deployment did, with the evidence; truthy when it passed."""

    model_name: str
    out_dir: Path
    export: ExportResult | None = None
    fold: FoldResult | None = None
    verification: VerifyResult | None = None
    fuse: FoldResult | None = None  # fuse-norms, when the census found decomposed norms
    timings: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None
    error: str | None = None
    # The graph written: DIR/model.onnx when it passed, DIR/model.failed.onnx when it failed and
    # keep_failed asked for it, None when no graph was written.
    model_file: Path | None = None

    @property
    def passed(self) -> bool:
        return (
            self.failed_stage is None
            and self.export is not None
            and bool(self.export)
            and self.verification is not None
            and bool(self.verification)
        )

    def __bool__(self) -> bool:
        return self.passed

    # -- facts the summary and the reports share
    def norm_representations(self) -> dict[str, Counter[str]]:
        """Norm kind → Counter of how its modules were written ('folded', 'LayerNormalization')."""
        out: dict[str, Counter[str]] = {}
        if self.export is not None:
            for e in self.export.census.entries:
                out.setdefault(e.kind, Counter())[e.representation] += 1
        return out

    def bn_counts(self) -> dict[str, int]:
        """BatchNorm modules folded by the exporter, folded by fold-bn, merged by fold-bn into
        a Conv with the branches they were summed with, and kept."""
        by_exporter = 0
        if self.export is not None:
            by_exporter = sum(
                1
                for e in self.export.census.entries
                if e.kind == "BatchNorm" and e.representation == "folded"
            )
        folded = len(self.fold.folded) if self.fold is not None else 0
        merged = len(self.fold.merged) if self.fold is not None else 0
        kept = len(self.fold.skipped) if self.fold is not None else 0
        return {"exporter": by_exporter, "fold-bn": folded, "merged": merged, "kept": kept}

    def worst_error(self) -> float | None:
        if self.verification is None:
            return None
        return self.verification.worst_abs_error

    def providers(self) -> tuple[str, ...]:
        return () if self.verification is None else tuple(self.verification.providers)

    def advice(self) -> list[str]:
        """What a reader should do about anything flagged, in plain words; each thing once,
        with how many modules or nodes it concerns."""
        tips: list[str] = []
        if self.error:
            tips.append(f"{self.failed_stage} failed: {self.error}")
        if self.export is not None:
            train = self.export.train_mode
            if train.was_training:
                tips.append(
                    "The model was handed over in train mode; it was exported in eval mode. "
                    f"{train.summary()}. Call model.eval() before comparing outputs yourself."
                )
            tips += self._representation_tips()
            tips += self._fuse_tips()
            tips.extend(
                lint_line(lint, [f"`{n}`" for n in nodes])
                for lint, nodes in lint_groups(self._standing_lints())
            )
        if self.fold is not None:
            kept: dict[str, list[str]] = {}
            for entry in self.fold.skipped:
                kept.setdefault(entry.reason, []).append(f"`{entry.node}`")
            tips.extend(
                f"{len(nodes)} BatchNormalization kept ({reason}): {name_list(nodes)}. Each "
                "costs a separate pass at run time; folding needs constant statistics and a "
                "Conv/ConvTranspose/Gemm/MatMul neighbour whose output it alone reads."
                for reason, nodes in kept.items()
            )
        if self.verification is not None and not self.verification:
            tips.append(
                "onnxruntime disagrees with PyTorch eval: "
                + (self.verification.diagnosis or "see the comparison table")
            )
        return tips

    def _representation_tips(self) -> list[str]:
        """One tip per norm representation worth changing, naming the modules it concerns."""
        assert self.export is not None
        groups: dict[tuple[str, str], list[str]] = {}
        for e in self.export.census.entries:
            groups.setdefault((e.kind, e.representation), []).append(f"`{e.module_path}`")
        opset = self.export.opset
        tips = []
        for (kind, rep), paths in groups.items():
            many = len(paths) > 1
            what = f"{len(paths)} {kind} module{'s' if many else ''} ({name_list(paths)})"
            use, are = ("use", "are") if many else ("uses", "is")
            if rep == GROUPNORM_TRICK:
                tips.append(
                    f"{what} {use} the InstanceNormalization+Reshape construction at opset "
                    f"{opset}; opset 21 gives a native GroupNormalization op, which measured "
                    "slower on onnxruntime CPU (BENCHMARKS.md). Keep it unless your runtime "
                    "has a fused GroupNorm."
                )
            elif rep == DECOMPOSITION and self.fuse is not None:
                # fuse-norms ran on these; what it could not fuse, its notes and kept
                # entries say (with the opset that would allow it).
                if fused := self._fused_into(kind):
                    tips.append(
                        f"{what} {are} decomposed into elementwise ops by the exporter; "
                        f"fuse-norms rewrote {fused} pattern(s) into "
                        f"{NATIVE_FOR[_DECOMPOSED[kind]][0]} (checked against the unfused "
                        "graph)."
                    )
            elif rep == DECOMPOSITION and kind == "LayerNorm":
                tips.append(
                    f"{what} {are} decomposed into elementwise ops; export at opset >= 17 "
                    "(deploy --opset 17) for a native LayerNormalization (fewer kernels, no "
                    "fp16 overflow in Pow/ReduceMean)."
                )
            elif rep == DECOMPOSITION and kind == "RMSNorm":
                tips.append(
                    f"{what} {are} decomposed into elementwise ops; opset 23 has a native "
                    "RMSNormalization (onnxruntime 1.32 runs it), for runtimes with a fused "
                    "kernel and fp16 safety: deploy --opset 23 exports at that opset."
                )
        return tips

    def _standing_lints(self) -> list[Lint]:
        """The export census's lints, less those about decompositions fuse-norms replaced."""
        assert self.export is not None
        fused = set() if self.fuse is None else {e.node for e in self.fuse.applied}
        return [
            lint
            for lint in self.export.census.lints
            if not (lint.node in fused and lint.code in _GONE_WITH_THE_DECOMPOSITION)
        ]

    def _fused_into(self, kind: str) -> int:
        """How many patterns of norm ``kind`` fuse-norms rewrote into the native op."""
        if self.fuse is None or kind not in _DECOMPOSED:
            return 0
        op = NATIVE_FOR[_DECOMPOSED[kind]][0]
        return sum(1 for e in self.fuse.applied if e.target_op == op)

    def _fuse_tips(self) -> list[str]:
        """fuse-norms' kept patterns and look-alikes, grouped by reason; those kept for the
        opset are said by the census's decomposition lint (which names the opset)."""
        if self.fuse is None:
            return []
        kept: dict[str, list[str]] = {}
        for entry in self.fuse.skipped:
            if "needs opset" not in entry.reason:
                kept.setdefault(entry.reason, []).append(f"`{entry.node}`")
        return [
            f"{len(nodes)} norm pattern(s) left as they were ({reason}): {name_list(nodes)}."
            for reason, nodes in kept.items()
        ]

    def summary_row(self) -> list[str]:
        reps = self.norm_representations()
        norms = "; ".join(
            f"{kind}: " + ", ".join(f"{n}×{rep}" for rep, n in counter.items())
            for kind, counter in reps.items()
        )
        if self.fuse is not None and self.fuse.applied:
            norms += f"; fused by fuse-norms: {len(self.fuse.applied)}"
        bn = self.bn_counts()
        timing = " ".join(f"{s} {self.timings[s]:.1f}s" for s in STAGES if s in self.timings)
        return [
            self.model_name,
            norms or "-",
            f"{bn['exporter']}/{bn['fold-bn']}/{bn['merged']}/{bn['kept']}",
            ",".join(provider_alias(p) for p in self.providers()) or "-",
            fmt_num(self.worst_error()),
            "PASS" if self.passed else f"FAIL ({self.failed_stage or 'verify'})",
            timing,
        ]

    SUMMARY_HEADERS = (
        "model",
        "norm layers → representation",
        "BN folded by exporter/fold-bn/merged/kept",
        "providers",
        "worst |Δ|",
        "result",
        "time per stage",
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "out_dir": str(self.out_dir),
            "passed": self.passed,
            "failed_stage": self.failed_stage,
            "error": self.error,
            "model_file": None if self.model_file is None else str(self.model_file),
            "norm_representations": {
                k: dict(v) for k, v in self.norm_representations().items()
            },
            "batch_norm": self.bn_counts(),
            "providers": list(self.providers()),
            "worst_abs_error": self.worst_error(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "advice": self.advice(),
            "export": None if self.export is None else self.export.to_dict(),
            "fold_bn": None if self.fold is None else self.fold.to_dict(),
            "fuse_norms": None if self.fuse is None else self.fuse.to_dict(),
            "verify": None if self.verification is None else self.verification.to_dict(),
        }

    def to_text(self) -> str:
        lines = [text_table(self.SUMMARY_HEADERS, [self.summary_row()])]
        lines += [f"- {tip}" for tip in self.advice()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        out = [
            f"# Deployment report: `{self.model_name}` — {status}",
            "",
            "What was checked: the model was exported to ONNX in eval mode, every norm layer's "
            "representation was recorded and LayerNorm/GroupNorm confirmed numerically, every "
            "foldable BatchNorm was folded and summed parallel conv branches merged (and the "
            "result compared with the unfolded graph), "
            "decomposed LayerNorm/RMSNorm were fused into native ops where the opset has them "
            "(each compared with its decomposition), "
            "and the final graph was compared with PyTorch eval on onnxruntime.",
            "",
            markdown_table(self.SUMMARY_HEADERS, [self.summary_row()]),
            "",
        ]
        tips = self.advice()
        out += ["## What to do about it", ""]
        out += [f"- {t}" for t in tips] if tips else ["- Nothing flagged."]
        out.append("")
        for part in (self.export, self.fold, self.fuse, self.verification):
            if part is not None:
                out += [_demote(part.to_markdown()), ""]
        return "\n".join(out)


@dataclass(frozen=True)
class DeploySummary:
    """Results of several deployments; truthy when all passed."""

    results: tuple[DeployResult, ...]
    out_dir: Path

    @property
    def passed(self) -> bool:
        return all(self.results)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failed(self) -> list[str]:
        return [r.model_name for r in self.results if not r]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed": self.failed,
            "out_dir": str(self.out_dir),
            "models": [r.to_dict() for r in self.results],
        }

    def _rows(self) -> list[list[str]]:
        return [r.summary_row() for r in self.results]

    def to_text(self) -> str:
        n, bad = len(self.results), self.failed
        tail = "all passed" if not bad else f"FAILED: {', '.join(bad)}"
        return "\n".join(
            [
                text_table(DeployResult.SUMMARY_HEADERS, self._rows()),
                "",
                f"{n} model(s), {tail}. Reports: {self.out_dir}/<model>/report.md",
            ]
        )

    def to_markdown(self) -> str:
        out = [
            "# Deployment summary",
            "",
            markdown_table(DeployResult.SUMMARY_HEADERS, self._rows()),
        ]
        if self.failed:
            out += ["", f"Failed: {', '.join(self.failed)}"]
        out += ["", "Per-model reports: `<model>/report.md`."]
        return "\n".join(out)


def _demote(markdown: str) -> str:
    """Nest a part's Markdown one heading level deeper inside the model report."""
    return "\n".join(
        "#" + line if line.startswith("#") else line for line in markdown.splitlines()
    )


def _run_fold(exported: Path, merge: bool, shapes: dict[str, tuple[int, ...]]) -> FoldResult:
    from normdeploy.folding import fold_bn

    return fold_bn(exported, verify=True, merge=merge, input_shapes=shapes or None)


# The census kind of each norm's decomposition.
_DECOMPOSED = {"LayerNorm": DECOMPOSED_LAYERNORM, "RMSNorm": DECOMPOSED_RMSNORM}
# Census lints that a fused decomposition no longer earns (fp16 eps underflow still stands:
# the native op keeps the decomposition's epsilon).
_GONE_WITH_THE_DECOMPOSITION = ("decomposed-layernorm", "decomposed-rmsnorm", "fp16-norm")


def _run_fuse(folded: FoldResult, shapes: dict[str, tuple[int, ...]]) -> FoldResult:
    """fuse-norms on the folded graph, at its own opset, checked against it."""
    from normdeploy.folding import fuse_norms

    return fuse_norms(folded.model, verify=True, input_shapes=shapes or None)


def _run_verify(
    module: ResolvedModel,
    model_path: Path,
    providers: Sequence[str],
    batch_sizes: Sequence[int],
    batch_axis: BatchAxis | None,
    exported: ExportResult,
) -> VerifyResult:
    from normdeploy.verification.verifier import verify

    # The export check ran the module on the same inputs: verify takes its outputs.
    return verify(
        module, model_path, providers=providers, batch_sizes=tuple(batch_sizes),
        batch_axis=batch_axis, reference_outputs=exported.reference,
    )  # fmt: skip


def _check_feeds_fit(examples: Sequence[Any], batch_sizes: Sequence[int]) -> None:
    """Refuse, before any work, batch sizes whose inputs could not be allocated for verify."""
    from normdeploy.budget import check_allocation, generation_bytes

    shapes = [tuple(x.shape) for x in examples if hasattr(x, "shape") and len(x.shape)]
    if shapes:
        biggest = max(batch_sizes)
        need = sum(generation_bytes((biggest, *s[1:]), "float32") for s in shapes)
        check_allocation(
            f"verify inputs at batch size {biggest} ({', '.join(str(list(s[1:])) for s in shapes)}"
            " per sample)",
            need,
        )


def _plan_deploy(out: Path, overwrite: bool, keep_failed: bool) -> OutputPlan:
    """Every file deploy may write into ``out``, checked before any work."""
    plan = OutputPlan(overwrite=overwrite)
    plan.add_onnx(out / MODEL_FILE)
    if keep_failed:
        plan.add_onnx(failed_file_for(out / MODEL_FILE), "failed graph")
    for name in (JSON_FILE, MD_FILE):
        plan.add(out / name, "report")
    return plan


def _deploy_args(model: object, out_dir: object, options: dict[str, Any]) -> Path:
    import torch

    from normdeploy.shapes import input_shapes_arg

    if not isinstance(model, torch.nn.Module):
        check_str(model, "model")
    example_inputs_arg(options["example_inputs"])
    input_shapes_arg(options["input_shapes"])
    optional_str(options["model_name"], "model_name")
    out = path_arg(out_dir, "out_dir")
    providers_arg(options["providers"])
    optional_int(options["opset"], "opset")
    optional_str(options["exporter"], "exporter")
    batch_sizes_arg(options["batch_sizes"])
    optional_path(options["weights"], "weights")
    check_bool(options["overwrite"], "overwrite")
    check_bool(options["keep_failed"], "keep_failed")
    if options["progress"] is not None and not isinstance(options["progress"], Progress):
        raise InvalidArgumentError(
            f"progress: expected a normdeploy.progress.Progress, got "
            f"{type(options['progress']).__name__}"
        )
    return out


def deploy(
    model: str | torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    example_inputs: Sequence[Any] | Any | None = None,
    providers: Sequence[str] | str | None = None,
    opset: int | None = None,
    exporter: str | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    weights: str | os.PathLike[str] | None = None,
    input_shapes: ShapeRequest | None = None,
    input_dtypes: DtypeRequest | None = None,
    batch_axis: BatchAxis | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: AxesRequest | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    merge: bool = True,
    keep_failed: bool = False,
) -> DeployResult:
    """Export MODEL, fold its BatchNorms, verify the result, and write model + reports to out_dir.

    ``model`` is a MODEL name/spec (resolved as :func:`normdeploy.modelspec.resolve_model`
    does) or an ``nn.Module`` with ``example_inputs`` or ``input_shapes`` (and
    ``input_dtypes``), as :func:`~normdeploy.exporting.export` takes them; ``model_name``
    names it in the reports (default: the MODEL name, or the module's class). ``dynamic_axes``,
    ``dynamic_batch``, ``batch_axis``, ``input_names`` and ``output_names`` go to the export;
    fold-bn, fuse-norms and verify then feed the graph the example's sizes. ``merge`` (the
    default) lets fold-bn merge summed parallel conv branches (RepVGG-style blocks) into one
    Conv; ``merge=False`` keeps them.

    Stage failures are recorded in the result (and its reports), not raised, so callers can go on
    with other models; bad input (a MODEL that cannot be resolved, a module without example
    inputs or shapes, its weights, ``out_dir`` itself, arguments) is raised before anything is
    written.
    """
    from normdeploy.exporting import export
    from normdeploy.verification.feeds import validate_batch_sizes
    from normdeploy.verification.runners import resolve_providers

    out = _deploy_args(model, out_dir, dict(locals()))
    progress = progress or Progress(enabled=False)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: output directory is a file")
    if not out.parent.exists():
        raise OutputPathError(f"{out}: parent directory '{out.parent}' does not exist")
    batch_sizes = validate_batch_sizes(batch_sizes)  # bad arguments fail before any work
    choice = resolve_providers(providers)
    if out.is_dir():  # files that exist can only be there already: check them before any work
        _plan_deploy(out, overwrite, keep_failed)
    resolved = _resolve(model, example_inputs, weights, input_shapes, input_dtypes, model_name)
    _check_feeds_fit(resolved.example_inputs, batch_sizes)
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        plan = _plan_deploy(out, overwrite, keep_failed)
        for note in choice.notes:
            progress.note_once(note)  # once per run, however many models deploy_many deploys
        final = out / MODEL_FILE
        with staging_dir(out) as tmp:
            result = _deploy_staged(
                resolved, tmp, final, export, progress, choice.providers, batch_sizes,
                {
                    "opset": opset, "exporter": exporter, "batch_axis": batch_axis,
                    "dynamic_batch": dynamic_batch, "dynamic_axes": dynamic_axes,
                    "input_names": input_names, "output_names": output_names,
                },
                merge,
            )  # fmt: skip
            result = _publish(result, plan, tmp, final, keep_failed)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if this run made it and nothing landed in it
        raise
    return result


def _resolve(
    model: str | torch.nn.Module,
    example_inputs: Sequence[Any] | Any | None,
    weights: str | os.PathLike[str] | None,
    input_shapes: ShapeRequest | None,
    input_dtypes: DtypeRequest | None,
    model_name: str | None,
) -> ResolvedModel:
    """The module and example inputs to deploy: a MODEL resolved, or a module with its example
    inputs (or inputs made from ``input_shapes``); InvalidArgumentError when neither is given."""
    import torch

    from normdeploy.modelspec import (
        ResolvedModel,
        example_inputs_for,
        load_weights,
        resolve_model,
    )

    if isinstance(model, str):
        if example_inputs is not None:
            raise InvalidArgumentError(
                "example_inputs: a MODEL name brings its own; give input_shapes to change them"
            )
        resolved = resolve_model(
            model, weights=weights, input_shapes=input_shapes, input_dtypes=input_dtypes
        )
        return dataclasses.replace(resolved, name=model_name or resolved.name)
    assert isinstance(model, torch.nn.Module)
    examples = example_inputs_arg(example_inputs)
    if examples is None and input_shapes is None:
        raise InvalidArgumentError(
            f"example_inputs: deploy() of a module ({type(model).__name__}) needs its example "
            "inputs (example_inputs=(x,)) or their shapes (input_shapes=[(1, 3, 224, 224)])"
        )
    if weights is not None:
        load_weights(model, weights)
    if input_shapes is not None:
        examples = example_inputs_for(
            model, input_shapes, examples=examples, input_dtypes=input_dtypes
        )
    name = model_name or type(model).__name__
    return ResolvedModel(name, model, tuple(examples or ()), f"{name} (nn.Module)")


def _deploy_staged(
    resolved: Any,
    tmp: Path,
    final: Path,
    export: Any,
    progress: Progress,
    providers: Sequence[str],
    batch_sizes: Sequence[int],
    export_options: dict[str, Any],
    merge: bool,
) -> DeployResult:
    """Export → fold-bn → fuse-norms (when the census found decomposed norms) → verify inside
    the staging directory ``tmp``; the graph to publish is ``tmp/model.onnx`` (staged whatever
    the verdict, for keep_failed)."""
    out, model_name = final.parent, resolved.name
    timings: dict[str, float] = {}
    state: dict[str, Any] = {}
    stage = "export"
    staged = tmp / final.name
    try:
        with progress.stage(model_name, "export", timings):
            exported = export(
                resolved.module,
                resolved.example_inputs,
                tmp / "exported.onnx",
                model_name=resolved.name,
                source=resolved.source,
                keep_failed=True,  # a failing export still gets folded and verified: diagnosis
                **export_options,
            )
            # The exported graph lives in the staging dir; the report names the final file.
            state["export"] = dataclasses.replace(
                exported,
                path=final,
                census=dataclasses.replace(
                    exported.census, source=f"{final} (before fold-bn)"
                ),
            )
        stage = "fold-bn"
        try:
            # The graph's symbolic non-batch dims at the example's sizes (a dynamic H/W must
            # not fall back to a size the model cannot take).
            shapes = exported.example_shapes if _has_dynamic_dims(exported) else {}
            with progress.stage(model_name, "fold-bn", timings):
                state["fold"] = last = _run_fold(exported.written, merge, shapes)
            if set(_DECOMPOSED.values()) & set(exported.census.op_counts):
                stage = "fuse-norms"
                with progress.stage(model_name, "fuse-norms", timings):
                    state["fuse"] = last = _run_fuse(last, shapes)
        except VerificationFailed as exc:
            if exc.result is not None:  # the failing rewritten graph, for keep_failed
                failing = exc.result.model  # type: ignore[attr-defined]
                stage_onnx(failing, staged, external_data=needs_external_data(failing))
            raise
        unchanged = last is state["fold"] and not last.modified and last.conversion is None
        if unchanged and exported.written is not None:
            # fold-bn left the graph as exported: publish (and verify) the very file export
            # checked, whose onnxruntime outputs verify then finds in the export's memo.
            restage_as(exported.written, staged.name)
        else:
            stage_onnx(last.model, staged, external_data=needs_external_data(last.model))
        stage = "verify"
        with progress.stage(model_name, "verify", timings):
            state["verification"] = _run_verify(
                resolved, staged, list(providers), batch_sizes,
                export_options.get("batch_axis"), exported,
            )  # fmt: skip
        return DeployResult(model_name, out, timings=timings, **state)
    except NormdeployError as exc:
        return DeployResult(
            model_name, out, timings=timings, failed_stage=stage, error=str(exc), **state
        )


def _has_dynamic_dims(exported: ExportResult) -> bool:
    """Whether the export made an axis other than the batch symbolic."""
    return any(not d.startswith("batch ") for d in exported.dynamic_axes)


def _names_outside_staging(result: DeployResult, final: Path) -> DeployResult:
    """The parts named files in the staging directory (gone after the run): name the files a
    reader can find, or say that the graph was not written."""
    graph = str(result.model_file) if result.model_file else f"{final} (not written)"
    # Results are falsy when they failed: test for None, not truth.
    changes: dict[str, Any] = {}
    if result.export is not None:
        changes["export"] = dataclasses.replace(result.export, written=result.model_file)
    if result.fold is not None:
        changes["fold"] = dataclasses.replace(result.fold, source=f"{final} (before fold-bn)")
    if result.fuse is not None:
        changes["fuse"] = dataclasses.replace(
            result.fuse, source=f"{final} (before fuse-norms)"
        )
    if result.verification is not None:
        changes["verification"] = dataclasses.replace(result.verification, candidate=graph)
    return dataclasses.replace(result, **changes)


def _publish(
    result: DeployResult, plan: OutputPlan, tmp: Path, final: Path, keep_failed: bool
) -> DeployResult:
    """Publish the graph (when it passed, or as model.failed.onnx with keep_failed), then the
    reports, which are written whatever the verdict: they are the diagnosis."""
    staged = tmp / final.name
    written: Path | None = None
    if staged.exists() and (result.passed or keep_failed):
        target = final if result.passed else failed_file_for(final)
        if result.passed:
            files = [f for f in (data_file_for(staged), staged) if f.exists()]
        else:
            files = restage_as(staged, target.name)
        plan.publish([(f, final.parent / f.name) for f in files])
        written = target
    result = _names_outside_staging(dataclasses.replace(result, model_file=written), final)
    reports = []
    for name, fmt in ((JSON_FILE, "json"), (MD_FILE, "markdown")):
        (tmp / name).write_text(render(result, fmt), encoding="utf-8")
        reports.append((tmp / name, final.parent / name))
    plan.publish(reports)
    return result


def deploy_many(
    models: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    **options: Any,
) -> DeploySummary:
    """Deploy each model into ``out_dir/<model>/``; write ``summary.md``/``summary.json``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: output directory is a file")
    if not out.parent.exists():
        raise OutputPathError(f"{out}: parent directory '{out.parent}' does not exist")
    out.mkdir(exist_ok=True)
    progress = progress or Progress(enabled=False)
    overwrite = bool(options.get("overwrite", False))
    plan = OutputPlan(overwrite=overwrite)  # the summaries, checked before the first model
    for name in ("summary.json", "summary.md"):
        plan.add(out / name, "summary")
    for name in models:  # and every model's files, where a folder of that name exists
        if (out / name).is_dir():
            _plan_deploy(out / name, overwrite, bool(options.get("keep_failed", False)))
    results = []
    start = time.perf_counter()
    for i, name in enumerate(models, 1):
        progress.note(f"[{i}/{len(models)}] {name}")
        try:
            results.append(deploy(name, out / name, progress=progress, **options))
        except (ModelSpecError, WeightsError, UserCodeError) as exc:
            # One model that cannot be built does not stop the others: its report says why.
            failed = DeployResult(name, out / name, failed_stage="export", error=str(exc))
            (out / name).mkdir(exist_ok=True)
            write_text_atomic(
                out / name / JSON_FILE, render(failed, "json"), overwrite=overwrite
            )
            write_text_atomic(
                out / name / MD_FILE, render(failed, "markdown"), overwrite=overwrite
            )
            results.append(failed)
    summary = DeploySummary(tuple(results), out)
    write_text_atomic(out / "summary.json", render(summary, "json"), overwrite=overwrite)
    write_text_atomic(out / "summary.md", render(summary, "markdown"), overwrite=overwrite)
    progress.note(f"{len(models)} model(s) in {time.perf_counter() - start:.0f} s")
    return summary
