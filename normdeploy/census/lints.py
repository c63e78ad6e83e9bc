"""Lints: what is known to bite in deployment, found by reading the graph (no run needed).

One set, used by the census (``inspect``, ``export``) and by ``verify``:

- eval semantics (:func:`eval_mode_lints`): BatchNormalization in training mode, Dropout that is
  active or may be;
- norm representation (:func:`norm_lints`): GroupNormalization-18's per-group affine, norms in
  16-bit floats, epsilons that round to 0 in float16, decomposed LayerNorms and RMSNorms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from normdeploy.census.patterns import NATIVE_FOR, NATIVE_NORM_OPS, Match
from normdeploy.census.results import ERROR, WARNING, Lint
from normdeploy.onnx_graph import (
    attr,
    in_default_domain,
    model_constants,
    node_label,
    scopes,
    tensor_value,
)

LOW_PRECISION = ("float16", "bfloat16")
Constants = Mapping[str, onnx.TensorProto]


def _lint(code: str, severity: str, node: onnx.NodeProto, message: str) -> Lint:
    return Lint(code, severity, node_label(node), message, node.op_type)


def _dropout_lint(node: onnx.NodeProto, consts: Constants) -> Lint:
    mode_input = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if not mode_input:
        return _lint(
            "dropout", WARNING, node,
            "Dropout left in the graph (an identity at inference, a leftover of a training "
            "graph): export in eval mode or remove it",
        )  # fmt: skip
    flag = tensor_value(consts.get(mode_input))
    if flag is None:
        return _lint(
            "dropout-active", ERROR, node,
            f"Dropout whose training_mode comes from '{mode_input}' (computed): it may drop "
            "activations at run time",
        )  # fmt: skip
    if bool(np.asarray(flag).any()):
        return _lint(
            "dropout-active", ERROR, node,
            "Dropout with training_mode=True: drops activations at random",
        )  # fmt: skip
    return _lint("dropout", WARNING, node, "Dropout with training_mode=False: an identity")


def eval_mode_lints(nodes: Sequence[onnx.NodeProto], consts: Constants) -> list[Lint]:
    """BatchNormalization in training mode and Dropout, in one node list."""
    lints: list[Lint] = []
    for node in nodes:
        if not in_default_domain(node):
            continue
        if node.op_type == "BatchNormalization":
            if attr(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
                lints.append(_lint(
                    "bn-training-mode", ERROR, node,
                    "BatchNormalization in training mode (training_mode=1 or running-stat "
                    "outputs): it normalizes with batch statistics; export in eval mode",
                ))  # fmt: skip
        elif node.op_type == "Dropout":
            lints.append(_dropout_lint(node, consts))
    return lints


def model_eval_mode_lints(model: onnx.ModelProto) -> list[Lint]:
    """:func:`eval_mode_lints` over every scope of the model (subgraphs and functions)."""
    consts = model_constants(model)
    return [lint for scope in scopes(model) for lint in eval_mode_lints(scope.nodes, consts)]


def _fp16_eps_underflows(eps: float) -> bool:
    return eps > 0 and float(np.float16(eps)) == 0.0


def _native_norm_lints(
    node: onnx.NodeProto, opset: int | None, types: Mapping[str, str]
) -> list[Lint]:
    op = node.op_type
    lints = []
    if op == "GroupNormalization" and opset is not None and opset < 21:
        lints.append(_lint(
            "groupnorm-opset18", WARNING, node,
            f"GroupNormalization at opset {opset} takes per-group scale/bias (deprecated; "
            "opset 21 made them per-channel as in PyTorch): re-export at opset 21",
        ))  # fmt: skip
    dtype = types.get(node.input[0]) if node.input else None
    if dtype in LOW_PRECISION:
        note = ""
        if (
            op in ("LayerNormalization", "RMSNormalization")
            and attr(node, "stash_type", 1) == 1
        ):
            note = " (stash_type=1 keeps the statistics in float32)"
        lints.append(_lint(
            "fp16-norm", WARNING, node,
            f"{op} computed in {dtype}{note}: check its error against fp32",
        ))  # fmt: skip
        eps = float(attr(node, "epsilon", 1e-5))
        if dtype == "float16" and _fp16_eps_underflows(eps):
            lints.append(_lint(
                "fp16-eps-underflow", ERROR, node,
                f"epsilon {eps:g} is 0 in float16: zero-variance inputs divide by 0",
            ))  # fmt: skip
    return lints


def _decomposition_lints(m: Match, types: Mapping[str, str], consts: Constants) -> list[Lint]:
    native, opset = NATIVE_FOR[m.kind]
    lints = [
        _lint(
            f"decomposed-{m.norm.lower()}", WARNING, m.anchor,
            f"{m.norm} written as {m.op_types()}: slower than {native} (opset >= {opset}) "
            "and unsafe in fp16",
        )
    ]  # fmt: skip
    dtype = types.get(m.data_input)
    if dtype in LOW_PRECISION:
        lints.append(_lint(
            "fp16-norm", ERROR, m.anchor,
            f"decomposed {m.norm} computed in {dtype}: Pow overflows for |x| > 256 "
            "(65504 is the float16 maximum) and ReduceMean loses precision",
        ))  # fmt: skip
        eps_arr = tensor_value(consts.get(m.eps_value)) if m.eps_value else None
        if eps_arr is not None and eps_arr.size and float(np.max(eps_arr)) == 0.0:
            lints.append(_lint(
                "fp16-eps-underflow", ERROR, m.anchor,
                "the epsilon constant is 0 in float16: zero-variance rows divide by 0",
            ))  # fmt: skip
    return lints


def norm_lints(
    nodes: Sequence[onnx.NodeProto],
    opset: int | None,
    types: Mapping[str, str],
    consts: Constants,
    matches: Sequence[Match],
) -> list[Lint]:
    """Lints on native norm ops and on matched decompositions in one node list."""
    lints = [
        lint
        for node in nodes
        if in_default_domain(node) and node.op_type in NATIVE_NORM_OPS
        for lint in _native_norm_lints(node, opset, types)
    ]
    for m in matches:
        if m.kind in NATIVE_FOR:
            lints += _decomposition_lints(m, types, consts)
    return lints
