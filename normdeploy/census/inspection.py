"""``inspect``: which normalization layers a graph holds, how each is written, and lints.

On any ONNX file (no PyTorch needed) it counts norm ops and the patterns exporters write in their
place (:mod:`normdeploy.census.patterns`), in every scope (subgraphs and functions included), and
lints them (:mod:`normdeploy.census.lints`). Given the PyTorch module the graph came from, it
says for every norm module how it appears and confirms it numerically
(:mod:`normdeploy.census.modules`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.arguments import check_int, example_inputs_arg, module_arg, onnx_model_arg
from normdeploy.census.lints import LOW_PRECISION, eval_mode_lints, norm_lints
from normdeploy.census.patterns import NATIVE_NORM_OPS, Match, match_at
from normdeploy.census.results import Census, Lint, NormEntry, NormNode
from normdeploy.io import read_onnx
from normdeploy.onnx_graph import (
    GraphIndex,
    default_opset,
    elem_types,
    graph_input_specs,
    in_default_domain,
    inferred_value_infos,
    model_constants,
    node_label,
    scopes,
)
from normdeploy.scopes import node_module_path
from normdeploy.shapes import ShapeRequest, input_shapes_arg, plan_inputs
from normdeploy.verification.feeds import make_feeds, size_free_dims
from normdeploy.verification.runners import CPU, OrtRunner

# The confirmation run's batch where neither input_shapes nor the example inputs give one: the
# smallest that shows a norm mixing samples (a BatchNorm left in training mode).
CONFIRM_BATCH = 2

if TYPE_CHECKING:
    import torch


def graph_census(model: onnx.ModelProto) -> tuple[dict[str, int], list[NormNode], list[Lint]]:
    """Counts, found norm nodes/patterns and lints over every scope in the model.

    A node belongs to at most one pattern: the first that matches (in graph order) claims it.
    """
    inferred = inferred_value_infos(model)
    types = elem_types(model, inferred=inferred)
    consts = model_constants(model)
    opset = default_opset(model)
    g = model.graph
    declared = {vi.name: vi for vi in (*g.value_info, *g.input, *g.output)}
    init = {t.name: t for t in g.initializer}
    counts: Counter[str] = Counter()
    found: list[NormNode] = []
    lints: list[Lint] = []
    for scope in scopes(model):
        # Subgraphs read the main graph's initializers and values by name.
        index = GraphIndex(
            scope.nodes,
            init=init,
            graph_inputs={v.name for v in g.input},
            graph_outputs={v.name for v in (scope.graph or g).output},
            declared=declared,
            inferred=inferred,
        )
        matches: list[Match] = []
        claimed: set[int] = set()
        for node in scope.nodes:
            default = in_default_domain(node)
            if default and node.op_type in (*NATIVE_NORM_OPS, "Dropout"):
                counts[node.op_type] += 1
            elif not default and "Norm" in node.op_type:
                counts[f"{node.domain}.{node.op_type}"] += 1
            match = None if id(node) in claimed else match_at(index, node)
            if match is not None:
                matches.append(match)
                claimed.update(id(n) for n in match.nodes)
                counts[match.kind] += 1
            native = default and node.op_type in NATIVE_NORM_OPS and bool(node.input)
            if native and id(node) in claimed and match is None:
                continue  # the InstanceNormalization inside a GroupNorm construction
            if native or match is not None:
                kind = match.kind if match else node.op_type
                dtype = types.get(match.data_input if match else node.input[0])
                found.append(
                    NormNode(
                        kind, node_label(node), scope.label, node_module_path(node), dtype
                    )
                )
                if dtype in LOW_PRECISION:
                    counts[f"{dtype} norms"] += 1
        lints += eval_mode_lints(scope.nodes, consts)
        lints += norm_lints(scope.nodes, opset, types, consts, matches)
    return dict(counts), found, lints


def inspect(
    model_or_path: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    module: torch.nn.Module | None = None,
    example_inputs: Sequence[Any] | None = None,
    input_shapes: ShapeRequest | None = None,
    seed: int = 0,
) -> Census:
    """Census of the norm layers in an ONNX model; with ``module``, per module and confirmed.

    The confirmation run's inputs have the graph's declared shapes; ``input_shapes`` (a shape
    per input, or ``{name: shape}``) and the ``example_inputs`` (tensors) size its symbolic
    dims, and sizes at which the graph runs are probed for the rest
    (:mod:`normdeploy.shapes`); batch 2 unless they say another. Its values are seeded stress
    inputs. Never fails on unknown ops, domains or subgraphs.
    """
    from normdeploy.census.modules import module_entries

    model_or_path = onnx_model_arg(model_or_path, "model_or_path")
    if module is not None:
        module_arg(module)
    example_inputs = example_inputs_arg(example_inputs)
    input_shapes = input_shapes_arg(input_shapes)
    check_int(seed, "seed")
    if isinstance(model_or_path, onnx.ModelProto):
        model, source = model_or_path, model_or_path.graph.name or "<model>"
    else:
        loaded = read_onnx(model_or_path)
        model, source = loaded.model, str(loaded.path)
    shapes = plan_inputs(
        graph_input_specs(model), input_shapes=input_shapes, examples=example_inputs or ()
    )
    counts, found, lints = graph_census(model)
    entries: list[NormEntry] = []
    notes: list[str] = []
    if module is not None:

        def confirmation_feeds() -> dict[str, np.ndarray]:
            nonlocal shapes
            if shapes.free():
                runner = OrtRunner(model, CPU)
                shapes = size_free_dims(shapes, runner.infer, source, seed)
            batch = shapes.batch or CONFIRM_BATCH
            return make_feeds(shapes.specs(), batch, seed, axes=shapes.axes())

        entries, notes = module_entries(model, module, confirmation_feeds)
        notes = [*shapes.notes, *notes]
    return Census(
        source=source,
        opset=default_opset(model),
        op_counts=counts,
        norm_nodes=tuple(found),
        entries=tuple(entries),
        lints=tuple(lints),
        notes=tuple(notes),
    )
