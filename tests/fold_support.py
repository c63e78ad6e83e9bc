"""What the fold tests share: graphs written as text, BatchNorm parameters far from identity,
the fold check (`fold_and_check`), summed parallel branches (`branch`, `identity`, `graph`) for
the merge tests, and deliberately wrong passes for the self-check tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from normdeploy.folding import fold_bn
from normdeploy.io import save_onnx
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.passes import PassResult
from normdeploy.passes.fold_bn import FoldBatchNorm
from normdeploy.passes.surgery import overwrite_tensor
from normdeploy.verification.feeds import make_feeds
from normdeploy.verification.runners import OrtRunner

# fp32 graphs here are tiny (≤ 3×3×8 accumulations); folding only re-rounds each weight once
# (relative 6e-8), so 1e-5 is ~100× the expected difference and far below a wrong fold's error.
RTOL32, ATOL32 = 1e-5, 1e-5
RNG = np.random.default_rng(1234)


def parse(graph: str, inits: dict[str, np.ndarray] | None = None, opset: int = 17, **kw):
    """A model from onnx.parser text plus numpy initializers."""
    imports = f'"" : {opset}' + "".join(
        f', "{d}" : {v}' for d, v in kw.get("domains", {}).items()
    )
    model = onnx.parser.parse_model(f"<ir_version: 8, opset_import: [{imports}]>\n{graph}")
    for name, value in (inits or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def bn_params(c: int, dtype=np.float32, prefix: str = "") -> dict[str, np.ndarray]:
    """BatchNorm parameters far from identity (signed scale, shifted mean, var in [0.1, 3])."""
    sign = np.where(RNG.random(c) < 0.3, -1.0, 1.0)
    return {
        f"{prefix}g": (sign * RNG.uniform(0.5, 2.0, c)).astype(dtype),
        f"{prefix}b": RNG.normal(0, 1, c).astype(dtype),
        f"{prefix}m": RNG.normal(0, 1, c).astype(dtype),
        f"{prefix}v": RNG.uniform(0.1, 3.0, c).astype(dtype),
    }


def w(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.normal(0, 0.5, shape).astype(dtype)


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def run(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = make_feeds(graph_input_specs(model), batch_size=2, seed=seed)
    return OrtRunner(model).infer(feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, rtol=RTOL32, atol=ATOL32):
    ra, rb = run(a), run(b)
    assert list(ra) == list(rb)
    for name in ra:
        np.testing.assert_allclose(rb[name], ra[name], rtol=rtol, atol=atol, err_msg=name)


def fold_and_check(model: onnx.ModelProto, folded: int, rtol=RTOL32, atol=ATOL32):
    """Fold (no built-in verify), then: BN count, every kept BN with a reason, checker, caller's
    model untouched, numerics against the unfolded graph (onnxruntime, optimizations off)."""
    before = model.SerializeToString()
    result = fold_bn(model, verify=False)
    assert model.SerializeToString() == before, "fold_bn mutated the caller's ModelProto"
    assert len(result.folded) == folded, result.to_text()
    assert len(result.ledger) == sum(
        n.op_type == "BatchNormalization" for n in model.graph.node
    )
    assert all(e.reason for e in result.skipped), result.to_text()
    assert all(e.direction in ("preceding", "following") for e in result.folded)
    onnx.checker.check_model(result.model, full_check=True)
    onnx.shape_inference.infer_shapes(result.model, check_type=True, strict_mode=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert_same_outputs(model, result.model, rtol, atol)
    return result


CONV_BN_DYNAMIC_BATCH = """G (float[N,3,8,8] X) => (float[N,16,6,6] Y) {
    A = Conv (X, W, B)
    Y = BatchNormalization (A, g, b, m, v)
}"""


def conv_bn_model() -> onnx.ModelProto:
    """Conv(+bias) → BN with a dynamic batch."""
    return parse(CONV_BN_DYNAMIC_BATCH, {"W": w(16, 3, 3, 3), "B": w(16), **bn_params(16)})


def conv_bn_file(path: Path, external: bool = False) -> onnx.ModelProto:
    """:func:`conv_bn_model` saved to ``path`` (weights external if asked)."""
    model = conv_bn_model()
    save_onnx(model, path, external_data=external)
    return model


# ----------------------------------------------------------------------------- parallel branches


def branch(name: str, x: str, k: int, c_in: int, c_out: int, attrs: str = "", group: int = 1,
           dtype=np.float32) -> tuple[str, dict[str, np.ndarray]]:  # fmt: skip
    """Conv (no bias) → BatchNormalization, output ``name``; pads k//2 unless ``attrs`` says."""
    attrs = attrs or f"pads=[{k // 2},{k // 2},{k // 2},{k // 2}]"
    if group > 1:
        attrs += f", group={group}"
    text = (
        f"{name}_c = Conv <{attrs}> ({x}, {name}_W)\n"
        f"{name} = BatchNormalization ({name}_c, {name}g, {name}b, {name}m, {name}v)\n"
    )
    inits = {f"{name}_W": w(c_out, c_in // group, k, k, dtype=dtype)}
    inits.update(bn_params(c_out, dtype, prefix=name))
    return text, inits


def identity(name: str, x: str, c: int, dtype=np.float32) -> tuple[str, dict[str, np.ndarray]]:
    return (
        f"{name} = BatchNormalization ({x}, {name}g, {name}b, {name}m, {name}v)\n",
        bn_params(c, dtype, prefix=name),
    )


def graph(inputs: str, outputs: str, *parts: tuple[str, dict], body: str = "", **kw):
    """A model from branches (``branch``/``identity``) and the ``body`` that sums them."""
    text = "".join(p[0] for p in parts) + body
    inits: dict[str, np.ndarray] = {}
    for p in parts:
        inits.update(p[1])
    return parse(f"G ({inputs}) => ({outputs}) {{\n{text}}}", inits, **kw)


def repvgg_block_model() -> onnx.ModelProto:
    """A RepVGG block as timm writes it: (conv1×1+BN + conv3×3+BN) + BN(x), then ReLU."""
    return graph(
        "float[N,8,6,6] X", "float[N,8,6,6] Y",
        branch("k", "X", 3, 8, 8), branch("p", "X", 1, 8, 8), identity("i", "X", 8),
        body="s = Add (p, k)\nt = Add (s, i)\nY = Relu (t)\n",
    )  # fmt: skip


# ----------------------------------------------------------------------------- wrong passes


class _CorruptsFoldedWeight(FoldBatchNorm):
    """FoldBatchNorm, then a deliberate error in a folded weight (the first Conv/Gemm/… of the
    first folded BN's target op): the self-check must catch it. Subclasses say how the weight goes wrong."""

    def corrupt(self, weight: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def call(self, model: onnx.ModelProto) -> PassResult:
        result = super().call(model)
        entry = next(e for e in result.ledger if e.folded)
        # the first node of the target's op: the ledger labels the target as it was in the
        # input, and a preceding fold renames its output
        target = next(n for n in model.graph.node if n.op_type == entry.target_op)
        tensor = next(t for t in model.graph.initializer if t.name == target.input[1])
        overwrite_tensor(tensor, self.corrupt(numpy_helper.to_array(tensor).copy()))
        return result


class FoldsOnePercentOff(_CorruptsFoldedWeight):
    """Scales the folded weight by 1.01 (a BN scale 1% off)."""

    def corrupt(self, weight: np.ndarray) -> np.ndarray:
        return weight * weight.dtype.type(1.01)


class PlantsOneBadWeight(_CorruptsFoldedWeight):
    """Adds 0.5 to one element of the folded weight."""

    def corrupt(self, weight: np.ndarray) -> np.ndarray:
        weight.reshape(-1)[0] += 0.5
        return weight


# ----------------------------------------------------------------------------- symbolic dims


def multiple_of_model(step: int = 32) -> onnx.ModelProto:
    """Conv → BN, plus its step×step average broadcast back by a nearest Resize: as PaddleOCR's
    detector (step 32), it runs only where H and W are multiples of ``step`` (``[N, 3, H, W]``
    declared)."""
    text = f"""G (float[N,3,H,W] X) => (float[N,8,H,W] Y) {{
        A = Conv <pads=[1,1,1,1]> (X, W)
        B = BatchNormalization (A, g, b, m, v)
        P = AveragePool <kernel_shape=[{step},{step}], strides=[{step},{step}]> (B)
        U = Resize <mode="nearest"> (P, roi, scales)
        Y = Add (B, U)
    }}"""
    return parse(text, {
        "W": w(8, 3, 3, 3), **bn_params(8), "roi": np.zeros(0, np.float32),
        "scales": np.array([1, 1, step, step], np.float32),
    })  # fmt: skip
