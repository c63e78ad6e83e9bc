"""Property tests for fold-bn: random small graphs around a BatchNormalization, folded, then run
by onnxruntime (optimizations off) against the unfolded graph. Whether a fold must happen is
decided from the generated structure, independently of the pass."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normdeploy.folding import fold_bn
from normdeploy.verification.runners import OrtRunner

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
F32 = TensorProto.FLOAT


def _bn_inits(rng: np.random.Generator, c: int, prefix: str) -> list[onnx.TensorProto]:
    """Statistics far from identity: signed scales, var over four decades."""
    sign = np.where(rng.random(c) < 0.3, -1.0, 1.0)
    values = {
        "g": sign * rng.uniform(0.3, 3.0, c),
        "b": rng.normal(0, 1, c),
        "m": rng.normal(0, 1, c),
        "v": 10.0 ** rng.uniform(-2, 2, c),
    }
    return [
        numpy_helper.from_array(v.astype(np.float32), prefix + k) for k, v in values.items()
    ]


def _bn(x: str, y: str, prefix: str, eps: float) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [x] + [prefix + k for k in "gbmv"], [y], epsilon=eps
    )


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, shape)


def _check(model: onnx.ModelProto, must_fold: bool, seed: int) -> None:
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    result = fold_bn(model, verify=False)
    assert len(result.ledger) == n_bn
    if must_fold:
        assert len(result.folded) == 1, result.to_text()
    onnx.checker.check_model(result.model, full_check=True)
    names = [t.name for t in result.model.graph.initializer]
    assert len(names) == len(set(names))
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        x = rng.normal(0, 1.5, shape)
        x.reshape(-1)[:: max(1, x.size // 3)] *= 20.0  # outliers
        feeds[vi.name] = x.astype(np.float32)
    expected = OrtRunner(model).infer(feeds)
    actual = OrtRunner(result.model).infer(feeds)
    for name, ref in expected.items():
        # fp32: folding re-rounds each weight once and changes the summation order; the error
        # is a few ulp of Σ|w·x|, so 2e-5 of the output's largest magnitude bounds it.
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(
            actual[name], ref, rtol=1e-4, atol=2e-5 * scale, err_msg=name
        )


@st.composite
def preceding_graphs(draw):
    """Conv / ConvTranspose / Gemm / MatMul → [bias Add] → BN, with sharing and readers."""
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    bias_add = draw(st.booleans())
    shared_weight = draw(st.booleans())
    producer_read_elsewhere = draw(st.integers(0, 4)) == 0
    bn_is_output = draw(st.booleans())
    nodes, inits, outputs = [], [], []
    if op in ("Conv", "ConvTranspose"):
        group = draw(st.integers(1, 3))
        cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        nd = draw(st.integers(1, 2))
        k = draw(st.integers(1, 3))
        size = draw(st.integers(k, 5))
        pad = draw(st.integers(0, 1))
        c_in, c_out = group * cin_g, group * cout_g
        x_shape = [2, c_in] + [size] * nd
        w_shape = [c_out, cin_g] if op == "Conv" else [c_in, cout_g]
        w_shape += [k] * nd
        attrs = {"group": group, "pads": [pad] * (2 * nd)}
        if op == "ConvTranspose":
            attrs["strides"] = [draw(st.integers(1, 2))] * nd
        has_bias = draw(st.booleans())
        c = c_out
        bias_shape = draw(st.sampled_from([[c], [1, c]])) + [1] * nd
        inits.append(
            numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W")
        )
        ins = ["X", "W"]
        if has_bias:
            inits.append(numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "B"))
            ins.append("B")
        nodes.append(helper.make_node(op, ins, ["P"], **attrs))
        if shared_weight and op == "Conv":
            nodes.append(helper.make_node(op, ["X", "W"], ["S"], **attrs))
            outputs.append(_vi("S", None))
    else:
        m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        x_shape, c = [m, k], n
        bias_shape = draw(st.sampled_from([[n], [1, n]]))
        trans_b = draw(st.booleans()) if op == "Gemm" else False
        w_shape = [n, k] if trans_b else [k, n]
        inits.append(
            numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W")
        )
        ins = ["X", "W"]
        attrs = {}
        if op == "Gemm":
            attrs = {
                "transB": int(trans_b),
                "alpha": draw(st.sampled_from([1.0, 0.5, -2.0])),
                "beta": draw(st.sampled_from([1.0, 0.0, 3.0])),
            }
            c_shape = draw(st.sampled_from([None, [n], [1, n], [m, n], [m, 1]]))
            if c_shape is not None:
                c_val = rng.normal(0, 1, c_shape).astype(np.float32)
                inits.append(numpy_helper.from_array(c_val, "C"))
                ins.append("C")
        nodes.append(helper.make_node(op, ins, ["P"], **attrs))
        if shared_weight:
            nodes.append(helper.make_node(op, ins, ["S"], **attrs))
            outputs.append(_vi("S", None))
    bn_in = "P"
    if bias_add:
        inits.append(
            numpy_helper.from_array(rng.normal(0, 1, bias_shape).astype(np.float32), "A")
        )
        nodes.append(helper.make_node("Add", ["P", "A"] if seed % 2 else ["A", "P"], ["Q"]))
        bn_in = "Q"
    inits += _bn_inits(rng, c, "bn_")
    nodes.append(_bn(bn_in, "Y", "bn_", eps))
    outputs.insert(0, _vi("Y", None))
    if not bn_is_output:
        nodes.append(helper.make_node("Relu", ["Y"], ["R"]))
        outputs[0] = _vi("R", None)
    if producer_read_elsewhere:
        outputs.append(_vi("P", None))
    model = _model(nodes, [_vi("X", x_shape)], outputs, inits)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, not producer_read_elsewhere, seed


@settings(max_examples=320, **SETTINGS)
@given(preceding_graphs())
def test_fold_into_preceding_is_exact(case) -> None:
    model, must_fold, seed = case
    _check(model, must_fold, seed)


@st.composite
def following_graphs(draw):
    """BN on a graph input, then a Conv (padded or not) or a Gemm."""
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    op = draw(st.sampled_from(["Conv", "Gemm"]))
    eps = draw(st.sampled_from([1e-5, 1e-2]))
    nodes, inits = [], []
    if op == "Conv":
        group = draw(st.integers(1, 3))
        cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        k, stride, dil = (
            draw(st.integers(1, 3)),
            draw(st.integers(1, 2)),
            draw(st.integers(1, 2)),
        )
        pad = draw(st.integers(0, 4)) == 0
        c = group * cin_g
        size = (k - 1) * dil + 1 + draw(st.integers(0, 3))
        x_shape = [2, c, size, size]
        attrs = {"group": group, "strides": [stride] * 2, "dilations": [dil] * 2}
        if pad:
            attrs["pads"] = [1, 1, 1, 1]
        w_shape = [group * cout_g, cin_g, k, k]
        ins = ["Y", "W"]
        if draw(st.booleans()):
            bias = rng.normal(0, 1, group * cout_g).astype(np.float32)
            inits.append(numpy_helper.from_array(bias, "B"))
            ins.append("B")
        must_fold = not pad
    else:
        m, c, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        x_shape = [m, c]
        trans_b = draw(st.booleans())
        w_shape = [n, c] if trans_b else [c, n]
        attrs = {
            "transB": int(trans_b),
            "alpha": draw(st.sampled_from([1.0, 0.25])),
            "beta": draw(st.sampled_from([1.0, 0.0, 2.0])),
        }
        ins = ["Y", "W"]
        c_shape = draw(st.sampled_from([None, [n], [m, n]]))
        if c_shape is not None:
            inits.append(
                numpy_helper.from_array(rng.normal(0, 1, c_shape).astype(np.float32), "C")
            )
            ins.append("C")
        must_fold = True
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, w_shape).astype(np.float32), "W"))
    inits += _bn_inits(rng, c, "bn_")
    nodes.append(_bn("X", "Y", "bn_", eps))
    nodes.append(helper.make_node(op, ins, ["Z"], **attrs))
    model = _model(nodes, [_vi("X", x_shape)], [_vi("Z", None)], inits)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, must_fold, seed


@settings(max_examples=200, **SETTINGS)
@given(following_graphs())
def test_fold_into_following_is_exact_or_skipped(case) -> None:
    model, must_fold, seed = case
    _check(model, must_fold, seed)
    if not must_fold:
        result = fold_bn(model, verify=False)
        assert not result.folded and "padded Conv" in result.ledger[0].reason


# ----------------------------------------------------------------------------- chains, dtypes

_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16),
           "float64": (TensorProto.DOUBLE, np.float64)}  # fmt: skip


def _stats(rng: np.random.Generator, c: int, kind: str) -> dict[str, np.ndarray]:
    if kind == "identity":  # affine identity and fresh statistics
        return {"g": np.ones(c), "b": np.zeros(c), "m": np.zeros(c), "v": np.ones(c)}
    sign = np.where(rng.random(c) < 0.3, -1.0, 1.0)
    stats = {
        "g": sign * rng.uniform(0.3, 3.0, c),
        "b": rng.normal(0, 1, c),
        "m": rng.normal(0, 1, c),
        "v": 10.0 ** rng.uniform(-2, 2, c),
    }
    if kind == "tiny_var":
        stats["v"] = 10.0 ** rng.uniform(-7, -4, c)
    elif kind == "large_mean":
        stats["m"] = rng.normal(0, 1, c) * 300.0
    return stats


@st.composite
def chains(draw):
    """A random chain with branches: 4-D (Conv/ConvTranspose/BN/Relu/Add) in fp32/fp16, or
    2-D (Gemm/MatMul/BN/Relu/Add) in fp32/fp16/fp64 (onnxruntime CPU has no float64 Conv)."""
    dtype = draw(st.sampled_from(["float32", "float16", "float64"]))
    spatial = dtype != "float64" and draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    elem, npdt = _DTYPES[dtype]
    nodes, inits, extra_outputs, bns = [], [], [], []
    counter = iter(range(1000))

    def fresh(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    def const(value: np.ndarray, prefix: str) -> str:
        name = fresh(prefix)
        inits.append(numpy_helper.from_array(np.asarray(value).astype(npdt), name))
        return name

    batch = draw(st.integers(1, 2))
    c = draw(st.integers(1, 8))
    size = draw(st.integers(3, 6))
    x_shape = [batch, c, size, size] if spatial else [batch, c]
    live = [("X", c, size)]  # (value, channels, spatial size)
    cur, cur_c, cur_s = "X", c, size
    weights: dict[tuple, str] = {}  # shape → a weight name to share
    for _ in range(draw(st.integers(1, 6))):
        op = draw(
            st.sampled_from(
                ["Conv", "ConvTranspose", "BN", "BN", "Relu", "Add", "Add_const"]
                if spatial
                else ["Gemm", "MatMul", "BN", "BN", "Relu", "Add", "Add_const"]
            )
        )
        out = fresh("v")
        name = fresh("n")
        if op == "BN":
            kind = draw(st.sampled_from(["plain", "tiny_var", "large_mean", "identity"]))
            eps = draw(st.sampled_from([1e-5, 1e-3]))
            stats = _stats(rng, cur_c, kind)
            names = [const(stats[k], f"bn{k}") for k in "gbmv"]
            nodes.append(
                helper.make_node(
                    "BatchNormalization", [cur, *names], [out], name=name, epsilon=eps
                )
            )
            bns.append(name)
        elif op == "Relu":
            nodes.append(helper.make_node("Relu", [cur], [out], name=name))
        elif op == "Add_const":
            shape = (
                [1, cur_c, 1, 1] if spatial else draw(st.sampled_from([[cur_c], [1, cur_c]]))
            )
            a = const(rng.normal(0, 1, shape), "a")
            ins = [cur, a] if draw(st.booleans()) else [a, cur]
            nodes.append(helper.make_node("Add", ins, [out], name=name))
        elif op == "Add":  # a branch: an earlier value of the same shape is read again
            same = [v for v, vc, vs in live if vc == cur_c and vs == cur_s and v != cur]
            if not same:
                continue
            other = draw(st.sampled_from(same))
            nodes.append(helper.make_node("Add", [cur, other], [out], name=name))
        elif op in ("Conv", "ConvTranspose"):
            divisors = [g for g in range(1, cur_c + 1) if cur_c % g == 0]
            group = draw(st.sampled_from(divisors))
            out_c = group * draw(st.integers(1, max(1, 8 // group)))
            k = draw(st.integers(1, min(3, cur_s)))
            stride = draw(st.integers(1, 2))
            attrs = {"group": group, "strides": [stride] * 2}
            if op == "Conv":
                pad = draw(st.integers(0, 1))
                dil = draw(st.integers(1, 2)) if (k - 1) * 2 + 1 <= cur_s + 2 * pad else 1
                attrs |= {"pads": [pad] * 4, "dilations": [dil] * 2}
                new_s = (cur_s + 2 * pad - dil * (k - 1) - 1) // stride + 1
                w_shape = (out_c, cur_c // group, k, k)
            else:
                outpad = draw(st.integers(0, stride - 1))
                attrs["output_padding"] = [outpad] * 2
                new_s = (cur_s - 1) * stride + k + outpad
                w_shape = (cur_c, out_c // group, k, k)
            if new_s < 1 or new_s > 12:
                continue
            share = w_shape in weights and draw(st.booleans())
            wname = weights[w_shape] if share else const(rng.normal(0, 0.5, w_shape), "w")
            weights.setdefault(w_shape, wname)
            ins = [cur, wname]
            if draw(st.booleans()):
                ins.append(const(rng.normal(0, 1, out_c), "bias"))
            nodes.append(helper.make_node(op, ins, [out], name=name, **attrs))
            cur_c, cur_s = out_c, new_s
        else:  # Gemm / MatMul on 2-D
            n = draw(st.integers(1, 8))
            trans_b = op == "Gemm" and draw(st.booleans())
            w_shape = (n, cur_c) if trans_b else (cur_c, n)
            share = w_shape in weights and draw(st.booleans())
            wname = weights[w_shape] if share else const(rng.normal(0, 0.5, w_shape), "w")
            weights.setdefault(w_shape, wname)
            ins, attrs = [cur, wname], {}
            if op == "Gemm":
                attrs = {
                    "transB": int(trans_b),
                    "alpha": draw(st.sampled_from([1.0, 0.5, -2.0])),
                    "beta": draw(st.sampled_from([1.0, 0.0, 3.0])),
                }
                c_shape = draw(st.sampled_from([None, [n], [1, n], [batch, n]]))
                if c_shape is not None:
                    ins.append(const(rng.normal(0, 1, c_shape), "C"))
            nodes.append(helper.make_node(op, ins, [out], name=name, **attrs))
            cur_c = n
        cur = out
        live.append((cur, cur_c, cur_s))
        if draw(st.integers(0, 5)) == 0:
            extra_outputs.append(cur)
    if not bns:
        stats = _stats(rng, cur_c, "plain")
        names = [const(stats[k], f"bn{k}") for k in "gbmv"]
        out = fresh("v")
        nodes.append(
            helper.make_node("BatchNormalization", [cur, *names], [out], name="bnlast")
        )
        cur = out
    outs = [cur] + [o for o in extra_outputs if o != cur]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", elem, x_shape)],
        [helper.make_tensor_value_info(o, elem, None) for o in outs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True), dtype, seed


def _oracle(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph evaluated in extended precision from the same (rounded) parameters: float64
    torch for Conv/ConvTranspose graphs, numpy longdouble for the 2-D ones."""
    import torch
    import torch.nn.functional as F

    wide = np.float64 if len(x.shape) == 4 else np.longdouble
    env = {t.name: numpy_helper.to_array(t).astype(wide) for t in model.graph.initializer}
    env["X"] = x.astype(wide)
    for n in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        ins = [env[i] for i in n.input]
        if n.op_type in ("Conv", "ConvTranspose"):
            t_in = [torch.from_numpy(np.asarray(v, np.float64)) for v in ins]
            bias = t_in[2] if len(t_in) > 2 else None
            if n.op_type == "Conv":
                pad = a.get("pads", [0] * 4)[0]
                y = F.conv2d(
                    t_in[0], t_in[1], bias, a["strides"], pad, a["dilations"], a["group"]
                )
            else:
                y = F.conv_transpose2d(
                    t_in[0], t_in[1], bias, a["strides"], 0, a["output_padding"], a["group"]
                )
            out = y.numpy()
        elif n.op_type == "BatchNormalization":
            xv, g, b, m, v = ins
            shape = (1, -1) + (1,) * (xv.ndim - 2)
            eps = wide(np.float32(a.get("epsilon", 1e-5)))
            out = (xv - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps) * g.reshape(
                shape
            ) + b.reshape(shape)
        elif n.op_type == "Gemm":
            wt = ins[1].T if a.get("transB") else ins[1]
            out = a.get("alpha", 1.0) * (ins[0] @ wt)
            if len(ins) > 2:
                out = out + a.get("beta", 1.0) * ins[2]
        elif n.op_type == "MatMul":
            out = ins[0] @ ins[1]
        elif n.op_type == "Relu":
            out = np.maximum(ins[0], 0)
        else:
            assert n.op_type == "Add"
            out = ins[0] + ins[1]
        env[n.output[0]] = out
    return {o.name: np.asarray(env[o.name], np.float64) for o in model.graph.output}


def _shift_scale(model: onnx.ModelProto) -> float:
    """Largest |mean·s| of any BN: x·s + (b − mean·s) cancels terms of this size, so the
    folded graph's rounding error scales with it, not with the output."""
    inits = {
        t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    }
    worst = 0.0
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            g, _, m, v = (inits[i] for i in n.input[1:])
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            worst = max(worst, float(np.abs(m * g / np.sqrt(v + eps)).max()))
    return worst


@settings(max_examples=300, **SETTINGS)
@given(chains())
def test_random_chains_fold_exactly_or_say_why(case) -> None:
    model, dtype, seed = case
    result = fold_bn(model, verify=False)
    by_name = {n.name: n for n in model.graph.node}
    assert {e.node for e in result.ledger} == {
        n for n, node in by_name.items() if node.op_type == "BatchNormalization"
    }
    onnx.checker.check_model(result.model, full_check=True)
    folded_nodes = {n.name: n for n in result.model.graph.node}
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    after = {t.name: t.SerializeToString() for t in result.model.graph.initializer}
    for entry in result.skipped:
        assert entry.reason
        # a kept BN is exactly as it was, reading the same (unchanged) parameters
        node = folded_nodes[entry.node]
        assert node.SerializeToString() == by_name[entry.node].SerializeToString()
        for name in node.input[1:]:
            assert after[name] == before[name], (entry, name)
        if dtype != "float16":  # fp16 may refuse a fold that would overflow
            assert "overflow" not in entry.reason
    for name in set(before) & set(after):  # an initializer keeps its name only if ...
        if before[name] != after[name]:  # ... it was rewritten for its sole reader
            readers = [n for n in model.graph.node if name in n.input]
            assert len(readers) == 1, name
    outputs = [o for n in result.model.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))
    # Decided from the generated structure alone: a BN reading the sole output of a producer
    # must fold (fp16 may still refuse an overflow).
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = Counter(i for n in model.graph.node for i in n.input)
    graph_outputs = {o.name for o in model.graph.output}
    for entry in result.skipped:
        x = by_name[entry.node].input[0]
        producer = producers.get(x)
        if (
            producer is not None
            and producer.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and readers[x] == 1
            and x not in graph_outputs
        ):
            assert dtype == "float16" and ("overflow" in entry.reason), entry

    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = rng.normal(0, 1.5, shape).astype(_DTYPES[dtype][1])
    expected = OrtRunner(model).infer({"X": x})
    actual = OrtRunner(result.model).infer({"X": x})
    oracle = _oracle(model, x)
    ulp = float(np.finfo(_DTYPES[dtype][1]).eps)
    for name, ref in expected.items():
        got, ref64, exact = (
            actual[name].astype(np.float64),
            ref.astype(np.float64),
            oracle[name],
        )
        assert np.array_equal(np.isfinite(got), np.isfinite(ref64)), name
        fin = np.isfinite(ref64)
        # Judged against the extended-precision oracle: folding re-rounds weights and turns
        # (x − mean)·s into x·s + (b − mean·s), which cancels terms of size |mean·s|. The fold
        # may add at most 2× the unfolded graph's own rounding error, plus 16 ulp of the
        # larger of the output and |mean·s| (one re-association of that cancellation).
        err_unfolded = float(np.abs(ref64[fin] - exact[fin]).max(initial=0.0))
        err_folded = float(np.abs(got[fin] - exact[fin]).max(initial=0.0))
        scale = max(1.0, float(np.abs(exact[fin]).max(initial=0.0)), _shift_scale(model))
        assert err_folded <= 2.0 * err_unfolded + 16 * ulp * scale, (
            name, dtype, err_folded, err_unfolded, scale,
        )  # fmt: skip


def _random_shape_chain(rng: np.random.Generator, shape: list[int]):
    """1-3 shape-only ops on a value ``P0`` of ``shape``: (ONNX nodes, constants, the same ops
    as numpy functions, the final shape, the final value)."""
    nodes, inits, numpy_ops = [], [], []
    value = "P0"
    for k in range(int(rng.integers(1, 4))):
        out = f"S{k}"
        kinds = ["Transpose", "Reshape", "Flatten", "Unsqueeze"]
        if any(d == 1 for d in shape[2:]):
            kinds.append("Squeeze")
        kind = str(rng.choice(kinds))
        if kind == "Transpose":
            perm = [int(a) for a in rng.permutation(len(shape))]
            nodes.append(helper.make_node("Transpose", [value], [out], perm=perm))
            numpy_ops.append(lambda a, perm=perm: np.transpose(a, perm))
            shape = [shape[a] for a in perm]
        elif kind == "Reshape":
            i = int(rng.integers(0, len(shape)))
            if len(shape) > 2 and i + 1 < len(shape) and rng.random() < 0.5:
                new = [*shape[:i], shape[i] * shape[i + 1], *shape[i + 2 :]]  # merge two
            else:
                f = next((f for f in (2, 3) if shape[i] % f == 0 and shape[i] > f), 1)
                new = [*shape[:i], f, shape[i] // f, *shape[i + 1 :]]  # split one
            inits.append(numpy_helper.from_array(np.array(new, np.int64), f"shape{k}"))
            nodes.append(helper.make_node("Reshape", [value, f"shape{k}"], [out]))
            numpy_ops.append(lambda a, new=new: a.reshape(new))
            shape = new
        elif kind == "Flatten":
            axis = int(rng.integers(1, len(shape)))
            nodes.append(helper.make_node("Flatten", [value], [out], axis=axis))
            new = [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
            numpy_ops.append(lambda a, new=new: a.reshape(new))
            shape = new
        elif kind == "Unsqueeze":
            axis = int(rng.integers(0, len(shape) + 1))
            inits.append(numpy_helper.from_array(np.array([axis], np.int64), f"axes{k}"))
            nodes.append(helper.make_node("Unsqueeze", [value, f"axes{k}"], [out]))
            numpy_ops.append(lambda a, axis=axis: np.expand_dims(a, axis))
            shape = [*shape[:axis], 1, *shape[axis:]]
        else:
            axes = [i for i, d in enumerate(shape) if d == 1 and i >= 2]
            inits.append(numpy_helper.from_array(np.array(axes, np.int64), f"axes{k}"))
            nodes.append(helper.make_node("Squeeze", [value, f"axes{k}"], [out]))
            numpy_ops.append(lambda a, axes=tuple(axes): np.squeeze(a, axes))
            shape = [d for i, d in enumerate(shape) if i not in axes]
        value = out
    return nodes, inits, numpy_ops, shape, value


def shape_chain_graph(seed: int) -> tuple[onnx.ModelProto, bool]:
    """MatMul (3-D input) or 1×1 Conv, a random chain of shape-only ops, then a BN over axis
    1 of whatever comes out; and whether the BN channel is exactly the producer's feature
    axis, decided with numpy by carrying every element's feature index through the chain."""
    rng = np.random.default_rng(seed)
    feats = int(rng.choice([2, 3, 4, 6]))
    if rng.random() < 0.5:
        t, fin = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        x_shape, shape, feature_axis = [2, t, fin], [2, t, feats], 2
        w = rng.normal(0, 0.5, (fin, feats))
        nodes = [helper.make_node("MatMul", ["X", "W"], ["P0"])]
    else:
        h, wd = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        x_shape, shape, feature_axis = [2, 3, h, wd], [2, feats, h, wd], 1
        w = rng.normal(0, 0.5, (feats, 3, 1, 1))
        nodes = [helper.make_node("Conv", ["X", "W"], ["P0"])]
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    chain, chain_inits, numpy_ops, bn_shape, bn_in = _random_shape_chain(rng, shape)
    c = bn_shape[1]
    nodes += [*chain, _bn(bn_in, "Y", "bn_", 1e-3)]
    inits += chain_inits + _bn_inits(rng, c, "bn_")
    along = [-1 if a == feature_axis else 1 for a in range(len(shape))]
    index = np.broadcast_to(np.arange(feats).reshape(along), shape)
    for op in numpy_ops:
        index = op(index)
    channel = np.arange(c).reshape([1, -1] + [1] * (len(bn_shape) - 2))
    exact = c == feats and np.array_equal(index, np.broadcast_to(channel, bn_shape))
    model = _model(nodes, [_vi("X", x_shape)], [_vi("Y", None)], inits)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True), exact


def test_random_shape_chains_fold_only_when_the_channel_is_the_feature() -> None:
    folded_when_exact = []
    for seed in range(250):
        model, exact = shape_chain_graph(seed)
        result = fold_bn(model, verify=False)
        (entry,) = result.ledger
        assert not entry.folded or exact, (
            seed,
            entry.reason,
        )  # never a fold that is not exact
        assert entry.folded or entry.reason
        _check(model, False, seed)  # numerics vs the unfolded graph, whatever was decided
        if exact:
            folded_when_exact.append(entry.folded)
    # Every exact case of this sample (63 of 250) is proved. A merge, then a permutation, then
    # a split back can be exact yet unproved; this sample has none.
    assert len(folded_when_exact) >= 40 and all(folded_when_exact)
