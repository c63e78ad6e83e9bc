"""Look inside both sides: intermediate ONNX values and PyTorch module outputs.

Used by ``inspect`` (confirm each LayerNorm/GroupNorm numerically) and by ``verify``'s
bisection. ONNX values become extra graph outputs of the model while its session is made;
PyTorch module outputs are caught with forward hooks on a deep copy of the module in eval mode
(the caller's module is untouched).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.budget import check_allocation
from normdeploy.errors import user_code
from normdeploy.onnx_graph import inferred_value_infos, np_dtype, value_shape
from normdeploy.scopes import node_module_path
from normdeploy.verification.runners import (
    CPU,
    OrtRunner,
    default_dtype,
    forward_hooks,
    to_numpy,
)

if TYPE_CHECKING:
    import torch

# The graph with exposed values, written beside the staged model for its session.
EXPOSED_FILE = "exposed-values.onnx"


def _exposed_infos(model: onnx.ModelProto, names: Iterable[str]) -> list[onnx.ValueInfoProto]:
    """A graph output for each value of ``names`` the graph does not output already, typed
    from its declared value_info or, failing that, shape inference on a weight-free copy."""
    existing = {o.name for o in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n and n not in existing]
    known = {vi.name: vi for vi in model.graph.value_info}
    if any(n not in known for n in wanted):
        known.update((k, v) for k, v in inferred_value_infos(model).items() if k not in known)
    infos = []
    for name in wanted:
        vi = onnx.ValueInfoProto()
        if name in known:
            vi.CopyFrom(known[name])
        vi.name = name
        infos.append(vi)
    return infos


@contextlib.contextmanager
def values_exposed(model: onnx.ModelProto, names: Iterable[str]) -> Iterator[onnx.ModelProto]:
    """``model`` itself with the given values added to its graph outputs while the block
    runs, and exactly as it was after: no copy of its weights (a large model's session is
    made from ``SerializeToString()`` inside the block)."""
    graph_outputs = model.graph.output
    before = len(graph_outputs)
    graph_outputs.extend(_exposed_infos(model, names))
    try:
        yield model
    finally:
        del graph_outputs[before:]


def exposed_value_bytes(
    exposed: onnx.ModelProto, names: Iterable[str], feeds: Mapping[str, np.ndarray]
) -> int:
    """Bytes of the exposed values at these feeds, from their declared or inferred shapes;
    symbolic dims are sized from the graph inputs' dims, values of unknown size count 0."""
    sizes: dict[str, int] = {}
    for vi in exposed.graph.input:
        shape = value_shape(vi)
        fed = feeds.get(vi.name)
        if shape is None or fed is None or len(shape) != fed.ndim:
            continue
        for dim, n in zip(shape, fed.shape, strict=True):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(n))
    wanted = set(names)
    total = 0
    for vi in exposed.graph.output:
        shape = value_shape(vi)
        if vi.name not in wanted or shape is None:
            continue
        dims = [d if isinstance(d, int) else sizes.get(d or "") for d in shape]
        if any(d is None for d in dims):
            continue
        try:
            itemsize = np_dtype(vi.type.tensor_type.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        total += math.prod(int(d or 0) for d in dims) * itemsize
    return total


def write_exposed(staged: Path, infos: Sequence[onnx.ValueInfoProto], dest: Path) -> None:
    """The model file ``staged`` with ``infos`` added to its graph outputs, written to
    ``dest`` without reading the model: protobuf merges a message field that appears twice,
    so the file's bytes followed by a ModelProto holding only those outputs parse as the model
    with them appended (its external data, if any, is found beside ``dest`` as beside
    ``staged``)."""
    tail = onnx.ModelProto(graph=onnx.GraphProto(output=list(infos))).SerializeToString()
    shutil.copyfile(staged, dest)
    with open(dest, "ab") as f:
        f.write(tail)


def run_exposed(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    provider: str = CPU,
    staged: Path | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` with intermediate values exposed; their bytes are checked against the
    memory budget first (they are all held at once). The session has no memory arena: each
    value is a buffer of its own, freed when it goes, whatever else is kept.

    ``staged``: a file ``model`` was written to (in a staging directory). The session is then
    made from a copy of it with the values exposed (:func:`write_exposed`), not from the
    model's bytes in memory: its weights are not serialized again, nor held twice while
    onnxruntime reads them."""
    before = len(model.graph.output)
    with values_exposed(model, names) as exposed:
        check_allocation(
            f"{len(names)} intermediate value(s) exposed for comparison",
            exposed_value_bytes(exposed, names, feeds),
        )
        written: Path | None = None
        if staged is None:
            source: bytes | str = exposed.SerializeToString()
        else:
            written = staged.with_name(EXPOSED_FILE)
            write_exposed(staged, exposed.graph.output[before:], written)
            source = str(written)
    try:
        session = OrtRunner(source, provider, arena=False).session
    finally:
        if written is not None:
            written.unlink(missing_ok=True)
    del source
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, dict(feeds)), strict=True))


def module_output_values(graph: onnx.GraphProto) -> dict[str, str]:
    """For each module path, the ONNX value that is its output (the last leaving its nodes).

    Modules whose nodes all vanished (e.g. a BatchNorm folded into its Conv) are absent:
    callers must report them as having no counterpart rather than silently skipping them.
    """
    nodes = list(graph.node)
    members: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        path = node_module_path(node)
        if path is None:
            continue
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            members.setdefault(".".join(parts[:depth]), set()).add(i)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in graph.output}
    result: dict[str, str] = {}
    for path, inside in members.items():
        leaving = [
            (i, out)
            for i in inside
            for out in nodes[i].output
            if out
            and (out in graph_outputs or any(c not in inside for c in consumers.get(out, [])))
        ]
        if leaving:
            result[path] = max(leaving)[1]
    return result


@dataclass(frozen=True)
class ModuleCall:
    """One submodule in a forward pass: its first output (first tensor) and how often it ran."""

    path: str
    class_name: str
    output: np.ndarray | None
    calls: int


def trace_module_calls(
    module: torch.nn.Module, inputs: Sequence[Any], dtype: torch.dtype | None = None
) -> list[ModuleCall]:
    """Every submodule's first output, in the order their forwards first finished (eval copy).

    Children finish before their parents, so the order is execution order for leaves. A module
    called several times keeps its first output and reports the count. With ``dtype``
    (``torch.float64`` for ground truth) the copy and the floating inputs are converted first.
    """
    import torch

    model = copy.deepcopy(module).eval()
    if dtype is not None:
        model = model.to(dtype)
        inputs = [
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs
        ]
    firsts: dict[str, np.ndarray | None] = {}
    counts: dict[str, int] = {}
    classes: dict[str, str] = {}

    def hook_for(path: str) -> Any:
        def hook(mod: torch.nn.Module, _inp: Any, output: Any) -> None:
            counts[path] = counts.get(path, 0) + 1
            if path in firsts:
                return
            t = output[0] if isinstance(output, (tuple, list)) and output else output
            firsts[path] = None
            if isinstance(t, torch.Tensor):
                firsts[path] = to_numpy(t)
            classes[path] = type(mod).__name__

        return hook

    hooks = {p: hook_for(p) for p, _ in model.named_modules()}
    with (
        forward_hooks(model, post=hooks),
        torch.no_grad(),
        default_dtype(dtype),
        user_code("the model's forward"),
    ):
        model(*inputs)
    return [ModuleCall(p, classes[p], out, counts[p]) for p, out in firsts.items()]
