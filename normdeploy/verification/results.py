"""``VerifyResult``: everything verify compared and found, rendered as text, JSON or Markdown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from normdeploy.census.results import ERROR, Lint, lint_groups
from normdeploy.errors import VerificationFailed
from normdeploy.modes import TrainModeReport
from normdeploy.report import fmt_num, markdown_table, name_list, text_table
from normdeploy.verification.bisection import Bisection
from normdeploy.verification.compare import REFERENCE, ArrayComparison, Check
from normdeploy.verification.runners import provider_alias


def worst(checks: tuple[Check, ...] | list[Check]) -> Check | None:
    """The check furthest outside its tolerance (an unmeasured one first)."""
    return max(checks, key=lambda c: c.comparison.severity, default=None)


def fmt_margin(comp: ArrayComparison) -> str:
    """The verdict's margin, ``×bound/e``: how many times the error could grow and still pass."""
    if comp.usage is None:
        return "-"
    return "∞" if comp.margin is None else f"×{comp.margin:.3g}"


def describe_verdict(comp: ArrayComparison) -> str:
    """One phrase with the verdict's numbers: e, f, e/f, the bound and the margin (or the fixed
    bound's max |Δ|)."""
    if comp.bound is None:
        return (
            f"max |Δ| = {fmt_num(comp.max_abs)} ({comp.rule}: atol={comp.atol:g}, "
            f"rtol={comp.rtol:g})"
        )
    floor = "nominal " if comp.floor is None else ""
    return (
        f"e = {fmt_num(comp.error)} vs {floor}floor f = {fmt_num(comp.floor_used)} "
        f"(e/f {fmt_num(comp.ratio)}, bound {fmt_num(comp.bound)}, margin {fmt_margin(comp)}; "
        f"max |Δ| {fmt_num(comp.max_abs)}; rule {comp.rule})"
    )


def check_row(c: Check) -> list[str]:
    """One table row for a check (verify's table; export's and fold-bn's reuse the cells)."""
    comp = c.comparison
    worst_cell = (
        "-"
        if comp.expected_at_worst is None
        else f"[{','.join(map(str, comp.worst_index))}] "
        f"{fmt_num(comp.expected_at_worst)} → {fmt_num(comp.actual_at_worst)}"
    )
    result = "ok" if comp.passed else "FAIL" + (f": {comp.detail}" if comp.detail else "")
    rule = (
        comp.rule if comp.rule not in ("fixed",) else f"atol={comp.atol:g} rtol={comp.rtol:g}"
    )
    return [
        c.kind, provider_alias(c.provider), c.inputs, comp.name, fmt_num(comp.max_abs),
        fmt_num(comp.error), fmt_num(comp.floor_used), fmt_num(comp.ratio), fmt_margin(comp),
        worst_cell, rule, result,
    ]  # fmt: skip


@dataclass(frozen=True)
class VerifyResult:
    """Everything verify compared and found; truthy when every check passed and no lint is an
    error."""

    reference: str
    reference_kind: str  # "pytorch" or "onnx"
    candidate: str
    providers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    seeds: int
    checks: tuple[Check, ...]
    graph_flags: tuple[Lint, ...] = ()
    train_mode: TrainModeReport | None = None
    bisection: Bisection | None = None
    notes: tuple[str, ...] = ()
    tolerance: str = ""
    inputs_ran: tuple[tuple[str, str], ...] = ()  # (input set, its input shapes)

    @property
    def passed(self) -> bool:
        return (
            bool(self.checks)
            and all(c.passed for c in self.checks)
            and not any(f.severity == ERROR for f in self.graph_flags)
        )

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def worst_abs_error(self) -> float | None:
        """Largest max|Δ| of the measured checks against the reference (None when none ran)."""
        errs = [
            c.comparison.max_abs
            for c in self.checks
            if c.kind == REFERENCE and c.comparison.max_abs is not None
        ]
        return max(errs) if errs else None

    @property
    def diagnosis(self) -> str | None:
        """One line saying what is wrong, or None when everything passed."""
        if self.passed:
            return None
        parts = [
            lint.message
            + ("" if len(nodes) == 1 else f" ({len(nodes)} nodes: {name_list(nodes)})")
            for lint, nodes in lint_groups(
                [f for f in self.graph_flags if f.severity == ERROR]
            )
        ]
        kinds = sorted({c.kind for c in self.failures})
        culprit = worst(self.failures)
        if culprit is not None:
            comp = culprit.comparison
            measured = "" if comp.max_abs is None else f": {describe_verdict(comp)}"
            parts.append(
                f"{len(self.failures)} check(s) failed ({', '.join(kinds)}); worst "
                f"{comp.name} on {provider_alias(culprit.provider)}{measured}"
                + (f" ({comp.detail})" if comp.detail else "")
            )
        if self.bisection is not None:
            parts.append(self.bisection.summary())
        return "; ".join(parts) or "no checks ran"

    def raise_if_failed(self) -> VerifyResult:
        """Return self when it passed, else raise VerificationFailed carrying this result."""
        if not self.passed:
            raise VerificationFailed(self.diagnosis or "verification failed", self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
            "candidate": self.candidate,
            "providers": list(self.providers),
            "batch_sizes": list(self.batch_sizes),
            "seeds": self.seeds,
            "worst_abs_error": self.worst_abs_error,
            "diagnosis": self.diagnosis,
            "checks": [c.to_dict() for c in self.checks],
            "graph_flags": [f.to_dict() for f in self.graph_flags],
            "train_mode": None if self.train_mode is None else self.train_mode.to_dict(),
            "bisection": None if self.bisection is None else self.bisection.to_dict(),
            "notes": list(self.notes),
            "tolerance": self.tolerance,
            "inputs_ran": [{"inputs": k, "shapes": v} for k, v in self.inputs_ran],
        }

    _HEADERS = (
        "check", "provider", "inputs", "output", "max abs", "error e", "floor f", "e/f",
        "margin", "worst [index] expected → actual", "rule", "result",
    )  # fmt: skip

    def _rows(self) -> list[list[str]]:
        return [check_row(c) for c in self.checks]

    def _summary_pairs(self) -> list[tuple[str, str]]:
        ran = "; ".join(f"{label}: {shapes}" for label, shapes in self.inputs_ran)
        pairs = [
            ("reference", f"{self.reference} ({self.reference_kind})"),
            ("candidate", self.candidate),
            ("providers", ", ".join(self.providers)),
            ("batch sizes", ", ".join(map(str, self.batch_sizes)) + f"; seeds: {self.seeds}"),
            ("inputs ran", ran or "-"),
            ("tolerance", self.tolerance or "-"),
        ]
        if self.train_mode is not None:
            pairs.append(("module mode", self.train_mode.summary("verified against eval")))
        pairs.append(("result", "PASS" if self.passed else "FAIL"))
        if not self.passed:
            pairs.append(("diagnosis", self.diagnosis or ""))
        return pairs

    def to_text(self) -> str:
        lines = [f"{k + ':':13s} {v}" for k, v in self._summary_pairs()]
        lines += ["", text_table(self._HEADERS, self._rows())]
        lines += [
            f"{f.severity}: {name_list(nodes)} ({f.op}): {f.message}"
            for f, nodes in lint_groups(self.graph_flags)
        ]
        lines += [f"note: {n}" for n in self.notes]
        if self.bisection is not None:
            lines += ["", self.bisection.to_text()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"## Verification: {'PASS' if self.passed else 'FAIL'}", ""]
        out += [f"- **{k}**: {v}" for k, v in self._summary_pairs()]
        out += [f"- note: {n}" for n in self.notes]
        out += ["", markdown_table(self._HEADERS, self._rows()), ""]
        if self.graph_flags:
            out += ["### Graph flags", ""]
            out += [
                f"- **{f.severity}** `{f.node}` ({f.op}): {f.message}"
                for f in self.graph_flags
            ]
            out.append("")
        if self.bisection is not None:
            out += [self.bisection.to_markdown(), ""]
        return "\n".join(out)
