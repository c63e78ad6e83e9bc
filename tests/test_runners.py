"""The runners (normdeploy/verification/runners.py): provider choice; and the stress inputs
they are fed (normdeploy/verification/feeds.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from normdeploy.errors import InvalidArgumentError
from normdeploy.onnx_graph import InputSpec
from normdeploy.verification import runners
from normdeploy.verification.feeds import make_feeds
from normdeploy.verification.runners import CPU, CUDA, resolve_providers


def test_default_providers_use_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(runners, "available_providers", lambda: [CPU])
    choice = resolve_providers(None)
    assert choice.providers == (CPU,)
    assert any("CUDA not used" in n for n in choice.notes)
    monkeypatch.setattr(runners, "available_providers", lambda: [CUDA, CPU])
    assert resolve_providers(None).providers == (CPU, CUDA)


def test_requesting_missing_or_unknown_provider_is_a_user_error(monkeypatch):
    monkeypatch.setattr(runners, "available_providers", lambda: [CPU])
    with pytest.raises(
        InvalidArgumentError, match=r"^providers: 'cuda' is not available here"
    ):
        resolve_providers("cpu,cuda")
    with pytest.raises(InvalidArgumentError, match=r"^providers: unknown provider 'tpu'"):
        resolve_providers("tpu")
    assert resolve_providers("cpu").providers == (CPU,)


def test_stress_inputs_are_signed_with_outliers_and_a_constant_channel():
    spec = InputSpec("x", np.dtype("float32"), ("batch", 4, 16, 16))
    x = make_feeds([spec], batch_size=3, seed=1)["x"]
    assert x.shape == (3, 4, 16, 16) and x.dtype == np.float32
    assert x.min() < 0 < x.max()
    assert np.abs(x).max() > 10 * np.median(np.abs(x))  # outliers
    assert np.ptp(x[:, 3]) == 0  # constant channel
    np.testing.assert_array_equal(x, make_feeds([spec], batch_size=3, seed=1)["x"])  # seeded
    ids = make_feeds([InputSpec("ids", np.dtype("int64"), (2, 5))], seed=0)["ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 5) and ids.min() >= 0


def test_reference_memo_answers_only_for_the_same_bytes():
    from normdeploy.verification.runners import ReferenceMemo

    spec = InputSpec("x", np.dtype("float32"), ("batch", 4))
    feeds = make_feeds([spec], batch_size=2, seed=0)
    memo = ReferenceMemo()
    memo.add(feeds, {"y": np.ones(2, np.float32)}, {"y": np.ones(2)})
    assert memo.outputs({"x": feeds["x"].copy()})["y"].dtype == np.float32
    assert memo.outputs(feeds, float64=True)["y"].dtype == np.float64
    # One element one ulp away, the same values in another dtype or under another name, and
    # a set whose truth was never recorded: misses, so the caller runs the module itself.
    changed = feeds["x"].copy()
    changed[1, 3] = np.nextafter(changed[1, 3], np.float32(np.inf))
    assert memo.outputs({"x": changed}) is None
    assert memo.outputs({"x": feeds["x"].astype(np.float64)}) is None
    assert memo.outputs({"z": feeds["x"]}) is None
    memo.add({"x": changed}, {"y": np.zeros(2, np.float32)}, None)
    assert memo.outputs({"x": changed}) is not None
    assert memo.outputs({"x": changed}, float64=True) is None


def test_run_exposed_leaves_the_model_exactly_as_it_was():
    from onnx import TensorProto, helper, numpy_helper

    from normdeploy.verification.probe import run_exposed

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("Neg", ["r"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
            [numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    before = model.SerializeToString()
    x = rng.standard_normal((2, 4)).astype(np.float32)
    # h and r have no value_info: their types come from shape inference.
    values = run_exposed(model, ["h", "r"], {"x": x})
    h = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(values["h"], h, rtol=1e-6)  # float32 MatMul of 4 terms
    np.testing.assert_array_equal(values["r"], np.maximum(values["h"], 0))
    np.testing.assert_array_equal(values["y"], -values["r"])
    assert model.SerializeToString() == before


def test_kept_outputs_own_their_memory():
    """onnxruntime's outputs are views of its buffers, each keeping the session's whole memory
    arena alive; the runner's outputs own their memory, so a released session is gone."""
    import gc
    import weakref

    from onnx import TensorProto, helper

    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    runner = runners.OrtRunner(model)
    session = weakref.ref(runner.session)
    raw = runner.session.run(None, {"x": x})[0]
    assert raw.base is not None  # what onnxruntime hands back: a view
    del raw
    y = runner.infer({"x": x})["y"]
    assert y.base is None and y.flags.owndata
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    del runner
    gc.collect()
    assert session() is None


def test_a_session_made_from_a_model_keeps_no_copy_of_its_bytes():
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((256, 256), np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
            [numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    runner = runners.OrtRunner(model)
    held = [v for v in vars(runner.session).values() if isinstance(v, (bytes, bytearray))]
    assert held == []
    y = runner.infer({"x": np.ones((1, 256), np.float32)})["y"]
    np.testing.assert_array_equal(y, np.full((1, 256), 256.0, np.float32))


def test_exposed_values_from_the_staged_file_are_the_in_memory_runs(tmp_path):
    """With the file the model was staged to, the exposed graph is that file's bytes followed by
    the extra outputs (protobuf merges them into the graph): it parses as the model plus those
    outputs, and the values are the ones the in-memory model gives; the extra file is gone."""
    from onnx import TensorProto, helper, numpy_helper

    from normdeploy.verification.probe import EXPOSED_FILE, run_exposed, write_exposed

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 16)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Sigmoid", ["h"], ["s"]),
                helper.make_node("Neg", ["s"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
            [numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    staged = tmp_path / "model.onnx"
    onnx.save(model, staged)
    extra = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 16])]
    write_exposed(staged, extra, tmp_path / "merged.onnx")
    merged = onnx.load(tmp_path / "merged.onnx")
    assert [o.name for o in merged.graph.output] == ["y", "h"]
    assert merged.graph.node == model.graph.node
    assert merged.graph.initializer == model.graph.initializer
    x = rng.standard_normal((3, 4)).astype(np.float32)
    from_file = run_exposed(model, ["h", "s"], {"x": x}, staged=staged)
    in_memory = run_exposed(model, ["h", "s"], {"x": x})
    assert sorted(from_file) == sorted(in_memory) == ["h", "s", "y"]
    for name, value in in_memory.items():
        np.testing.assert_array_equal(from_file[name], value)
    np.testing.assert_allclose(from_file["h"], x.astype(np.float64) @ w, rtol=1e-5)
    assert not (tmp_path / EXPOSED_FILE).exists()


def test_recorded_graph_outputs_answer_for_the_same_file_unchanged(tmp_path):
    import os

    from normdeploy.verification.runners import ReferenceMemo

    spec = InputSpec("x", np.dtype("float32"), ("batch", 4))
    feeds = make_feeds([spec], batch_size=2, seed=0)
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"graph bytes")
    memo = ReferenceMemo()
    memo.add_graph_run(graph, CPU, feeds, {"y": np.ones(2, np.float32)})
    assert memo.graph_outputs(graph, CPU, {"x": feeds["x"].copy()}) is not None
    assert memo.graph_outputs(graph, CUDA, feeds) is None  # another provider
    moved = tmp_path / "moved.onnx"
    graph.rename(moved)  # the same file under another name
    assert memo.graph_outputs(moved, CPU, feeds) is not None
    assert memo.graph_outputs(graph, CPU, feeds) is None  # nothing there now
    moved.write_bytes(b"graph bytes")  # rewritten, even with the same bytes: a new mtime
    st = os.stat(moved)
    os.utime(moved, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # however coarse the clock
    assert memo.graph_outputs(moved, CPU, feeds) is None
