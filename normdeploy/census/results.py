"""What the census found: norm nodes and patterns, per-module entries, and lints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from normdeploy.census.patterns import (
    describe_kind,
    norm_of,
    representation_of,
)
from normdeploy.report import fmt_num, markdown_table, name_list, text_table
from normdeploy.verification.compare import Check

# How a norm module can appear in the graph (NormEntry.representation), besides a native op
# name or a named pattern (patterns.PATTERN_KINDS).
FOLDED = "folded"
ABSENT = "absent"
ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class NormNode:
    """One norm op or norm pattern found in the graph, anchored at one node."""

    kind: str
    node: str
    graph: str
    module_path: str | None
    dtype: str | None

    @property
    def norm(self) -> str:
        """The norm it computes: 'GroupNorm' for the InstanceNormalization construction."""
        return norm_of(self.kind)

    @property
    def representation(self) -> str:
        return representation_of(self.kind)

    def describe(self) -> str:
        """'GroupNorm as InstanceNormalization+Reshape', 'LayerNorm as LayerNormalization'."""
        return describe_kind(self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "norm": self.norm,
            "representation": self.representation,
            "node": self.node,
            "graph": self.graph,
            "module_path": self.module_path,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class Lint:
    """Something known to bite in deployment, with the node it is about."""

    code: str
    severity: str  # ERROR | WARNING
    node: str
    message: str
    op: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "op": self.op,
            "node": self.node,
            "message": self.message,
        }


def lint_groups(lints: Sequence[Lint]) -> list[tuple[Lint, list[str]]]:
    """Lints that say the same thing (severity, code, message) once each, in first-seen order,
    with every node they are about."""
    groups: dict[tuple[str, str, str], tuple[Lint, list[str]]] = {}
    for lint in lints:
        key = (lint.severity, lint.code, lint.message)
        groups.setdefault(key, (lint, []))[1].append(lint.node)
    return list(groups.values())


def lint_line(lint: Lint, nodes: Sequence[str]) -> str:
    """'[warning] dropout at drop1: …', or 'at 9 nodes (a, b, c (+6 more))' for a group."""
    where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes ({name_list(nodes)})"
    return f"[{lint.severity}] {lint.code} at {where}: {lint.message}"


@dataclass(frozen=True)
class NormEntry:
    """One PyTorch norm module: how it appears in the graph and how close its ONNX value is."""

    module_path: str
    module_class: str
    kind: str
    representation: str
    detail: str
    nodes: tuple[str, ...] = ()
    vs_torch: Check | None = None
    vs_oracle: Check | None = None
    note: str = ""

    @property
    def confirmed(self) -> bool | None:
        """True/False when compared numerically, None when there was nothing to compare."""
        checks = [c for c in (self.vs_torch, self.vs_oracle) if c is not None]
        return all(checks) if checks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "module_path": self.module_path,
            "module_class": self.module_class,
            "kind": self.kind,
            "representation": self.representation,
            "detail": self.detail,
            "nodes": list(self.nodes),
            "confirmed": self.confirmed,
            "vs_torch": None if self.vs_torch is None else self.vs_torch.to_dict(),
            "vs_oracle": None if self.vs_oracle is None else self.vs_oracle.to_dict(),
            "note": self.note,
        }


def _max_abs(check: Check | None) -> str:
    return "-" if check is None else fmt_num(check.comparison.max_abs)


def _worst_ratio(entry: NormEntry) -> str:
    """The larger e/f of the entry's comparisons ('-' when none was measured)."""
    ratios = [
        c.comparison.ratio
        for c in (entry.vs_torch, entry.vs_oracle)
        if c is not None and c.comparison.ratio is not None
    ]
    return fmt_num(max(ratios)) if ratios else "-"


def _confirmed_cell(entry: NormEntry) -> str:
    cell = {True: "ok", False: "FAIL", None: "-"}[entry.confirmed]
    if entry.vs_torch is not None and entry.vs_oracle is None:
        cell += " (PyTorch only)"
    return cell


@dataclass(frozen=True)
class Census:
    """Norm ops and patterns in a graph, per-module entries (with PyTorch) and lints."""

    source: str
    opset: int | None
    op_counts: dict[str, int]
    norm_nodes: tuple[NormNode, ...] = ()
    entries: tuple[NormEntry, ...] = ()
    lints: tuple[Lint, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """False when a numerical confirmation failed (lints do not fail the census)."""
        return all(e.confirmed is not False for e in self.entries)

    def __bool__(self) -> bool:
        return self.passed

    def entry(self, module_path: str) -> NormEntry:
        """The entry for a module path; KeyError if the module is not a norm module."""
        for e in self.entries:
            if e.module_path == module_path:
                return e
        raise KeyError(module_path)

    def lint_codes(self) -> set[str]:
        return {lint.code for lint in self.lints}

    @property
    def errors(self) -> tuple[Lint, ...]:
        """Lints of severity error: ``inspect`` exits 1 on them (the census itself passes)."""
        return tuple(lint for lint in self.lints if lint.severity == ERROR)

    def norm_summary(self) -> str:
        """'2× GroupNorm as InstanceNormalization+Reshape, 1× LayerNorm as decomposition'."""
        counts = Counter(n.describe() for n in self.norm_nodes)
        return ", ".join(f"{v}× {k}" for k, v in counts.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "opset": self.opset,
            "passed": self.passed,
            "op_counts": dict(self.op_counts),
            "norm_nodes": [n.to_dict() for n in self.norm_nodes],
            "entries": [e.to_dict() for e in self.entries],
            "lints": [lint.to_dict() for lint in self.lints],
            "notes": list(self.notes),
        }

    def _entry_rows(self) -> list[list[str]]:
        return [
            [
                e.module_path or "<root>",
                e.module_class,
                e.representation,
                e.detail,
                _max_abs(e.vs_torch),
                _max_abs(e.vs_oracle),
                _worst_ratio(e),
                _confirmed_cell(e),
            ]
            for e in self.entries
        ]

    _ENTRY_HEADERS = (
        "module",
        "class",
        "representation",
        "detail",
        "max|onnx-torch|",
        "max|onnx-oracle|",
        "e/f",
        "confirmed",
    )

    def entry_notes(self) -> list[str]:
        """The entries' notes, one line per distinct note with how many modules it covers."""
        grouped: dict[str, list[str]] = {}
        for e in self.entries:
            if e.note:
                grouped.setdefault(e.note, []).append(e.module_path or "<root>")
        return [
            f"{paths[0]}: {note}" if len(paths) == 1 else
            f"{len(paths)} modules ({paths[0]}, …): {note}"
            for note, paths in grouped.items()
        ]  # fmt: skip

    def _counts_line(self) -> str:
        return ", ".join(f"{k}×{v}" for k, v in self.op_counts.items()) or "no norm ops"

    def to_text(self) -> str:
        opset = "?" if self.opset is None else self.opset
        lines = [f"Norm census of {self.source} (opset {opset})"]
        if self.norm_nodes:
            lines.append(f"norms: {self.norm_summary()}")
        lines.append(f"ops: {self._counts_line()}")
        if self.entries:
            lines += ["", text_table(self._ENTRY_HEADERS, self._entry_rows())]
        elif self.norm_nodes:
            rows = [
                [n.describe(), n.node, n.module_path or "-", n.dtype or "?", n.graph]
                for n in self.norm_nodes
            ]
            headers = ("norm", "node", "module", "dtype", "graph")
            lines += ["", text_table(headers, rows)]
        if self.lints:
            lines += ["", "lints:"]
            lines += [f"  {lint_line(lint, nodes)}" for lint, nodes in lint_groups(self.lints)]
        lines += [f"note: {n}" for n in [*self.entry_notes(), *self.notes]]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        opset = "?" if self.opset is None else self.opset
        out = [f"### Norm census of `{self.source}` (opset {opset})", ""]
        if self.norm_nodes:
            out += [f"Norms: {self.norm_summary()}", ""]
        out.append(self._counts_line())
        if self.entries:
            out += ["", markdown_table(self._ENTRY_HEADERS, self._entry_rows())]
        if self.lints:
            out += ["", markdown_table(
                ("severity", "lint", "node", "message"),
                [(x.severity, x.code, x.node, x.message) for x in self.lints],
            )]  # fmt: skip
        out += [f"- {n}" for n in [*self.entry_notes(), *self.notes]]
        return "\n".join(out)
