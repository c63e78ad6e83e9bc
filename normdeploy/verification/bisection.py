"""Bisection: find where an ONNX graph starts to disagree with its reference.

Intermediate ONNX values become extra outputs (:func:`probe.values_exposed`); each is compared
with the reference value it stands for, in the reference's execution order:

- against PyTorch: the output of the module it came from (forward hooks; module paths from the
  exporter's metadata or TorchScript node names, :mod:`normdeploy.scopes`);
- against another ONNX graph: the value the same module produced there, or, when either graph
  carries no module names, the value with the same name.

A module whose nodes vanished has no ONNX value of its own. When the value of the module run just
before it matches *its* output (a BatchNorm folded into the Conv before it), it is recorded as
absorbed into that value; otherwise it is listed as having no counterpart. Nothing is dropped
silently: modules run more than once, shape changes and unknown scopes are listed as not compared.

Every value is judged by the one tolerance policy (:mod:`~normdeploy.verification.compare`):
against PyTorch, e and the floor f come from a float64 copy of the module traced on the same
inputs, so accumulated float32 rounding in a deep net stays within its own floor; against another
graph the nominal floor applies. The divergence is the first compared value, in execution order,
that fails the policy: an error that starts below the floor and is amplified later is named where
it becomes visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.errors import first_line
from normdeploy.onnx_graph import node_label
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.verification.compare import DEFAULT_POLICY, ArrayComparison, TolerancePolicy
from normdeploy.verification.probe import (
    module_output_values,
    run_exposed,
    trace_module_calls,
)
from normdeploy.verification.runners import CPU

if TYPE_CHECKING:
    import torch

MAX_LISTED = 40


@dataclass(frozen=True)
class Probe:
    """One intermediate ONNX value compared with the reference value it stands for."""

    key: str  # module path, or value name in value mode
    kind: str  # module class ("Conv2d") or producing op
    onnx_value: str
    node: str  # producing node, "name (Op)"
    compared_with: str  # the reference key used (a later, folded module when absorbed)
    absorbed: tuple[str, ...]
    comparison: ArrayComparison
    relative_error: float

    def label(self) -> str:
        folded = f" (+ folded {', '.join(self.absorbed)})" if self.absorbed else ""
        return f"{self.key or '<root>'}{folded}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "onnx_value": self.onnx_value,
            "node": self.node,
            "compared_with": self.compared_with,
            "absorbed": list(self.absorbed),
            "relative_error": self.relative_error,
            "comparison": self.comparison.to_dict(),
        }


@dataclass(frozen=True)
class Unmatched:
    """A reference module/value that was not compared, and why."""

    key: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class Bisection:
    """Intermediate comparisons in execution order and the first value where the error jumps."""

    mapping: str  # "module" or "value"
    reference: str  # "PyTorch" or "ONNX"
    provider: str
    inputs: str
    probes: tuple[Probe, ...]
    no_counterpart: tuple[Unmatched, ...]
    not_compared: tuple[Unmatched, ...]
    divergence_index: int | None
    notes: tuple[str, ...] = ()

    @property
    def first_divergence(self) -> Probe | None:
        return None if self.divergence_index is None else self.probes[self.divergence_index]

    @property
    def first_failing(self) -> Probe | None:
        """The first probe outside tolerance (may come before the divergence on noisy graphs)."""
        return next((p for p in self.probes if not p.comparison.passed), None)

    @property
    def absorbed(self) -> tuple[str, ...]:
        return tuple(k for p in self.probes for k in p.absorbed)

    def summary(self) -> str:
        """One line naming where the outputs start to differ."""
        culprit = self.first_divergence or self.first_failing
        if culprit is None:
            return (
                f"bisection ({len(self.probes)} intermediate values vs {self.reference}) "
                "found no intermediate divergence; the difference arises in the final outputs"
            )
        what = "module" if self.mapping == "module" else "value"
        comp = culprit.comparison
        bound = "" if comp.bound is None else f", bound {fmt_num(comp.bound)}"
        return (
            f"error jumps at {what} '{culprit.label()}' [{culprit.kind}], ONNX node "
            f"{culprit.node}: max|Δ| {fmt_num(comp.max_abs)}, relative "
            f"{fmt_num(culprit.relative_error)}{bound} (before it ≤ "
            f"{fmt_num(self._max_before(culprit))})"
        )

    def _max_before(self, probe: Probe) -> float:
        before = [p.relative_error for p in self.probes[: self.probes.index(probe)]]
        return max(before, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        culprit = self.first_divergence
        return {
            "mapping": self.mapping,
            "reference": self.reference,
            "provider": self.provider,
            "inputs": self.inputs,
            "summary": self.summary(),
            "first_divergence": None if culprit is None else culprit.key,
            "first_divergence_node": None if culprit is None else culprit.node,
            "first_failing": None if self.first_failing is None else self.first_failing.key,
            "probes": [p.to_dict() for p in self.probes],
            "no_counterpart": [u.to_dict() for u in self.no_counterpart],
            "not_compared": [u.to_dict() for u in self.not_compared],
            "notes": list(self.notes),
        }

    _HEADERS = (
        "#", "module/value", "kind", "ONNX node", "max abs", "error e", "floor f", "e/f",
        "result",
    )  # fmt: skip

    def _rows(self) -> list[list[str]]:
        rows = []
        for i, p in enumerate(self.probes):
            comp = p.comparison
            mark = "ok" if comp.passed else "FAIL"
            if i == self.divergence_index:
                mark += " ← error jumps"
            rows.append([
                str(i), p.label(), p.kind, p.node, fmt_num(comp.max_abs),
                fmt_num(p.relative_error), fmt_num(comp.floor_used), fmt_num(comp.ratio), mark,
            ])  # fmt: skip
        return rows

    def _listed(self) -> list[tuple[str, tuple[Unmatched, ...]]]:
        return [
            ("no counterpart in the ONNX graph", self.no_counterpart),
            ("not compared", self.not_compared),
        ]

    def to_text(self) -> str:
        lines = [
            f"bisection vs {self.reference} on {self.provider} ({self.inputs}), "
            f"mapped by {self.mapping}:",
            self.summary(),
        ]
        if self.probes:
            lines.append(text_table(self._HEADERS, self._rows()))
        for title, items in self._listed():
            if items:
                lines.append(f"{title}:")
                lines += [f"  {u.key} [{u.kind}]: {u.reason}" for u in items[:MAX_LISTED]]
                if len(items) > MAX_LISTED:
                    lines.append(f"  … {len(items) - MAX_LISTED} more")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [
            f"### Bisection vs {self.reference} on `{self.provider}` ({self.inputs})",
            "",
            self.summary(),
            "",
        ]
        if self.probes:
            out += [markdown_table(self._HEADERS, self._rows()), ""]
        for title, items in self._listed():
            if items:
                out += [f"**{title}**:", ""]
                out += [f"- `{u.key}` ({u.kind}): {u.reason}" for u in items]
                out.append("")
        out += [f"- note: {n}" for n in self.notes]
        return "\n".join(out)


# ----------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class ReferenceValue:
    """A reference value in execution order: module path (or value name), kind, the array as
    the reference computed it, and its float64 evaluation when there is one."""

    key: str
    kind: str
    array: np.ndarray | None
    truth: np.ndarray | None = None


@dataclass(frozen=True)
class CandidateValue:
    onnx_value: str
    node: str
    array: np.ndarray


def relative_error(comparison: ArrayComparison) -> float:
    """The policy's scale-relative error e; inf when shapes or non-finite positions differ."""
    if comparison.error is None or comparison.usage is None:
        return math.inf
    return comparison.error


def _is_float(a: np.ndarray | None) -> bool:
    return a is not None and a.dtype.kind == "f"


def locate_divergence(
    reference: Sequence[ReferenceValue],
    candidate: Mapping[str, CandidateValue],
    *,
    provider: str = CPU,
    policy: TolerancePolicy = DEFAULT_POLICY,
) -> tuple[list[Probe], list[Unmatched], list[Unmatched], int | None]:
    """Compare ``candidate`` values with ``reference`` in order; see the module docstring.

    Returns (probes, no counterpart, not compared, index of the divergence in probes).
    """
    probes: list[Probe] = []
    no_counterpart: list[Unmatched] = []
    not_compared: list[Unmatched] = []
    absorbed_keys: set[str] = set()
    for i, ref in enumerate(reference):
        if ref.key not in candidate:
            continue
        cand = candidate[ref.key]
        if not _is_float(ref.array) or not _is_float(cand.array):
            not_compared.append(Unmatched(ref.key, ref.kind, "not a floating-point tensor"))
            continue
        # The module itself, then the ones right after it that have no value of their own.
        options = [ref]
        for later in reference[i + 1 :]:
            if later.key in candidate:
                break
            options.append(later)
        scored = []
        for rank, option in enumerate(options):
            array = option.array
            if array is None or not _is_float(array) or array.shape != cand.array.shape:
                continue
            comp = policy.compare(ref.key, array, cand.array, provider, truth=option.truth)
            scored.append((relative_error(comp), rank, option, comp))
        if not scored:
            shape = None if ref.array is None else tuple(ref.array.shape)
            not_compared.append(Unmatched(
                ref.key, ref.kind,
                f"shape differs: reference {shape}, ONNX {tuple(cand.array.shape)}",
            ))  # fmt: skip
            continue
        err, rank, chosen, comp = min(scored, key=lambda s: (s[0], s[1]))
        absorbed = tuple(o.key for o in options[1 : rank + 1])
        absorbed_keys.update(absorbed)
        probes.append(Probe(
            ref.key, ref.kind, cand.onnx_value, cand.node, chosen.key, absorbed, comp, err,
        ))  # fmt: skip
    for ref in reference:
        if ref.key in candidate or not _is_float(ref.array):
            continue
        owner = next((p.key for p in probes if ref.key in p.absorbed), None)
        if owner is not None:
            no_counterpart.append(Unmatched(
                ref.key, ref.kind,
                f"folded: the ONNX value of '{owner}' matches this module's output",
            ))  # fmt: skip
        else:
            no_counterpart.append(
                Unmatched(ref.key, ref.kind, "no ONNX node carries this name; not compared")
            )
    return probes, no_counterpart, not_compared, _divergence(probes)


def _divergence(probes: Sequence[Probe]) -> int | None:
    """The first probe the policy fails."""
    return next((i for i, p in enumerate(probes) if not p.comparison.passed), None)


# ---------------------------------------------------------------------- entry points


def _producers(graph: onnx.GraphProto) -> dict[str, tuple[int, onnx.NodeProto]]:
    return {out: (i, node) for i, node in enumerate(graph.node) for out in node.output if out}


def _describe(node: onnx.NodeProto) -> str:
    return f"{node_label(node)} ({node.op_type})"


def _run_exposed(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    provider: str,
) -> dict[str, np.ndarray]:
    return run_exposed(model, names, feeds, provider)


def bisect_module(
    candidate: onnx.ModelProto,
    module: torch.nn.Module,
    feeds: Mapping[str, np.ndarray],
    torch_args: Sequence[Any],
    *,
    provider: str = CPU,
    inputs_label: str = "",
    policy: TolerancePolicy = DEFAULT_POLICY,
) -> Bisection:
    """Compare each module's PyTorch eval output (on ``torch_args``) with its ONNX value; the
    float64 trace of the same module on the same inputs is the ground truth."""
    import torch

    calls = trace_module_calls(module, torch_args)
    try:
        exact = {
            c.path: c.output for c in trace_module_calls(module, torch_args, torch.float64)
        }
    except Exception as exc:  # a module that cannot run in float64: the nominal rule applies
        exact = {}
        notes_64 = [f"no float64 trace ({first_line(exc)}): nominal floors"]
    else:
        notes_64 = []
    values = {k: v for k, v in module_output_values(candidate.graph).items() if k}
    notes: list[str] = list(notes_64)
    if not values:
        notes.append(
            "the ONNX graph carries no module names (no exporter metadata, no /scope/ node "
            "names): intermediate values cannot be matched to modules"
        )
    producers = _producers(candidate.graph)
    outputs = _run_exposed(candidate, sorted(set(values.values())), feeds, provider)
    known = {c.path for c in calls}
    reference: list[ReferenceValue] = []
    not_compared: list[Unmatched] = []
    for call in calls:
        if not call.path:
            continue  # the whole model: its outputs are the verified outputs
        if call.calls > 1:
            not_compared.append(Unmatched(
                call.path, call.class_name,
                f"called {call.calls} times in one forward; the graph has a copy per call",
            ))  # fmt: skip
            continue
        truth = exact.get(call.path)
        if truth is not None and (call.output is None or truth.shape != call.output.shape):
            truth = None
        reference.append(ReferenceValue(call.path, call.class_name, call.output, truth))
    candidate_values = {
        path: CandidateValue(name, _describe(producers[name][1]), outputs[name])
        for path, name in values.items()
        if name in outputs and name in producers
    }
    probes, absent, skipped, index = locate_divergence(
        reference, candidate_values, provider=provider, policy=policy
    )
    stray = sorted(k for k in values if k not in known)
    skipped += [
        Unmatched(k, "ONNX scope", "names no module (a repeated call, or a functional op)")
        for k in stray
    ]
    return Bisection(
        "module", "PyTorch", provider, inputs_label, tuple(probes), tuple(absent),
        tuple(not_compared + skipped), index, tuple(notes),
    )  # fmt: skip


def _ordered_module_values(graph: onnx.GraphProto) -> list[tuple[str, str, str]]:
    """(path, value, producing op) in the graph's node order, inner modules first."""
    producers = _producers(graph)
    entries = [
        (producers[v][0], -k.count("."), k, v)
        for k, v in module_output_values(graph).items()
        if k and v in producers
    ]
    return [(k, v, producers[v][1].op_type) for _, _, k, v in sorted(entries)]


def bisect_onnx(
    candidate: onnx.ModelProto,
    reference: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    provider: str = CPU,
    inputs_label: str = "",
    policy: TolerancePolicy = DEFAULT_POLICY,
    reference_feeds: Mapping[str, np.ndarray] | None = None,
) -> Bisection:
    """Compare intermediate values of two graphs, by module path when both carry module names
    (so renamed or folded nodes still line up), else by value name. ``reference_feeds``: the
    same inputs under the reference's input names, when they differ."""
    ref_modules = _ordered_module_values(reference.graph)
    cand_modules = {k: v for k, v in module_output_values(candidate.graph).items() if k}
    cand_producers = _producers(candidate.graph)
    if ref_modules and set(cand_modules) & {k for k, _, _ in ref_modules}:
        mapping = "module"
        ref_entries = ref_modules
        cand_map = cand_modules
    else:
        mapping = "value"
        ref_producers = _producers(reference.graph)
        graph_inputs = {i.name for i in reference.graph.input}
        ref_entries = [
            (v, v, ref_producers[v][1].op_type)
            for node in reference.graph.node
            for v in node.output
            if v and v not in graph_inputs
        ]
        cand_map = {v: v for v in cand_producers}
    ref_out = _run_exposed(
        reference, [v for _, v, _ in ref_entries], reference_feeds or feeds, provider
    )
    cand_out = _run_exposed(candidate, sorted(set(cand_map.values())), feeds, provider)
    ref_values = [ReferenceValue(k, op, ref_out.get(v)) for k, v, op in ref_entries]
    cand_values = {
        k: CandidateValue(v, _describe(cand_producers[v][1]), cand_out[v])
        for k, v in cand_map.items()
        if v in cand_out and v in cand_producers
    }
    probes, absent, skipped, index = locate_divergence(
        ref_values, cand_values, provider=provider, policy=policy
    )
    return Bisection(
        mapping, "ONNX", provider, inputs_label, tuple(probes), tuple(absent), tuple(skipped),
        index,
    )  # fmt: skip
