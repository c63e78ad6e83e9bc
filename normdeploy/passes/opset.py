"""Convert a whole model to a newer opset, for passes that need newer ops (fuse-norms:
LayerNormalization from opset 17, RMSNormalization from opset 23).

The conversion is onnx's own C++ converter (``onnx.version_converter``). onnxscript's converter
(0.7) was measured as the alternative on TorchScript exports at opset 12 and 16: it accepts
targets 18-25 only, and at 18 and 23 it left ``ReduceMean`` with its pre-18 ``axes`` attribute,
a graph onnxruntime refuses to load; onnx's converter gave graphs that onnxruntime runs with
outputs identical to the input's. The converted graph is a rewrite like any other: the caller
proves it computes what the input computes (:func:`normdeploy.folding.run_pass` does) before
anything else touches it.

Memory: the converter serializes the model and returns a new one (one more copy of every
weight while it runs); it is bound by protobuf's 2 GB limit.
"""

from __future__ import annotations

import onnx
from onnx import helper, version_converter

from normdeploy.errors import InvalidArgumentError, InvalidModelError, first_line
from normdeploy.onnx_graph import default_opset

CONVERTER = "onnx.version_converter"


def newest_opset() -> int:
    """The newest default-domain opset this installation of onnx knows."""
    return int(onnx.defs.onnx_opset_version())


def convert_opset(model: onnx.ModelProto, target: int, source: str) -> onnx.ModelProto:
    """A new model: ``model`` converted to default-domain opset ``target`` (upward only).

    Raises InvalidArgumentError for a target below the model's opset or beyond what onnx knows,
    InvalidModelError (naming ``source``) when the converter fails. The IR version is raised
    to the one the new opset needs when it was older.
    """
    current = default_opset(model)
    if isinstance(target, bool) or not isinstance(target, int):
        raise InvalidArgumentError(f"opset={target!r}: expected an integer opset")
    if target > newest_opset():
        raise InvalidArgumentError(
            f"opset={target}: newer than the newest opset onnx {onnx.__version__} knows "
            f"({newest_opset()})"
        )
    if current is not None and target < current:
        raise InvalidArgumentError(
            f"opset={target}: {source} already imports opset {current}; conversion goes "
            "upward only"
        )
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/C++ errors
        raise InvalidModelError(
            f"{source}: {CONVERTER} cannot convert it to opset {target}: {first_line(exc)}"
        ) from None
    needed = helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    converted.ir_version = max(converted.ir_version, needed)
    return converted
