"""Ground truth in float64: a float64 copy of a PyTorch module or of an ONNX graph.

The tolerance policy (:mod:`~normdeploy.verification.compare`) measures every error against a
float64 evaluation of the reference on the same inputs. For a PyTorch reference that is a float64
deep copy of the module (:class:`~normdeploy.verification.runners.TorchRunner` with
``dtype=torch.float64``): exact for float32, float16 and bfloat16 weights. For an ONNX reference
it is a float64 copy of the graph run by onnxruntime (:class:`Float64Graph`): every floating
initializer, constant, cast target and declared type becomes double. onnxruntime's CPU provider
has no double kernel for some ops (:data:`NO_DOUBLE_KERNEL`, Conv among them), and a copy of a very
large graph costs its size twice; in those cases there is no float64 graph, the reason says why,
and the policy falls back to its documented nominal floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from normdeploy.errors import first_line
from normdeploy.onnx_graph import in_default_domain, subgraphs, weight_bytes
from normdeploy.verification.runners import CPU, OrtRunner

# Ops onnxruntime 1.32's CPU provider runs in float32 only (checked by a test, op by op).
NO_DOUBLE_KERNEL = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "InstanceNormalization", "AveragePool",
    "GlobalAveragePool", "LpPool", "GlobalLpPool", "Erf", "Gelu", "Hardmax", "Mean",
    "LRN", "DeformConv",
})  # fmt: skip
# A float64 copy holds every weight twice over: not worth it past this size.
MAX_WEIGHT_BYTES = 256 * 2**20
_LOW_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_TYPED_ATTRIBUTES = ("dtype", "output_datatype")


def float64_unfit(model: onnx.ModelProto) -> str | None:
    """Why ``model`` gets no float64 copy (an op without a double kernel, a subgraph, a custom
    domain, its size), or None when it can have one."""
    if model.functions:
        return "the graph has local functions"
    for node in model.graph.node:
        if not in_default_domain(node):
            return f"op {node.domain}.{node.op_type} is outside the default domain"
        if node.op_type in NO_DOUBLE_KERNEL:
            return f"onnxruntime has no double kernel for {node.op_type}"
        if any(True for _ in subgraphs(node)):
            return f"{node.op_type} carries a subgraph"
        if any(a.name in _TYPED_ATTRIBUTES for a in node.attribute):
            return f"{node.op_type} names an output type"
    if weight_bytes(model) > MAX_WEIGHT_BYTES:
        return f"its weights exceed {MAX_WEIGHT_BYTES // 2**20} MiB"
    return None


def _to_double(tensor: TensorProto) -> None:
    if tensor.data_type in _LOW_FLOATS:
        array = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _retype(values: Any) -> None:
    for vi in values:
        tt = vi.type.tensor_type
        if tt.elem_type in _LOW_FLOATS:
            tt.elem_type = TensorProto.DOUBLE


def float64_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 copy of ``model`` (call :func:`float64_unfit` first)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for tensor in graph.initializer:
        _to_double(tensor)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _to_double(a.t)
            elif node.op_type == "Cast" and a.name == "to" and a.i in _LOW_FLOATS:
                a.i = TensorProto.DOUBLE
        if node.op_type == "Constant":
            _constant_to_double(node)
    _retype(graph.input)
    _retype(graph.output)
    del graph.value_info[:]  # recomputed by onnxruntime
    return out


def _constant_to_double(node: onnx.NodeProto) -> None:
    """value_float / value_floats attributes make float32 tensors: rewrite them as doubles."""
    for a in list(node.attribute):
        if a.name in ("value_float", "value_floats"):
            values = np.array(a.f if a.name == "value_float" else list(a.floats), np.float64)
            node.attribute.remove(a)
            node.attribute.append(
                onnx.helper.make_attribute("value", numpy_helper.from_array(values))
            )


@dataclass
class Float64Graph:
    """A reference graph's float64 copy on onnxruntime CPU, or the reason there is none."""

    reason: str = ""
    runner: OrtRunner | None = None
    _input_types: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> Float64Graph:
        """The float64 copy of ``model``, its session opened (the reason when it cannot be)."""
        if reason := float64_unfit(model):
            return cls(reason)
        try:
            runner = OrtRunner(float64_graph(model), CPU).open("float64 copy")
        except Exception as exc:  # a kernel or type the copy cannot have: no float64 truth
            return cls(f"onnxruntime cannot run its float64 copy: {first_line(exc, 160)}")
        return cls("", runner)

    @property
    def available(self) -> bool:
        return self.runner is not None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float64 outputs for float32 ``feeds`` (floating inputs widened exactly)."""
        assert self.runner is not None
        wide = {
            k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()
        }
        return self.runner.infer(wide)
