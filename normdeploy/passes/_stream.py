"""Write a ModelProto to a file one initializer at a time.

``model.SerializeToString()`` builds the whole file in memory (one more copy of every weight) and
is slow on large graphs under upb. Protobuf's wire format is a concatenation of fields, so the
same bytes can be written as: the model's fields before ``graph``, the graph's tag and length,
the graph's fields before ``initializer``, each initializer (tag, length, bytes), the graph's
remaining fields, then the model's remaining fields: field order as protobuf writes it.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import onnx
from google.protobuf.message import Message

_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_LENGTH_DELIMITED = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _fields_bytes(msg: Message, lo: int, hi: int, skip: int) -> bytes:
    """Serialized fields of ``msg`` with numbers in [lo, hi), except ``skip``."""
    part = type(msg)()
    for fd, value in msg.ListFields():
        if fd.number == skip or not lo <= fd.number < hi:
            continue
        if fd.is_repeated:
            getattr(part, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(part, fd.name).CopyFrom(value)
        else:
            setattr(part, fd.name, value)
    return part.SerializeToString()


def write_model(model: onnx.ModelProto, f: BinaryIO) -> int:
    """Write ``model`` to the open binary file ``f``; return the number of bytes written."""
    if not model.HasField("graph"):
        data = model.SerializeToString()
        f.write(data)
        return len(data)
    graph = model.graph
    head = _fields_bytes(model, 0, _MODEL_GRAPH, _MODEL_GRAPH)
    tail = _fields_bytes(model, _MODEL_GRAPH + 1, 1 << 29, _MODEL_GRAPH)
    g_head = _fields_bytes(graph, 0, _GRAPH_INITIALIZER, _GRAPH_INITIALIZER)
    g_tail = _fields_bytes(graph, _GRAPH_INITIALIZER + 1, 1 << 29, _GRAPH_INITIALIZER)
    init_tag = _tag(_GRAPH_INITIALIZER)
    # Per-tensor ByteSize is cheap; it gives the graph's length before any tensor is written.
    sizes = [t.ByteSize() for t in graph.initializer]
    graph_len = len(g_head) + len(g_tail)
    graph_len += sum(len(init_tag) + len(_varint(n)) + n for n in sizes)
    written = 0
    for chunk in (head, _tag(_MODEL_GRAPH), _varint(graph_len), g_head):
        f.write(chunk)
        written += len(chunk)
    for tensor, n in zip(graph.initializer, sizes, strict=True):
        prefix = init_tag + _varint(n)
        f.write(prefix)
        f.write(tensor.SerializeToString())
        written += len(prefix) + n
    for chunk in (g_tail, tail):
        f.write(chunk)
        written += len(chunk)
    return written


def save_model_streaming(model: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write ``model`` to ``path`` (not atomically: callers stage it); return its size."""
    with open(path, "wb") as f:
        return write_model(model, f)
