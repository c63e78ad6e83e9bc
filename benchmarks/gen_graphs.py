"""Generate BN-carrying ResNet-style ONNX graphs of a chosen file size (cached under build/).

The graph is what an export without optimization gives: a stem Conv→BatchNormalization→Relu,
then ``blocks`` basic blocks (Conv→BN→Relu→Conv→BN, identity Add, Relu), GlobalAveragePool,
Gemm. With 52 blocks there are 105 BatchNormalization nodes. Width sets the size (3×3 conv
weights dominate). BN statistics and affine parameters are far from identity, so a wrong fold
shows in the numbers. ``with_bn=False`` builds the same network with conv biases instead of BN:
the floor that a perfect fold reaches.

    python benchmarks/gen_graphs.py 5 50 500
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from _common import BUILD, fmt_bytes
from onnx import TensorProto, helper, numpy_helper

BLOCKS = 52
SPATIAL = 8
IN_CHANNELS = 3
CLASSES = 10
OPSET = 17
INPUT_SHAPE = ["N", IN_CHANNELS, SPATIAL, SPATIAL]


def width_for_size(size_mb: float, blocks: int = BLOCKS) -> int:
    """Channel width that makes the graph about ``size_mb`` MiB (two 3×3 convs per block)."""
    per_channel_sq = (2 * blocks + 0.1) * 9 * 4
    return max(8, round(math.sqrt(size_mb * 2**20 / per_channel_sq)))


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, bias: bool) -> str:
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / (cin * k * k)))
        inputs = [x, self.init(f"{name}.weight", w)]
        if bias:
            inputs.append(self.init(f"{name}.bias", 0.1 * self.rng.standard_normal(cout)))
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [f"{name}.out"], name=name,
                kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1],
            )
        )  # fmt: skip
        return f"{name}.out"

    def bn(self, x: str, name: str, c: int) -> str:
        rng = self.rng
        params = [
            self.init(f"{name}.weight", rng.uniform(0.1, 0.4, c)),
            self.init(f"{name}.bias", 0.1 * rng.standard_normal(c)),
            self.init(f"{name}.running_mean", 0.5 * rng.standard_normal(c)),
            self.init(f"{name}.running_var", rng.uniform(0.5, 2.0, c)),
        ]
        self.nodes.append(
            helper.make_node(
                "BatchNormalization", [x, *params], [f"{name}.out"], name=name, epsilon=1e-5
            )
        )
        return f"{name}.out"

    def op(self, op_type: str, inputs: list[str], name: str) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}.out"], name=name))
        return f"{name}.out"

    def conv_norm(self, x: str, name: str, cin: int, cout: int, with_bn: bool) -> str:
        y = self.conv(x, f"{name}.conv", cin, cout, 3, bias=not with_bn)
        return self.bn(y, f"{name}.bn", cout) if with_bn else y


def resnet_graph(width: int, blocks: int = BLOCKS, with_bn: bool = True) -> onnx.ModelProto:
    """The ResNet-style graph described in the module docstring."""
    b = _Builder(seed=width * 1000 + blocks)
    x = b.op("Relu", [b.conv_norm("input", "stem", IN_CHANNELS, width, with_bn)], "stem.relu")
    for i in range(blocks):
        h = b.conv_norm(x, f"block{i}.a", width, width, with_bn)
        h = b.op("Relu", [h], f"block{i}.r1")
        h = b.conv_norm(h, f"block{i}.b", width, width, with_bn)
        x = b.op("Relu", [b.op("Add", [h, x], f"block{i}.add")], f"block{i}.r2")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "pool")], "flatten")
    fc_w = b.rng.standard_normal((CLASSES, width), dtype=np.float32) / np.sqrt(width)
    inputs = [x, b.init("fc.weight", fc_w), b.init("fc.bias", np.zeros(CLASSES))]
    b.nodes.append(helper.make_node("Gemm", inputs, ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes,
        f"resnet_w{width}_b{blocks}{'' if with_bn else '_nobn'}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, INPUT_SHAPE)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def graph_path(size_mb: float, with_bn: bool = True) -> Path:
    """Cached path of the generated graph for ``size_mb``; generated on first use."""
    width = width_for_size(size_mb)
    path = BUILD / "graphs" / f"resnet_{size_mb:g}mb_w{width}{'' if with_bn else '_nobn'}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = resnet_graph(width, with_bn=with_bn)
        n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        if with_bn and n_bn != 2 * BLOCKS + 1:
            raise RuntimeError(f"{path}: expected {2 * BLOCKS + 1} BN nodes, built {n_bn}")
        tmp = path.with_suffix(".tmp")
        onnx.save_model(model, str(tmp))
        tmp.replace(path)
    return path


def count_bn(path: Path) -> int:
    model = onnx.load_model(str(path), load_external_data=False)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="+", type=float, help="target sizes in MiB")
    args = parser.parse_args(argv)
    for size in args.sizes:
        p = graph_path(size)
        print(f"{p}  {fmt_bytes(p.stat().st_size)}  BN={count_bn(p)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
