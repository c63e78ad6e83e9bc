"""Load and save ONNX files safely.

Loading gives one-line errors for every way a file can be wrong; saving is atomic (temp file in the
target directory, then rename), keeps external data when the input had it or the model needs it
(> 2 GB), and refuses to overwrite the input or an existing file unless asked. Large models are
written one initializer at a time (:func:`save_model_streaming`), never serialized whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import Message
from onnx import external_data_helper

from normdeploy.errors import InputFileError, OutputPathError

PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inline when a model is written with external data.
EXTERNAL_DATA_THRESHOLD = 1024
_ONNX_MAGIC_HINTS = {
    b"\x89PNG": "a PNG image",
    b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
    b"\x80\x02": "a Python pickle",
    b"\x80\x04": "a Python pickle",
    b"\x80\x05": "a Python pickle",
}


@dataclass
class OnnxFile:
    """A loaded ONNX model with where it came from and how its weights were stored."""

    model: onnx.ModelProto
    path: Path
    external_data: bool


def check_input_file(path: str | os.PathLike[str], what: str = "input") -> Path:
    """Return ``path`` as a Path if it is an existing, readable, non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: {what} file does not exist")
    if p.is_dir():
        raise InputFileError(f"{p}: {what} is a directory, expected a file")
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{p}: {what} file is not readable (permission denied)")
    if p.stat().st_size == 0:
        raise InputFileError(f"{p}: {what} file is empty")
    return p


def _describe_non_onnx(head: bytes) -> str:
    for magic, what in _ONNX_MAGIC_HINTS.items():
        if head.startswith(magic):
            return what
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "JSON text"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not an ONNX protobuf"


def read_onnx(path: str | os.PathLike[str], *, load_external_data: bool = True) -> OnnxFile:
    """Parse an ONNX file and its external data; raise InputFileError with one line if broken."""
    p = check_input_file(path, "ONNX")
    with open(p, "rb") as f:
        head = f.read(16)
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError or plain errors on garbage
        raise InputFileError(
            f"{p}: cannot parse as ONNX ({_describe_non_onnx(head)}; {type(exc).__name__})"
        ) from None
    if not model.HasField("graph") or (
        not model.graph.node and not model.graph.output and not model.opset_import
    ):
        raise InputFileError(
            f"{p}: not an ONNX model ({_describe_non_onnx(head)}; no graph in the file)"
        )
    external = any(
        external_data_helper.uses_external_data(t)
        for t in external_data_helper._get_all_tensors(model)
    )
    if external and load_external_data:
        base = p.parent
        for tensor in external_data_helper._get_all_tensors(model):
            if not external_data_helper.uses_external_data(tensor):
                continue
            info = external_data_helper.ExternalDataInfo(tensor)
            data_path = base / info.location
            if not data_path.is_file():
                raise InputFileError(
                    f"{p}: external data file '{info.location}' for tensor "
                    f"'{tensor.name}' is missing"
                )
            end = (info.offset or 0) + (info.length or 0)
            if info.length and data_path.stat().st_size < end:
                raise InputFileError(
                    f"{p}: external data file '{info.location}' is truncated "
                    f"(tensor '{tensor.name}' needs bytes up to {end})"
                )
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise InputFileError(f"{p}: cannot read external data ({exc})") from None
    return OnnxFile(model=model, path=p, external_data=external)


def check_output_path(
    out: str | os.PathLike[str],
    *,
    inputs: tuple[str | os.PathLike[str], ...] = (),
    overwrite: bool = False,
    what: str = "output",
) -> Path:
    """Validate that ``out`` can be written: directory exists, not an input, not existing."""
    o = Path(out)
    if o.is_dir():
        raise OutputPathError(f"{o}: {what} path is a directory, expected a file name")
    if not o.parent.exists():
        raise OutputPathError(f"{o}: {what} directory '{o.parent}' does not exist")
    if not o.parent.is_dir():
        raise OutputPathError(f"{o}: {what} directory '{o.parent}' is not a directory")
    for inp in inputs:
        ip = Path(inp)
        if ip.exists() and o.exists() and os.path.samefile(ip, o):
            raise OutputPathError(
                f"{o}: {what} would overwrite the input file; choose another"
            )
        if not ip.exists() and ip.resolve() == o.resolve():
            raise OutputPathError(
                f"{o}: {what} would overwrite the input file; choose another"
            )
    if o.exists() and not overwrite:
        raise OutputPathError(f"{o}: {what} file exists (use --force to overwrite)")
    if not os.access(o.parent, os.W_OK):
        raise OutputPathError(f"{o}: {what} directory '{o.parent}' is not writable")
    return o


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    p = Path(path)
    try:
        with atomic_output(p) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise OutputPathError(f"{p}: cannot write ({exc.strerror or exc})") from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def model_size_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model`` without serializing it twice for large models."""
    return model.ByteSize()


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Save atomically. ``external_data=None`` chooses external data only past protobuf's 2 GB.

    With external data the tensors go to ``<name>.data`` beside the file, written into a temporary
    directory first; the data file is moved into place before the model that points at it. The
    in-memory ``model`` then references that file instead of holding the bytes.
    """
    p = Path(path)
    if external_data is None:
        external_data = model_size_bytes(model) > PROTOBUF_LIMIT - 64 * 2**20
    try:
        if not external_data:
            with atomic_output(p) as tmp:
                onnx.save_model(model, str(tmp))
            return p
        data_name = p.name + ".data"
        with tempfile.TemporaryDirectory(prefix=f".{p.name}.", dir=p.parent) as tmpdir:
            tmp_model = Path(tmpdir) / p.name
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_DATA_THRESHOLD,
            )
            data_tmp = Path(tmpdir) / data_name
            if data_tmp.exists():
                os.replace(data_tmp, p.parent / data_name)
            os.replace(tmp_model, p)
        return p
    except OSError as exc:
        raise OutputPathError(f"{p}: cannot write ({exc.strerror or exc})") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- streaming writer
#
# ``model.SerializeToString()`` builds the whole file in memory (one more copy of every weight)
# and is slow on large graphs under upb. Protobuf's wire format is a concatenation of fields, so
# the same bytes can be written as: the model's fields before ``graph``, the graph's tag and
# length, the graph's fields before ``initializer``, each initializer (tag, length, bytes), the
# graph's remaining fields, then the model's remaining fields: field order as protobuf writes it.

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
