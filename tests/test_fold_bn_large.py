"""A graph past protobuf's 2 GB limit, stored with external data, folds and verifies.

Slow and memory-hungry (several GB): runs only with NORMDEPLOY_SLOW=1.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normdeploy.folding import fold_bn_file
from normdeploy.io import sha256_file

pytestmark = pytest.mark.slow

LAYERS, WIDTH = 18, 5600  # 18 × 5600² fp32 1×1 convs ≈ 2.26 GB of weights


def _large_model(path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "X"
    for i in range(LAYERS):
        w = rng.standard_normal((WIDTH, WIDTH, 1, 1), dtype=np.float32)
        w *= np.float32(1 / np.sqrt(WIDTH))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        del w
        for k, v in {
            "g": rng.uniform(0.5, 1.5, WIDTH), "b": rng.normal(0, 0.1, WIDTH),
            "m": rng.normal(0, 0.1, WIDTH), "v": rng.uniform(0.5, 2.0, WIDTH),
        }.items():  # fmt: skip
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{k}{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"]))
        nodes.append(
            helper.make_node("BatchNormalization", [f"c{i}", *(f"{k}{i}" for k in "gbmv")],
                             [f"y{i}"])
        )  # fmt: skip
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH, 1, 1])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", WIDTH, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="large.onnx.data",
        size_threshold=1024,
    )  # fmt: skip


def test_graph_over_2gb_folds_and_verifies(tmp_path) -> None:
    src, out = tmp_path / "large.onnx", tmp_path / "folded.onnx"
    _large_model(src)
    assert (tmp_path / "large.onnx.data").stat().st_size > 2**31
    digest = sha256_file(src)
    result = fold_bn_file(src, out)  # verifies against the input on onnxruntime
    assert len(result.folded) == LAYERS and result.verified is True
    assert sha256_file(src) == digest
    assert (tmp_path / "folded.onnx.data").stat().st_size > 2**31
    header = onnx.load_model(str(out), load_external_data=False)
    assert not any(n.op_type == "BatchNormalization" for n in header.graph.node)
