"""The main job in one call: export → census → fold-bn → verify, with reports a person reads.

For each model it writes ``model.onnx`` (the folded, verified graph), ``report.json`` and
``report.md`` into its output directory. One failing model does not stop the others; the summary
says which failed and at which stage.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normdeploy.errors import NormdeployError, OutputPathError
from normdeploy.io import check_output_path, save_onnx, write_text_atomic
from normdeploy.progress import Progress
from normdeploy.report import fmt_num, markdown_table, render, text_table
from normdeploy.verification.runners import provider_alias

if TYPE_CHECKING:
    import torch

    from normdeploy.exporting import ExportResult
    from normdeploy.folding import FoldResult
    from normdeploy.verification.feeds import BatchAxis
    from normdeploy.verification.results import VerifyResult

STAGES = ("export", "fold-bn", "verify")
MODEL_FILE, JSON_FILE, MD_FILE = "model.onnx", "report.json", "report.md"


@dataclass(frozen=True)
class DeployResult:
    """Everything one model's deployment did, with the evidence; truthy when it passed."""

    model_name: str
    out_dir: Path
    export: ExportResult | None = None
    fold: FoldResult | None = None
    verification: VerifyResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None
    error: str | None = None

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
        """BatchNorm modules folded by the exporter, folded by fold-bn, and kept."""
        by_exporter = 0
        if self.export is not None:
            by_exporter = sum(
                1
                for e in self.export.census.entries
                if e.kind == "BatchNorm" and e.representation == "folded"
            )
        folded = len(self.fold.folded) if self.fold is not None else 0
        kept = len(self.fold.skipped) if self.fold is not None else 0
        return {"exporter": by_exporter, "fold-bn": folded, "kept": kept}

    def worst_error(self) -> float | None:
        if self.verification is None:
            return None
        return self.verification.worst_abs_error

    def providers(self) -> tuple[str, ...]:
        return () if self.verification is None else tuple(self.verification.providers)

    def advice(self) -> list[str]:
        """What a reader should do about anything flagged, in plain words."""
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
            for e in self.export.census.entries:
                if e.representation == "InstanceNormalization+Reshape":
                    tips.append(
                        f"GroupNorm `{e.module_path}` uses the InstanceNormalization+Reshape "
                        f"construction at opset {self.export.opset}; opset 21 gives a native "
                        "GroupNormalization op, which measured slower on onnxruntime CPU "
                        "(BENCHMARKS.md). Keep it unless your runtime has a fused GroupNorm."
                    )
                if e.representation == "decomposition" and e.kind == "LayerNorm":
                    tips.append(
                        f"LayerNorm `{e.module_path}` is decomposed into elementwise ops; "
                        "export at opset >= 17 for a native LayerNormalization "
                        "(fewer kernels, no fp16 overflow in Pow/ReduceMean)."
                    )
            tips.extend(
                f"[{lint.severity}] {lint.code} at {lint.node}: {lint.message}"
                for lint in self.export.census.lints
            )
        if self.fold is not None:
            kept: dict[str, list[str]] = {}
            for entry in self.fold.skipped:
                kept.setdefault(entry.reason, []).append(f"`{entry.node}`")
            tips.extend(
                f"{len(nodes)} BatchNormalization kept ({reason}): {', '.join(nodes)}. Each "
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

    def summary_row(self) -> list[str]:
        reps = self.norm_representations()
        norms = "; ".join(
            f"{kind}: " + ", ".join(f"{n}×{rep}" for rep, n in counter.items())
            for kind, counter in reps.items()
        )
        bn = self.bn_counts()
        timing = " ".join(f"{s} {self.timings[s]:.1f}s" for s in STAGES if s in self.timings)
        return [
            self.model_name,
            norms or "-",
            f"{bn['exporter']}/{bn['fold-bn']}/{bn['kept']}",
            ",".join(provider_alias(p) for p in self.providers()) or "-",
            fmt_num(self.worst_error()),
            "PASS" if self.passed else f"FAIL ({self.failed_stage or 'verify'})",
            timing,
        ]

    SUMMARY_HEADERS = (
        "model",
        "norm layers → representation",
        "BN folded by exporter/fold-bn/kept",
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
            "foldable BatchNorm was folded (and the folded graph compared with the unfolded one), "
            "and the final graph was compared with PyTorch eval on onnxruntime.",
            "",
            markdown_table(self.SUMMARY_HEADERS, [self.summary_row()]),
            "",
        ]
        tips = self.advice()
        out += ["## What to do about it", ""]
        out += [f"- {t}" for t in tips] if tips else ["- Nothing flagged."]
        out.append("")
        for part in (self.export, self.fold, self.verification):
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


def _run_fold(exported: Path) -> FoldResult:
    from normdeploy.folding import fold_bn

    return fold_bn(exported, verify=True)


def _run_verify(
    module: torch.nn.Module,
    model_path: Path,
    providers: Sequence[str],
    batch_sizes: Sequence[int],
    batch_axis: BatchAxis | None,
) -> VerifyResult:
    from normdeploy.verification.verifier import verify

    return verify(
        module, model_path, providers=providers, batch_sizes=tuple(batch_sizes),
        batch_axis=batch_axis,
    )  # fmt: skip


def deploy(
    model: str,
    out_dir: str | os.PathLike[str],
    *,
    providers: Sequence[str] | str | None = None,
    opset: int | None = None,
    exporter: str | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    weights: str | os.PathLike[str] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    batch_axis: BatchAxis | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DeployResult:
    """Export MODEL, fold its BatchNorms, verify the result, and write model + reports to out_dir.

    Stage failures are recorded in the result (and its reports), not raised, so callers can go on
    with other models; user errors about ``out_dir`` itself are raised.
    """
    from normdeploy.exporting import export
    from normdeploy.modelspec import resolve_model
    from normdeploy.verification.feeds import validate_batch_sizes
    from normdeploy.verification.runners import resolve_providers

    progress = progress or Progress(enabled=False)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: output directory is a file")
    if not out.parent.exists():
        raise OutputPathError(f"{out}: parent directory '{out.parent}' does not exist")
    batch_sizes = validate_batch_sizes(batch_sizes)  # bad arguments fail before any work
    choice = resolve_providers(providers)
    for note in choice.notes:
        progress.note(note)
    out.mkdir(exist_ok=True)
    final = check_output_path(out / MODEL_FILE, overwrite=overwrite)
    for name in (JSON_FILE, MD_FILE):
        check_output_path(out / name, overwrite=overwrite)

    timings: dict[str, float] = {}
    state: dict[str, Any] = {}
    stage = "export"
    resolved = None
    try:
        with tempfile.TemporaryDirectory(prefix=".deploy-", dir=out) as tmp:
            with progress.stage(model, "export", timings):
                resolved = resolve_model(model, weights=weights, input_shapes=input_shapes)
                exported = export(
                    resolved.module,
                    resolved.example_inputs,
                    Path(tmp) / "exported.onnx",
                    opset=opset,
                    exporter=exporter,
                    batch_axis=batch_axis,
                    model_name=resolved.name,
                    source=resolved.source,
                )
                # The exported graph lives in a temp dir; the report names the final file.
                state["export"] = dataclasses.replace(
                    exported,
                    path=final,
                    census=dataclasses.replace(
                        exported.census, source=f"{final} (before fold-bn)"
                    ),
                )
            stage = "fold-bn"
            with progress.stage(model, "fold-bn", timings):
                state["fold"] = _run_fold(Path(tmp) / "exported.onnx")
                save_onnx(state["fold"].model, final, external_data=None)
            stage = "verify"
            with progress.stage(model, "verify", timings):
                state["verification"] = _run_verify(
                    resolved.module, final, list(choice.providers), batch_sizes, batch_axis
                )
        result = DeployResult(model, out, timings=timings, **state)
    except NormdeployError as exc:
        result = DeployResult(
            model, out, timings=timings, failed_stage=stage, error=str(exc), **state
        )
        if stage != "verify" and final.exists() and "fold" not in state:
            final.unlink()
    write_text_atomic(out / JSON_FILE, render(result, "json"))
    write_text_atomic(out / MD_FILE, render(result, "markdown"))
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
    results = []
    start = time.perf_counter()
    for i, name in enumerate(models, 1):
        progress.note(f"[{i}/{len(models)}] {name}")
        results.append(deploy(name, out / name, progress=progress, **options))
    summary = DeploySummary(tuple(results), out)
    write_text_atomic(out / "summary.json", render(summary, "json"))
    write_text_atomic(out / "summary.md", render(summary, "markdown"))
    progress.note(f"{len(models)} model(s) in {time.perf_counter() - start:.0f} s")
    return summary
