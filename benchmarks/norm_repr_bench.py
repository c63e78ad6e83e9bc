"""How to represent GroupNorm and LayerNorm in ONNX: onnxruntime latency of each construction.

GroupNorm: ``GroupNormalization``-21 (what torch's dynamo exporter emits at opset ≥ 21) against
the InstanceNormalization construction (Reshape → InstanceNormalization → Reshape → Mul → Add, what
both exporters emit below opset 21). LayerNorm: ``LayerNormalization``-17 against the
decomposition that exporters emit below opset 17 (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add). Single-op graphs at
sizes from real networks; onnxruntime CPU, 2 threads, variants timed in alternating blocks.

    python benchmarks/norm_repr_bench.py --rounds 15
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from _common import (
    BLOCK_SECONDS,
    BUILD,
    THREADS,
    fmt_ratio,
    markdown_table,
    median,
    ort_session,
    paired_ratio,
    time_variants,
)
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-5
# (label, channels, height, width, groups): UNet/diffusion-style GroupNorm(32) sizes.
GN_SIZES = [
    ("UNet 320×64×64", 320, 64, 64, 32),
    ("UNet 640×32×32", 640, 32, 32, 32),
    ("UNet 1280×16×16", 1280, 16, 16, 32),
]
# (label, tokens, hidden): transformer LayerNorm over the last dim.
LN_SIZES = [("ViT-B 197×768", 197, 768), ("BERT-L 512×1024", 512, 1024)]


def _model(nodes: list, inits: list, x_shape: list, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model)
    return model


def _f32(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def groupnorm_native(c: int, groups: int, rng: np.random.Generator) -> onnx.ModelProto:
    inits = [_f32("gamma", rng.uniform(0.5, 1.5, c)), _f32("beta", rng.normal(0, 0.2, c))]
    node = helper.make_node(
        "GroupNormalization", ["x", "gamma", "beta"], ["y"], epsilon=EPS, num_groups=groups
    )
    return _model([node], inits, ["N", c, "H", "W"], 21)


def groupnorm_instancenorm(c: int, groups: int, rng: np.random.Generator) -> onnx.ModelProto:
    inits = [
        _f32("gamma", rng.uniform(0.5, 1.5, (c, 1, 1))),
        _f32("beta", rng.normal(0, 0.2, (c, 1, 1))),
        numpy_helper.from_array(np.array([0, groups, -1], dtype=np.int64), "grouped_shape"),
        _f32("ones", np.ones(groups)),
        _f32("zeros", np.zeros(groups)),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "grouped_shape"], ["xg"]),
        helper.make_node(
            "InstanceNormalization", ["xg", "ones", "zeros"], ["ng"], epsilon=EPS
        ),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Reshape", ["ng", "x_shape"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, inits, ["N", c, "H", "W"], 21)


def layernorm_native(d: int, rng: np.random.Generator) -> onnx.ModelProto:
    inits = [_f32("gamma", rng.uniform(0.5, 1.5, d)), _f32("beta", rng.normal(0, 0.2, d))]
    node = helper.make_node(
        "LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=EPS
    )
    return _model([node], inits, ["N", "T", d], 17)


def layernorm_decomposed(d: int, rng: np.random.Generator) -> onnx.ModelProto:
    inits = [
        _f32("gamma", rng.uniform(0.5, 1.5, d)),
        _f32("beta", rng.normal(0, 0.2, d)),
        _f32("eps", np.array(EPS)),
        _f32("two", np.array(2.0)),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centered", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, inits, ["N", "T", d], 17)


def _rng() -> np.random.Generator:
    """The same affine parameters for both constructions of a norm."""
    return np.random.default_rng(0)


def _save(model: onnx.ModelProto, name: str) -> Path:
    path = BUILD / "norms" / f"{name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def _max_diff(paths: dict[str, Path], x: np.ndarray) -> float:
    outs = [ort_session(p, False).run(None, {"x": x})[0] for p in paths.values()]
    return float(np.max(np.abs(outs[0].astype(np.float64) - outs[1])))


def bench_pair(
    kind: str, label: str, paths: dict[str, Path], x_shape: tuple, rounds: int
) -> list[list[str]]:
    """Rows for one size: both levels, batch 1 and 8; ratio = second variant / first."""
    (first, second) = paths
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(0).normal(0.3, 2.0, (batch, *x_shape)).astype(np.float32)
        diff = _max_diff(paths, x)
        for level, optimize in (("DISABLE_ALL", False), ("ENABLE_ALL", True)):
            s = time_variants(paths, x, optimize, rounds)
            rows.append([
                kind, label, batch, level, f"{median(s[first]) * 1e3:.3f}",
                f"{median(s[second]) * 1e3:.3f}", fmt_ratio(paired_ratio(s[second], s[first])),
                f"{diff:.1e}",
            ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    rows: list[list[str]] = []
    for label, c, h, w, g in GN_SIZES:
        tag = f"gn_{c}x{h}x{w}_g{g}"
        paths = {
            "GroupNormalization-21": _save(groupnorm_native(c, g, _rng()), tag + "_native"),
            "InstanceNorm construction": _save(
                groupnorm_instancenorm(c, g, _rng()), tag + "_in"
            ),
        }
        rows += bench_pair("GroupNorm(32)", label, paths, (c, h, w), args.rounds)
    for label, t, d in LN_SIZES:
        tag = f"ln_{t}x{d}"
        paths = {
            "LayerNormalization-17": _save(layernorm_native(d, _rng()), tag + "_native"),
            "decomposed": _save(layernorm_decomposed(d, _rng()), tag + "_decomposed"),
        }
        rows += bench_pair("LayerNorm", label, paths, (t, d), args.rounds)
    headers = ["norm", "size", "batch", "ORT level", "native op ms", "alternative ms",
               "alternative / native", "max |Δ|"]  # fmt: skip
    print(
        f"#### Norm representations, onnxruntime CPU, {THREADS} threads ({args.rounds} rounds "
        f"of alternating blocks of ≥ {BLOCK_SECONDS * 1e3:.0f} ms). Native op: "
        "GroupNormalization-21 / LayerNormalization-17; alternative: InstanceNormalization "
        "construction / decomposed LayerNorm.\n"
    )
    print(markdown_table(headers, rows), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
