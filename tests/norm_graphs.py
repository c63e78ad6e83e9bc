"""Decomposed LayerNorm/RMSNorm graphs in every spelling exporters write, and the look-alikes
that must not be taken for norms: shared by the pattern matcher tests and the fuse-norms tests.

Graphs are built one value at a time with onnx.helper; the input ``x`` is (N, 4, 8) unless a
test says otherwise, in float32, float16 or bfloat16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (2, 4, 8)
EPS = 1e-3  # large enough that a pattern that lost its epsilon would differ visibly
RNG = np.random.default_rng(7)
ROOTS = ("sqrt_div", "sqrt_reciprocal_mul", "sqrt_one_div_mul", "pow_neg_half_mul")
GAMMA = (RNG.random(SHAPE[-1]) + 0.5).astype(np.float32)
BETA = RNG.normal(0, 1, SHAPE[-1]).astype(np.float32)
ELEM_TYPE = {
    np.float32: TensorProto.FLOAT,
    np.float16: TensorProto.FLOAT16,
    ml_dtypes.bfloat16: TensorProto.BFLOAT16,
}


class Graph:
    """A node list with constants, built one value at a time, in one float dtype."""

    def __init__(self, dtype=np.float32, x_shape=("N", *SHAPE[1:])) -> None:
        self.dtype = dtype
        self.x_shape = list(x_shape)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.extra_inputs: list[onnx.ValueInfoProto] = []

    @property
    def elem_type(self) -> int:
        return ELEM_TYPE[self.dtype]

    def input(self, name: str, shape) -> str:
        self.extra_inputs.append(helper.make_tensor_value_info(name, self.elem_type, shape))
        return name

    def const(self, name: str, value) -> str:
        """A constant; floats in the graph's dtype, integers as given."""
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(self.dtype)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op: str, *inputs: str, out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def model(self, output: str, opset: int = 18, extra_outputs=()) -> onnx.ModelProto:
        """Outputs are declared rank 3 with unknown dims: the graph says what they are."""
        outs = [output, *extra_outputs]
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", self.elem_type, self.x_shape),
             *self.extra_inputs],
            [helper.make_tensor_value_info(o, self.elem_type, [None] * 3) for o in outs],
            self.inits,
        )  # fmt: skip
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    def mean(self, value: str, out: str, axes=(-1,), opset: int = 18, keepdims: int = 1):
        if opset >= 18:
            return self.op(
                "ReduceMean", value, self.const(f"{out}_axes", np.array(axes, np.int64)),
                out=out, keepdims=keepdims,
            )  # fmt: skip
        return self.op("ReduceMean", value, out=out, axes=list(axes), keepdims=keepdims)

    def square(self, value: str, how: str, out: str) -> str:
        if how == "pow":
            return self.op("Pow", value, self.const(f"{out}_two", 2.0), out=out)
        return self.op("Mul", value, value, out=out)

    def normalize(self, centered: str, var_eps: str, how: str) -> str:
        """centered / sqrt(var_eps), spelled four ways."""
        if how == "pow_neg_half_mul":
            inv = self.op("Pow", var_eps, self.const("neg_half", -0.5), out="inv")
            return self.op("Mul", centered, inv, out="normed")
        std = self.op("Sqrt", var_eps, out="std")
        if how == "sqrt_div":
            return self.op("Div", centered, std, out="normed")
        if how == "sqrt_reciprocal_mul":
            inv = self.op("Reciprocal", std, out="inv")
        else:  # sqrt_one_div_mul, as TorchScript writes rsqrt
            inv = self.op("Div", self.const("one", 1.0), std, out="inv")
        return self.op("Mul", inv, centered, out="normed")


def rmsnorm_graph(
    square="pow", root="sqrt_div", scale=True, axes=(-1,), opset=18, dtype=np.float32
):
    g = Graph(dtype)
    sq = g.square("x", square, "sq")
    ms = g.mean(sq, "ms", axes, opset)
    ve = g.op("Add", ms, g.const("eps", EPS), out="ve")
    y = g.normalize("x", ve, root)
    if scale:
        y = g.op("Mul", g.const("gamma", GAMMA), y, out="scaled")
    return g, y


def layernorm_graph(
    square="pow", root="sqrt_div", affine=True, axes=(-1,), opset=18, dtype=np.float32
):
    g = Graph(dtype)
    mean = g.mean("x", "mean", axes, opset)
    d = g.op("Sub", "x", mean, out="d")
    sq = g.square(d, square, "sq")
    var = g.mean(sq, "var", axes, opset)
    ve = g.op("Add", var, g.const("eps", EPS), out="ve")
    y = g.normalize(d, ve, root)
    if affine:
        y = g.op("Mul", y, g.const("gamma", GAMMA), out="scaled")
        y = g.op("Add", y, g.const("beta", BETA), out="shifted")
    return g, y


# ----------------------------------------------------------------------------- look-alikes


def magnitude():
    """sqrt(x² + x'²) over two halves (an audio magnitude): squares, a root, no mean."""
    g = Graph()
    g.input("x2", ["N", 4, 8])
    s = g.op("Add", g.square("x", "pow", "sq"), g.square("x2", "pow", "sq2"), out="s")
    return g, g.op("Div", "x", g.op("Sqrt", s, out="mag"), out="y")


def rms_feature():
    """sqrt(mean(x²) + eps) kept as a feature: nothing is divided by it."""
    g = Graph()
    ms = g.mean(g.square("x", "pow", "sq"), "ms")
    ve = g.op("Add", ms, g.const("eps", EPS), out="ve")
    return g, g.op("Mul", g.op("Sqrt", ve, out="rms"), g.const("k", 3.0), out="y")


def leading_axis():
    """Mean of squares over the channel axis 1 of (N, 4, 8), not the trailing axis."""
    return rmsnorm_graph(scale=False, axes=(1,))


def eps_after_root():
    """x / (sqrt(mean(x²)) + eps): the epsilon is added after the root."""
    g = Graph()
    ms = g.mean(g.square("x", "pow", "sq"), "ms")
    std = g.op("Add", g.op("Sqrt", ms, out="r"), g.const("eps", EPS), out="std")
    return g, g.op("Div", "x", std, out="y")


def other_mean():
    """(x - mean(z)) / sqrt(mean((x - mean(z))²) + eps): a Sub of another tensor's mean."""
    g = Graph()
    g.input("z", ["N", 4, 8])
    d = g.op("Sub", "x", g.mean("z", "mean"), out="d")
    ve = g.op("Add", g.mean(g.square(d, "pow", "sq"), "var"), g.const("eps", EPS), out="ve")
    return g, g.normalize(d, ve, "sqrt_div")
