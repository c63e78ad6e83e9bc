"""Safe ONNX loading and atomic saving."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normdeploy.io
from normdeploy.errors import InputFileError, OutputPathError
from normdeploy.io import (
    check_output_path,
    read_onnx,
    save_onnx,
    sha256_file,
    write_text_atomic,
)


def _tiny_model(n: int = 64) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32).reshape(1, n), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"", "empty"),
        (b'{"not": "onnx"}', "cannot parse|not an ONNX"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "PNG|cannot parse|not an ONNX"),
        (b"hello world, this is text\n", "cannot parse|not an ONNX"),
    ],
    ids=["empty", "json", "png", "text"],
)
def test_read_onnx_rejects_non_onnx_with_one_line(tmp_path, content, expect):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InputFileError, match=expect) as info:
        read_onnx(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_read_onnx_missing_and_directory(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        read_onnx(tmp_path / "nope.onnx")
    with pytest.raises(InputFileError, match="directory"):
        read_onnx(tmp_path)


def test_truncated_file_is_rejected(tmp_path):
    p = tmp_path / "m.onnx"
    data = _tiny_model(4096).SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError):
        read_onnx(p)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    p = tmp_path / "m.onnx"
    model = _tiny_model()
    save_onnx(model, p)
    assert onnx.load(str(p)).graph.node[0].op_type == "Add"
    assert [f.name for f in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left
    with pytest.raises(OutputPathError, match="exists"):
        check_output_path(p)
    with pytest.raises(OutputPathError, match="overwrite the input"):
        check_output_path(p, inputs=(p,), overwrite=True)
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.onnx")


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, external):
    target = tmp_path / "out.onnx"

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # Both writers: the streaming one (inline) and onnx's (external data).
    monkeypatch.setattr(onnx, "save_model", explode)
    monkeypatch.setattr(normdeploy.io, "write_model", explode)
    with pytest.raises(OutputPathError, match="No space left"):
        save_onnx(_tiny_model(4096), target, external_data=external)
    assert list(tmp_path.iterdir()) == []


def test_external_data_round_trip_and_missing_data(tmp_path):
    p = tmp_path / "ext.onnx"
    model = _tiny_model(4096)
    expected = numpy_helper.to_array(model.graph.initializer[0]).copy()
    save_onnx(model, p, external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    loaded = read_onnx(p)
    assert loaded.external_data
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.model.graph.initializer[0]), expected
    )
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(InputFileError, match=r"external data file 'ext\.onnx\.data'.*missing"):
        read_onnx(p)


def test_reading_never_modifies_the_input(tmp_path):
    p = tmp_path / "m.onnx"
    save_onnx(_tiny_model(), p)
    before = sha256_file(p)
    read_onnx(p)
    assert sha256_file(p) == before


def test_write_text_atomic(tmp_path):
    p = tmp_path / "r.json"
    write_text_atomic(p, "{}\n")
    assert p.read_text() == "{}\n"
