"""Graph passes: declared units that say what they require, what they changed, and why.

A pass is called as ``pass_(model) -> PassResult``. The base class runs

    requires(model)  →  call(model)  →  the in-place claim  →  ensures(model, result)

``requires`` raises a user error when the model is outside what the pass handles (an opset too
old, a graph that reads undefined values); ``call`` does the work and returns the model, whether
it changed, and a ledger with one entry per candidate node (applied, or kept with the reason);
``ensures`` checks the pass's own post-conditions. A pass that declares ``in_place = True``
returns the model it was given; one that declares ``in_place = False`` must leave it untouched.
A broken post-condition is a bug in the pass (:class:`PassContractError`), never a user error.

Passes do no I/O, no numerical verification and no rendering: :mod:`normdeploy.folding` runs a
pass over a file (load → pass → verify → stage → write). The arithmetic lives in pure modules
(:mod:`normdeploy.passes.fold_math`), graph edits in :mod:`normdeploy.passes.surgery`, and each
pass in its own module with a docstring saying what it removes and when it refuses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx

from normdeploy.onnx_graph import node_label, undefined_input

# What a ledger entry says happened to its node.
FOLDED, MERGED, FUSED, KEPT = "folded", "merged", "fused", "kept"


class PassContractError(AssertionError):
    """A pass broke its own contract (changed an input it declared untouched, left an undefined
    value behind, a ledger that does not match the graph): a bug, never the user's fault."""


@dataclass(frozen=True)
class LedgerEntry:
    """One candidate node: what happened to it (into which node, which direction) or why not."""

    node: str
    graph: str
    action: str  # FOLDED | MERGED | FUSED | KEPT
    direction: str = ""  # fold-bn: "preceding" | "following"
    target: str = ""  # the node it went into
    target_op: str = ""
    reason: str = ""  # why it was kept, or a note on how it was applied
    invalid: bool = False  # the node's own parameters are broken (NaN/inf, var + eps <= 0)
    # the node's op type when it is not the pass's subject (a sum of merged branches), else ""
    op: str = ""

    @property
    def applied(self) -> bool:
        return self.action != KEPT

    @property
    def folded(self) -> bool:
        return self.action == FOLDED

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "graph": self.graph,
            "action": self.action,
            "folded": self.folded,
            "direction": self.direction,
            "target": self.target,
            "target_op": self.target_op,
            "reason": self.reason,
            "invalid": self.invalid,
            "op": self.op,
        }


@dataclass(frozen=True)
class PassResult:
    """The model after a pass, whether the pass changed it, and its ledger."""

    model: onnx.ModelProto
    modified: bool
    ledger: tuple[LedgerEntry, ...] = ()
    notes: tuple[str, ...] = ()  # one line each: what the ledger alone does not say

    def counts(self) -> Counter[str]:
        """Ledger entries by action."""
        return Counter(e.action for e in self.ledger)


def _fingerprint(model: onnx.ModelProto) -> tuple[Any, ...]:
    """A cheap structural fingerprint: nodes (op, wiring, attributes) and initializer layout."""
    g = model.graph
    return (
        tuple(
            (n.op_type, tuple(n.input), tuple(n.output), n.SerializeToString()) for n in g.node
        ),
        tuple((t.name, tuple(t.dims), t.data_type, len(t.raw_data)) for t in g.initializer),
        tuple(o.name for o in g.output),
        len(model.functions),
    )


class GraphPass:
    """Base of graph passes: ``__call__(model)`` runs requires → call → ensures."""

    name: ClassVar[str] = "pass"
    in_place: ClassVar[bool] = True
    # What the ledger counts, for reports: "3 of 4 BatchNormalization folded".
    subject: ClassVar[str] = "node"
    # The key of the pass's own seconds in a report's timings.
    stage: ClassVar[str] = "pass"
    # The ledger action a report counts: "3 of 4 BatchNormalization folded".
    action: ClassVar[str] = FOLDED

    def requires(self, model: onnx.ModelProto, source: str) -> None:
        """Raise a user error (naming ``source``) when the pass cannot run on ``model``."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: onnx.ModelProto, result: PassResult) -> None:
        """Post-conditions; the default checks the graph still defines every value it reads,
        and that ``modified`` agrees with the ledger. Subclasses add their own."""
        if (where := undefined_input(result.model.graph)) is not None:
            node, name = where
            raise PassContractError(
                f"{self.name}: node '{node_label(node)}' reads '{name}', which the pass left "
                "undefined"
            )
        if result.modified != any(e.applied for e in result.ledger):
            raise PassContractError(
                f"{self.name}: modified={result.modified} disagrees with its ledger"
            )

    def __call__(self, model: onnx.ModelProto, source: str = "<model>") -> PassResult:
        self.requires(model, source)
        return self.apply(model)

    def apply(self, model: onnx.ModelProto) -> PassResult:
        """call → the in-place claim → ensures, on a model that met :meth:`requires`."""
        before = None if self.in_place else _fingerprint(model)
        result = self.call(model)
        if self.in_place and result.model is not model:
            raise PassContractError(f"{self.name}: declared in place but returned a new model")
        if before is not None and _fingerprint(model) != before:
            raise PassContractError(f"{self.name}: declared functional but changed its input")
        self.ensures(model, result)
        return result


class Sequential(GraphPass):
    """Passes run one after another on the same model, in place, as one pass.

    ``requires`` is every pass's on the input (none of them changes what the others require:
    the opset, the graph being well formed); each pass then runs with its own contract. The
    ledger says what finally happened to each node: a later pass's entry for a node (same label
    and graph) replaces an earlier one's in its place, so an identity BatchNormalization that
    fold-bn kept and the merge pass merged is listed once, as merged. Subclasses name the
    sequence (``name``, ``subject``, ``stage``) and add their own post-conditions.
    """

    def __init__(self, *passes: GraphPass) -> None:
        if not passes or not all(p.in_place for p in passes):
            raise ValueError("Sequential: needs one or more in-place passes")
        self.passes = passes

    def requires(self, model: onnx.ModelProto, source: str) -> None:
        for graph_pass in self.passes:
            graph_pass.requires(model, source)

    def call(self, model: onnx.ModelProto) -> PassResult:
        entries: dict[tuple[str, str], LedgerEntry] = {}
        for graph_pass in self.passes:
            for e in graph_pass.apply(model).ledger:
                entries[(e.node, e.graph)] = e
        ledger = tuple(entries.values())
        return PassResult(model, any(e.applied for e in ledger), ledger)
