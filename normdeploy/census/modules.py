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

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.census.patterns import DECOMPOSITION, GROUPNORM_TRICK
from normdeploy.census.results import ABSENT, FOLDED, NormEntry
from normdeploy.errors import first_line, user_code
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
from normdeploy.verification.runners import CPU, default_dtype, from_numpy, to_numpy

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


@dataclass
class TorchTrace:
    """Eval-mode inputs and outputs of the norm modules, and the Conv/Linear feeding each."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)


def _first_tensor(value: Any) -> torch.Tensor | None:
    import torch

    value = value[0] if isinstance(value, (tuple, list)) and value else value
    return value if isinstance(value, torch.Tensor) else None


def trace_norm_modules(
    module: torch.nn.Module,
    args: Sequence[Any],
    paths: Sequence[str],
    dtype: torch.dtype | None = None,
) -> TorchTrace:
    """Run an eval copy once with hooks on the norm modules and on every Conv/Linear; with
    ``dtype`` (``torch.float64`` for ground truth) the copy and floating inputs are converted."""
    import torch

    model = copy.deepcopy(module).eval()
    if dtype is not None:
        model = model.to(dtype)
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    wanted = set(paths)
    trace = TorchTrace()
    made_by: dict[int, tuple[str, torch.Tensor]] = {}
    producer_types = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)

    def pre_hook(path: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inp: Any) -> None:
            t = _first_tensor(inp)
            if t is not None:
                trace.inputs[path] = to_numpy(t)
                owner = made_by.get(id(t))
                if owner is not None and owner[1] is t:
                    trace.producers[path] = owner[0]

        return hook

    def post_hook(path: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, _inp: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is None:
                return
            if path in wanted:
                trace.outputs[path] = to_numpy(t)
            if isinstance(mod, producer_types):
                made_by[id(t)] = (path, t)

        return hook

    handles = []
    for path, mod in model.named_modules():
        if path in wanted:
            handles.append(mod.register_forward_pre_hook(pre_hook(path)))
        if path in wanted or isinstance(mod, producer_types):
            handles.append(mod.register_forward_hook(post_hook(path)))
    try:
        with torch.no_grad(), default_dtype(dtype), user_code("the model's forward"):
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return trace


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
    trace: TorchTrace,
) -> list[ModulePlan]:
    """Representation and ONNX values of every norm module."""
    by_module = nodes_by_module(model.graph)
    outputs_of = module_output_values(model.graph)
    plans = []
    for path, mod in norm_modules:
        kind = norm_kind(mod) or "?"
        producer = trace.producers.get(path)
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


def _confirm(
    plan: ModulePlan,
    values: Mapping[str, np.ndarray],
    trace: TorchTrace,
    exact: TorchTrace | None,
    policy: TolerancePolicy,
    inputs_label: str,
) -> NormEntry:
    """Compare one module's ONNX value with PyTorch and with the oracle, each against float64.

    Against PyTorch the truth is the float64 trace of the whole model (so the floor carries the
    float32 rounding accumulated upstream). The oracle is applied to the module's ONNX input
    when the graph has one (truth: the formula in float64; floor: the module in float32 on that
    same input), else to the float64 trace's input (floor: the whole-model trace's).
    """
    vs_torch = vs_oracle = None
    notes: list[str] = []
    onnx_out = values.get(plan.output_value) if plan.output_value else None
    torch_out = trace.outputs.get(plan.path)
    exact_out = None if exact is None else exact.outputs.get(plan.path)
    if onnx_out is not None and torch_out is not None:
        comp = policy.compare(f"{plan.path}:torch", torch_out, onnx_out, truth=exact_out)
        vs_torch = Check(MODULE_VS_TORCH, CPU, inputs_label, comp)
        gap = oracle_gap(plan.module)
        oracle_in = values.get(plan.input_value) if plan.input_value else None
        expected: np.ndarray | None = None
        if gap is not None:
            notes.append(
                f"confirmed against PyTorch only: {gap}, which the oracle does not model"
            )
        elif oracle_in is not None:
            expected = _op_floor_reference(plan.module, oracle_in)
        elif exact is not None and plan.path in exact.inputs:
            oracle_in, expected = exact.inputs[plan.path], torch_out
            notes.append("oracle applied to the float64 trace's input (no ONNX input value)")
        else:
            oracle_in = trace.inputs.get(plan.path)
            notes.append("oracle applied to PyTorch's input (no ONNX input value)")
        if gap is None and oracle_in is not None:
            try:
                oracle = module_oracle(plan.module, oracle_in)
            except (TypeError, ValueError) as exc:
                notes.append(f"no oracle: {exc}")
            else:
                name = f"{plan.path}:oracle"
                if expected is not None and expected.shape == oracle.shape:
                    comp = policy.compare(name, expected, onnx_out, truth=oracle)
                else:  # no float32 counterpart on the same input: the nominal floor
                    comp = policy.compare(name, oracle, onnx_out)
                vs_oracle = Check(MODULE_VS_ORACLE, CPU, inputs_label, comp)
    elif plan.representation.kind != ABSENT and values:
        notes.append("no ONNX value for this module's output")
    rep = plan.representation
    return NormEntry(
        module_path=plan.path,
        module_class=type(plan.module).__name__,
        kind=plan.kind,
        representation=rep.kind,
        detail=rep.detail,
        nodes=tuple(node_label(n) for n in rep.nodes),
        vs_torch=vs_torch,
        vs_oracle=vs_oracle,
        note="; ".join(notes),
    )


def module_entries(
    model: onnx.ModelProto,
    module: torch.nn.Module,
    make_feeds: Callable[[], Mapping[str, np.ndarray]],
    policy: TolerancePolicy = DEFAULT_POLICY,
) -> tuple[list[NormEntry], list[str]]:
    """One confirmed :class:`NormEntry` per norm module of ``module``, and notes;
    ``make_feeds`` makes the confirmation run's inputs (called only when there are norm
    modules, and then before anything else runs)."""
    import torch

    norm_modules = [(p, m) for p, m in module.named_modules() if norm_kind(m) is not None]
    if not norm_modules:
        return [], ["the PyTorch module has no normalization layers"]
    notes: list[str] = []
    feeds = make_feeds()
    label = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    args = [from_numpy(v) for v in feeds.values()]
    paths = [p for p, _ in norm_modules]
    try:
        trace = trace_norm_modules(module, args, paths)
    except Exception as exc:
        notes.append(f"PyTorch eval run failed, no numerical confirmation: {first_line(exc)}")
        trace = TorchTrace()
    exact: TorchTrace | None = None
    if trace.outputs:
        try:
            exact = trace_norm_modules(module, args, paths, torch.float64)
        except Exception as exc:  # a module that cannot run in float64: nominal floors
            notes.append(f"no float64 trace ({first_line(exc)}): nominal floors apply")
    plans = plan_modules(model, norm_modules, trace)
    wanted = [v for p in plans for v in (p.output_value, p.input_value) if v]
    values: dict[str, np.ndarray] = {}
    if wanted and trace.outputs:
        try:
            values = run_exposed(model, wanted, feeds, CPU)
        except Exception as exc:  # a graph ORT cannot run still gets its representation
            notes.append(
                f"onnxruntime could not run the graph with exposed values: {first_line(exc)}"
            )
    if values:
        notes.append(f"numerical confirmation ran on {label}")
    return [_confirm(p, values, trace, exact, policy, label) for p in plans], notes
