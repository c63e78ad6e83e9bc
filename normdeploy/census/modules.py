"""The torch side of the census: which PyTorch norm module became which graph nodes, and a
numerical confirmation of each.

Module paths come from the exporter's metadata (:mod:`normdeploy.scopes`). For every norm module
the graph's representation is classified (folded into a Conv/Gemm by the exporter, a native op,
the GroupNorm construction, a decomposition, absent), and its ONNX value is compared with the
module's PyTorch eval output and with the float64 numpy oracle applied to the module's ONNX input
(:mod:`normdeploy.reference`), through the verification core's one comparison and its tolerance
policy (ground truth: a float64 trace of the module). A subclass the oracle does not model
exactly (one that overrides ``forward``, like timm's ``BatchNormAct2d``) is confirmed against
PyTorch only, and its entry says so.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.census.patterns import DECOMPOSITION, GROUPNORM_TRICK
from normdeploy.census.results import ABSENT, FOLDED, NormEntry
from normdeploy.errors import first_line
from normdeploy.onnx_graph import node_label
from normdeploy.reference import module_oracle, norm_kind, oracle_gap
from normdeploy.scopes import nodes_by_module, rewrite_rules
from normdeploy.verification.compare import (
    DEFAULT_POLICY,
    MODULE_VS_ORACLE,
    MODULE_VS_TORCH,
    Check,
    TolerancePolicy,
)
from normdeploy.verification.probe import module_output_values, run_exposed
from normdeploy.verification.runners import CPU, TorchRunner, forward_hooks, to_numpy

if TYPE_CHECKING:
    import torch

FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Representation:
    """How one norm module appears in the graph."""

    kind: str  # FOLDED, a native op name, GROUPNORM_TRICK, DECOMPOSITION or ABSENT
    detail: str
    nodes: tuple[onnx.NodeProto, ...] = ()


def classify(
    kind: str, nodes: Sequence[onnx.NodeProto], producer_nodes: Sequence[onnx.NodeProto]
) -> Representation:
    """The representation of one norm module from the nodes that carry its path."""
    ops = [n.op_type for n in nodes]
    fused = [n for n in nodes if any(r.startswith("FuseBatchNorm") for r in rewrite_rules(n))]
    if fused:
        target = fused[0]
        rule = next(r for r in rewrite_rules(target) if r.startswith("FuseBatchNorm"))
        detail = (
            f"folded into {target.op_type} '{node_label(target)}' by the exporter ({rule})"
        )
        return Representation(FOLDED, detail, (target,))
    for op in (
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
    ):
        if op in ops:
            main = next(n for n in nodes if n.op_type == op)
            extra = " with Reshape around it" if "Reshape" in ops else ""
            return Representation(op, f"{op} '{node_label(main)}'{extra}", tuple(nodes))
    if "InstanceNormalization" in ops:
        main = next(n for n in nodes if n.op_type == "InstanceNormalization")
        if "Reshape" in ops:
            tail = "→Mul→Add" if "Mul" in ops else ""
            detail = f"Reshape→InstanceNormalization '{node_label(main)}'→Reshape{tail}"
            return Representation(GROUPNORM_TRICK, detail, tuple(nodes))
        detail = f"InstanceNormalization '{node_label(main)}'"
        return Representation("InstanceNormalization", detail, tuple(nodes))
    if nodes:
        return Representation(
            DECOMPOSITION, "ops: " + "/".join(dict.fromkeys(ops)), tuple(nodes)
        )
    targets = [n for n in producer_nodes if n.op_type in FOLD_TARGETS]
    if targets and kind == "BatchNorm":
        target = targets[-1]
        detail = f"folded into {target.op_type} '{node_label(target)}' (constant folding)"
        return Representation(FOLDED, detail, (target,))
    return Representation(ABSENT, "no node in the graph comes from this module")


def _first_tensor(value: Any) -> torch.Tensor | None:
    import torch

    value = value[0] if isinstance(value, (tuple, list)) and value else value
    return value if isinstance(value, torch.Tensor) else None


def _module_input_value(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> str | None:
    """The data value entering a module's nodes from outside (not a weight or constant)."""
    produced = {o for n in nodes for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for node in nodes:
        for name in node.input[:1]:
            if name and name not in produced and name not in constants:
                return name
    return None


@dataclass(frozen=True)
class ModulePlan:
    """One norm module: its representation and the ONNX values that stand for it."""

    path: str
    module: torch.nn.Module
    kind: str
    representation: Representation
    output_value: str | None  # the ONNX value that is the module's output
    input_value: str | None  # the ONNX value entering it (for the oracle)


def plan_modules(
    model: onnx.ModelProto,
    norm_modules: Sequence[tuple[str, torch.nn.Module]],
    producers: Mapping[str, str],
) -> list[ModulePlan]:
    """Representation and ONNX values of every norm module; ``producers``: the Conv/Linear
    module whose output each norm module read in PyTorch (it decides a fold that left no node
    of the norm's own)."""
    by_module = nodes_by_module(model.graph)
    outputs_of = module_output_values(model.graph)
    plans = []
    for path, mod in norm_modules:
        kind = norm_kind(mod) or "?"
        producer = producers.get(path)
        producer_nodes = by_module.get(producer, []) if producer else []
        rep = classify(kind, by_module.get(path, []), producer_nodes)
        out_value = outputs_of.get(path)
        in_value = None
        if rep.kind == FOLDED and producer is not None and out_value is None:
            out_value = outputs_of.get(producer)  # the folded Conv's output is the BN's
        elif rep.kind not in (FOLDED, ABSENT):
            in_value = _module_input_value(model, by_module.get(path, []))
        plans.append(ModulePlan(path, mod, kind, rep, out_value, in_value))
    return plans


def _op_floor_reference(module: torch.nn.Module, x: np.ndarray) -> np.ndarray | None:
    """The module's own float32 output on ``x`` (an eval copy): the floor of the oracle check."""
    import torch

    try:
        with torch.no_grad():
            out = copy.deepcopy(module).eval()(torch.from_numpy(np.ascontiguousarray(x)))
    except Exception:  # the floor then comes from the whole-model trace
        return None
    return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else None


@dataclass
class _Held:
    """What one norm module holds until it is judged, and its judgements."""

    calls: int = 0  # how often the float32 forward called it (the last call is the one judged)
    out32: np.ndarray | None = None
    onnx_out: np.ndarray | None = None
    calls64: int = 0
    in64: np.ndarray | None = None
    vs_torch: Check | None = None
    vs_oracle: Check | None = None
    oracle_note: str = ""  # which input the oracle was applied to, when not the ONNX one
    oracle_error: str = ""
    judged: bool = False


class Confirmation:
    """The numerical confirmation of every norm module of ``module`` on one input set, driven
    by forwards run elsewhere, so that export's check and the census share theirs.

    In order: the float32 forward runs with :meth:`float32_hooks` (each norm module's output
    is kept); :meth:`run_graph` runs the graph once with those modules' values exposed and
    applies the oracle to every module whose ONNX input it has; the float64 forward runs with :meth:`float64_hooks`, which judges
    each module against PyTorch as its float64 output arrives and releases that module's
    values (the oracle goes to the float64 input where the graph has no input value);
    :meth:`entries` judges what the float64 forward did not reach on the nominal floor and
    returns one :class:`NormEntry` per module. Each comparison is made once, through the
    tolerance policy, against the float64 output of the same module (see :func:`_judge_torch`).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        module: torch.nn.Module,
        feeds: Mapping[str, np.ndarray],
        policy: TolerancePolicy = DEFAULT_POLICY,
        staged: Path | None = None,
    ) -> None:
        self.model = model
        self.feeds = feeds
        self.policy = policy
        self.staged = staged  # the file ``model`` was staged to, if any (see run_exposed)
        self.label = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        self.norm_modules = [
            (p, m) for p, m in module.named_modules() if norm_kind(m) is not None
        ]
        self.notes: list[str] = []
        self.plans: list[ModulePlan] = []
        self._held = {p: _Held() for p, _ in self.norm_modules}
        self._producers: dict[str, str] = {}
        self._graph_ran = False
        # Modules the graph gives no input value (no nodes of their own, folded, absent): the
        # oracle takes the float64 forward's input. Nodes decide it without the forward's
        # producers.
        by_module = nodes_by_module(model.graph)
        self._no_input = set()
        for path, mod in self.norm_modules:
            nodes = by_module.get(path, [])
            rep = classify(norm_kind(mod) or "?", nodes, []) if nodes else None
            has_input = (
                rep is not None
                and rep.kind not in (FOLDED, ABSENT)
                and _module_input_value(model, nodes) is not None
            )
            if oracle_gap(mod) is None and not has_input:
                self._no_input.add(path)

    @property
    def ran(self) -> bool:
        """Whether the float32 forward left anything to confirm."""
        return any(h.out32 is not None for h in self._held.values())

    # -------------------------------------------------------------- float32 forward
    @contextlib.contextmanager
    def float32_hooks(self, model: torch.nn.Module) -> Iterator[None]:
        """Hooks on ``model`` (``module`` or a copy of it) for its float32 forward on the feeds."""
        import torch

        held = self._held
        made_by: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
        producer_types = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)

        def pre_hook(path: str) -> Callable[..., None]:
            def hook(_mod: torch.nn.Module, inp: Any) -> None:
                t = _first_tensor(inp)
                if t is None:
                    return
                owner = made_by.get(id(t))
                if owner is not None and owner[1]() is t:
                    self._producers[path] = owner[0]

            return hook

        def post_hook(path: str) -> Callable[..., None]:
            def hook(mod: torch.nn.Module, _inp: Any, out: Any) -> None:
                t = _first_tensor(out)
                if t is None:
                    return
                if path in held:
                    held[path].out32 = to_numpy(t)  # a copy: an in-place ReLU may follow
                    held[path].calls += 1
                if isinstance(mod, producer_types):
                    # A weak reference: the conv's output must not outlive the forward here.
                    made_by[id(t)] = (path, weakref.ref(t))

            return hook

        with forward_hooks(
            model,
            pre={path: pre_hook(path) for path in held},
            post={
                path: post_hook(path)
                for path, mod in model.named_modules()
                if path in held or isinstance(mod, producer_types)
            },
        ):
            yield

    def float32_failed(self, exc: BaseException) -> None:
        """The float32 forward failed: nothing is confirmed, and the note says why."""
        for h in self._held.values():
            h.out32 = None
        self.notes.append(
            f"PyTorch eval run failed, no numerical confirmation: {first_line(exc)}"
        )

    # -------------------------------------------------------------------- the graph
    def run_graph(self, provider: str = CPU) -> None:
        """Plan every module, run the graph with their values exposed, and judge the modules
        whose ONNX input the graph has against the oracle; of each module's values only its
        ONNX output is kept, for the float64 forward."""
        self.plans = plan_modules(self.model, self.norm_modules, self._producers)
        wanted = [
            p
            for p in self.plans
            if (p.output_value or p.input_value) and self._held[p.path].out32 is not None
        ]
        arrived: set[str] = set()
        if wanted and self.ran:
            names = [v for p in wanted for v in (p.output_value, p.input_value) if v]
            try:
                values = run_exposed(self.model, names, self.feeds, provider, self.staged)
            except Exception as exc:  # a graph ORT cannot run still gets its representation
                self.notes.append(
                    "onnxruntime could not run the graph with exposed values: "
                    f"{first_line(exc)}"
                )
                values = {}
            for plan in wanted if values else ():
                arrived.add(plan.path)
                self._graph_values(plan, values)
            values.clear()
        self._graph_ran = bool(arrived)
        for plan in self.plans:
            if plan.path not in arrived:
                held = self._held[plan.path]
                held.out32 = held.onnx_out = None
        if self._graph_ran:
            self.notes.append(f"numerical confirmation ran on {self.label}")

    def _graph_values(self, plan: ModulePlan, values: Mapping[str, np.ndarray]) -> None:
        """Keep one module's ONNX output; judge its ONNX input against the oracle now."""
        held = self._held[plan.path]
        held.onnx_out = values.get(plan.output_value) if plan.output_value else None
        if held.onnx_out is None:
            held.out32 = None
            return
        oracle_in = values.get(plan.input_value) if plan.input_value else None
        if oracle_gap(plan.module) is None and oracle_in is not None:
            self._judge_oracle(plan, oracle_in, _op_floor_reference(plan.module, oracle_in))

    @property
    def needs_float64(self) -> bool:
        """Whether a module waits for the float64 forward."""
        return any(h.onnx_out is not None and not h.judged for h in self._held.values())

    # -------------------------------------------------------------- float64 forward
    @contextlib.contextmanager
    def float64_hooks(self, model: torch.nn.Module) -> Iterator[None]:
        """Hooks on a float64 copy of ``module`` for its forward on the feeds: each module is
        judged when its output (at the call the float32 forward kept) arrives."""
        held = self._held
        plans = {p.path: p for p in self.plans}
        waiting = {p for p, h in held.items() if h.onnx_out is not None and not h.judged}

        def pre_hook(path: str) -> Callable[..., None]:
            def hook(_mod: torch.nn.Module, inp: Any) -> None:
                h = held[path]
                t = _first_tensor(inp)
                if t is not None and path in self._no_input and h.calls64 + 1 == h.calls:
                    h.in64 = to_numpy(t)

            return hook

        def post_hook(path: str) -> Callable[..., None]:
            def hook(_mod: torch.nn.Module, _inp: Any, out: Any) -> None:
                h = held[path]
                h.calls64 += 1
                t = _first_tensor(out)
                if t is None or h.calls64 != h.calls or h.judged:
                    return
                # Judged now, before anything after the module can change the tensor in place.
                exact = t.detach().cpu().numpy()
                out32 = h.out32
                self._judge(
                    plans[path], exact if out32 is None or exact.shape == out32.shape else None
                )

            return hook

        with forward_hooks(
            model,
            pre={path: pre_hook(path) for path in waiting},
            post={path: post_hook(path) for path in waiting},
        ):
            yield

    def float64_failed(self, exc: BaseException) -> None:
        """The float64 forward failed: modules it did not reach get the nominal floor."""
        self.notes.append(
            f"the float64 forward failed ({first_line(exc)}): modules it had not reached are "
            "judged on nominal floors"
        )

    # ------------------------------------------------------------------- judgements
    def _judge_oracle(
        self, plan: ModulePlan, oracle_in: np.ndarray, expected: np.ndarray | None
    ) -> None:
        """The module's ONNX value against the oracle applied to ``oracle_in``; ``expected``
        (the module in float32 on the same input) gives the floor."""
        held = self._held[plan.path]
        assert held.onnx_out is not None
        try:
            oracle = module_oracle(plan.module, oracle_in)
        except (TypeError, ValueError) as exc:
            held.oracle_error = f"no oracle: {exc}"
            return
        name = f"{plan.path}:oracle"
        if expected is not None and expected.shape == oracle.shape:
            comp = self.policy.compare(name, expected, held.onnx_out, truth=oracle)
        else:  # no float32 counterpart on the same input: the nominal floor
            comp = self.policy.compare(name, oracle, held.onnx_out)
        held.vs_oracle = Check(MODULE_VS_ORACLE, CPU, self.label, comp)

    def _judge(self, plan: ModulePlan, exact_out: np.ndarray | None) -> None:
        """The module's ONNX value against PyTorch (truth: its float64 output, when there is
        one), and the oracle where the graph gave it no input; then its values are released."""
        held = self._held[plan.path]
        assert held.onnx_out is not None and held.out32 is not None
        comp = self.policy.compare(
            f"{plan.path}:torch", held.out32, held.onnx_out, truth=exact_out
        )
        held.vs_torch = Check(MODULE_VS_TORCH, CPU, self.label, comp)
        if (
            oracle_gap(plan.module) is None
            and held.vs_oracle is None
            and not held.oracle_error
        ):
            # No ONNX input value: the float64 forward's input, when it reached the module.
            if held.in64 is not None:
                held.oracle_note = (
                    "oracle applied to the float64 trace's input (no ONNX input value)"
                )
                self._judge_oracle(plan, held.in64, held.out32)
            else:
                held.oracle_error = (
                    "no oracle: the graph has no input value for this module and the float64 "
                    "forward did not reach it"
                )
        held.judged = True
        held.out32 = held.in64 = held.onnx_out = None

    def result(self) -> tuple[list[NormEntry], list[str]]:
        """The entries (:meth:`entries`) and the confirmation's notes."""
        if not self.norm_modules:
            return [], ["the PyTorch module has no normalization layers"]
        return self.entries(), list(self.notes)

    def entries(self) -> list[NormEntry]:
        """One entry per norm module, in the module's order (modules the float64 forward did
        not judge are judged now, on the nominal floor)."""
        plans = self.plans or plan_modules(self.model, self.norm_modules, self._producers)
        out = []
        for plan in plans:
            held = self._held[plan.path]
            if held.onnx_out is not None and held.out32 is not None and not held.judged:
                self._judge(plan, None)
            notes = []
            if held.vs_torch is not None:
                gap = oracle_gap(plan.module)
                if gap is not None:
                    notes.append(
                        f"confirmed against PyTorch only: {gap}, which the oracle does not "
                        "model"
                    )
                elif held.oracle_note:
                    notes.append(held.oracle_note)
                if held.oracle_error:
                    notes.append(held.oracle_error)
            elif plan.representation.kind != ABSENT and self._graph_ran:
                notes.append("no ONNX value for this module's output")
            rep = plan.representation
            out.append(
                NormEntry(
                    module_path=plan.path,
                    module_class=type(plan.module).__name__,
                    kind=plan.kind,
                    representation=rep.kind,
                    detail=rep.detail,
                    nodes=tuple(node_label(n) for n in rep.nodes),
                    vs_torch=held.vs_torch,
                    vs_oracle=held.vs_oracle,
                    note="; ".join(notes),
                )
            )
        return out


def module_entries(
    model: onnx.ModelProto,
    module: torch.nn.Module,
    make_feeds: Callable[[], Mapping[str, np.ndarray]],
    policy: TolerancePolicy = DEFAULT_POLICY,
) -> tuple[list[NormEntry], list[str]]:
    """One confirmed :class:`NormEntry` per norm module of ``module``, and notes;
    ``make_feeds`` makes the confirmation run's inputs (called only when there are norm
    modules, and then before anything else runs). The forwards run on one eval copy of
    ``module``, converted to float64 in place for the second."""
    import torch

    if not any(norm_kind(m) is not None for m in module.modules()):
        return [], ["the PyTorch module has no normalization layers"]
    conf = Confirmation(model, module, make_feeds(), policy)
    names = list(conf.feeds)
    model32 = copy.deepcopy(module)
    try:
        with conf.float32_hooks(model32):
            TorchRunner(model32, names, owned=True).infer(conf.feeds)
    except Exception as exc:
        conf.float32_failed(exc)
    conf.run_graph()
    if conf.needs_float64:
        try:  # the float32 copy is done: the float64 forward converts it in place
            runner64 = TorchRunner(model32, names, dtype=torch.float64, owned=True)
            with conf.float64_hooks(model32):
                runner64.infer(conf.feeds)
        except Exception as exc:  # a module that cannot run in float64: nominal floors
            conf.float64_failed(exc)
    del model32
    return conf.result()
