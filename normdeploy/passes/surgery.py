"""Graph edits shared by the passes: fresh names, constant rewrites, and cleanup of what an edit
left without readers.

Memory: a weight read only by the node being rewritten is rewritten in its own initializer (same
name); a weight with other readers is left alone and the new value gets a fresh name that collides
with nothing in the model (subgraphs and functions included). Tensors and Constant/Identity/
Transpose nodes that the edits left without readers are removed; nothing else is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normdeploy.onnx_graph import (
    CONSTANT_PASSTHROUGH,
    GraphIndex,
    in_default_domain,
    nested_graphs,
)

_PURE_WEIGHT_OPS = ("Constant", *CONSTANT_PASSTHROUGH)


class NameAllocator:
    """Every name in the model, so new tensor names never collide (at any depth)."""

    def __init__(self, model: onnx.ModelProto, suffix: str) -> None:
        self.suffix = suffix
        self.used: set[str] = set()
        graphs = [model.graph, *nested_graphs(model.graph.node)]
        for fn in model.functions:
            self.used.add(fn.name)
            self.used.update(n.name for n in fn.node)
            self.used.update(v for n in fn.node for v in (*n.input, *n.output))
            graphs.extend(nested_graphs(fn.node))
        for g in graphs:
            self.used.add(g.name)
            self.used.update(t.name for t in g.initializer)
            self.used.update(t.values.name for t in g.sparse_initializer)
            self.used.update(v.name for v in (*g.input, *g.output, *g.value_info))
            for n in g.node:
                self.used.update(n.input)
                self.used.update(n.output)
                self.used.add(n.name)

    def fresh(self, base: str) -> str:
        name, i = f"{base}{self.suffix}", 1
        while name in self.used:
            i += 1
            name = f"{base}{self.suffix}{i}"
        self.used.add(name)
        return name


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (replace or add) attribute ``name`` of ``node``."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def overwrite_tensor(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Replace a tensor's data (and dims) in place, keeping its name, type and doc string."""
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(name)
    del tensor.dims[:]
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


class GraphEditor:
    """Edits to one graph that keep its :class:`GraphIndex` current, and the cleanup after them.

    Removed nodes and values are collected and deleted together, in :meth:`finish`, after every
    edit: the index holds references to the nodes until then.
    """

    def __init__(
        self, graph: onnx.GraphProto, index: GraphIndex, names: NameAllocator
    ) -> None:
        self.graph = graph
        self.index = index
        self.names = names
        self.removed: list[onnx.NodeProto] = []
        self.candidates: list[str] = []  # values that may have lost their last reader
        self.gone: set[str] = set()  # values that no longer exist

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        """A new initializer under a fresh name derived from ``base``."""
        name = self.names.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.index.init[name] = self.graph.initializer[len(self.graph.initializer) - 1]
        return name

    def rewire_input(self, node: onnx.NodeProto, slot: int, value: str) -> None:
        """Make input ``slot`` of ``node`` read ``value``; the old value may become unread."""
        self.index.detach(node)
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        node.input[slot] = value
        self.index.attach(node)
        if old and old != value:
            self.candidates.append(old)

    def rename_output(self, node: onnx.NodeProto, slot: int, value: str) -> None:
        """Make output ``slot`` of ``node`` be ``value``; the old name disappears."""
        self.index.detach(node)
        self.gone.add(node.output[slot])
        node.output[slot] = value
        self.index.attach(node)

    def set_input_constant(
        self, node: onnx.NodeProto, slot: int, value: np.ndarray, role: str
    ) -> None:
        """Make input ``slot`` of ``node`` the constant ``value``: in place when only ``node``
        reads the old initializer, else under a fresh name (shared weights stay untouched)."""
        old = node.input[slot] if slot < len(node.input) else ""
        if old and self.index.owns_initializer(old, node):
            overwrite_tensor(self.index.init[old], value)
            return
        name = self.add_initializer(old or f"{node.name or node.op_type}.{role}", value)
        self.rewire_input(node, slot, name)

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Remove ``node``; its inputs may become unread."""
        self.index.detach(node)
        self.removed.append(node)
        self.candidates.extend(name for name in node.input if name)

    def finish(self) -> None:
        """Drop what lost its last reader, then delete removed nodes and stale value_info."""
        index, graph = self.index, self.graph
        dead_init: set[str] = set()
        work = list(self.candidates)
        while work:
            name = work.pop()
            if (
                index.consumers.get(name)
                or name in index.graph_outputs
                or name in index.subgraph_uses
                or name in self.gone
            ):
                continue
            if name in index.init:
                if name not in index.graph_inputs:
                    dead_init.add(name)
                    self.gone.add(name)
                continue
            node = index.producer.get(name)
            if (
                node is not None
                and node.op_type in _PURE_WEIGHT_OPS
                and in_default_domain(node)
                and len(node.output) == 1
            ):
                index.detach(node)
                self.removed.append(node)
                self.gone.add(name)
                work.extend(i for i in node.input if i)
        if self.removed:
            ids = {id(n) for n in self.removed}
            for k in reversed(range(len(graph.node))):
                if id(graph.node[k]) in ids:
                    del graph.node[k]
        if dead_init:
            for k in reversed(range(len(graph.initializer))):
                if graph.initializer[k].name in dead_init:
                    del graph.initializer[k]
        if self.gone:
            for k in reversed(range(len(graph.value_info))):
                if graph.value_info[k].name in self.gone:
                    del graph.value_info[k]
