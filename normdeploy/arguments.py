"""Argument checks shared by the public functions: a wrong type is a typed one-line error.

Every public function (``export``, ``inspect``, ``fold_bn``, ``fold_bn_file``,
``fold_bn_module``, ``verify``, ``deploy``) checks its arguments here before any work, so a wrong
call raises :class:`~normdeploy.errors.InvalidArgumentError` naming the parameter, never a raw
``TypeError``/``AttributeError`` from deep inside. Where a model is read, the same kinds are
accepted everywhere: a path (``str`` or ``os.PathLike``), an ``onnx.ModelProto``, or its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from normdeploy.errors import InvalidArgumentError, InvalidModelError
from normdeploy.io import as_path

if TYPE_CHECKING:
    import torch


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is a bool (not merely truthy: ``verify="no"`` is a mistake)."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name}: expected True or False, got {_type_name(value)}")
    return value


def check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (bools excluded) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgumentError(f"{name}: expected an integer, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name}: {value} must be >= {minimum}")
    return value


def optional_int(value: object, name: str, *, minimum: int | None = None) -> int | None:
    return None if value is None else check_int(value, name, minimum=minimum)


def check_str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(
            f"{name}: expected a non-empty string, got {_type_name(value)}"
        )
    return value


def optional_str(value: object, name: str) -> str | None:
    return None if value is None else check_str(value, name)


def path_arg(value: object, name: str) -> Path:
    """A file path given as ``str`` or ``os.PathLike``."""
    return as_path(value, name)


def optional_path(value: object, name: str) -> Path | None:
    return None if value is None else as_path(value, name)


def onnx_model_arg(value: object, name: str) -> onnx.ModelProto | Path:
    """An ONNX model as a ModelProto (bytes are parsed) or a path (read by the caller)."""
    if isinstance(value, onnx.ModelProto):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise InvalidModelError(
                f"{name}: cannot parse {len(data)} bytes as ONNX ({type(exc).__name__})"
            ) from None
        if not model.HasField("graph"):
            raise InvalidModelError(f"{name}: {len(data)} bytes hold no ONNX graph")
        return model
    if isinstance(value, (str, os.PathLike)):
        return as_path(value, name)
    raise InvalidArgumentError(
        f"{name}: expected an ONNX file path, ModelProto or bytes, got {_type_name(value)}"
    )


def providers_arg(value: object) -> Sequence[str] | str | None:
    """``None``/``"auto"``, a comma-separated string, or a sequence of provider names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise InvalidArgumentError(
                f"providers: every entry must be a provider name like 'cpu', got "
                f"{_type_name(bad[0])} {bad[0]!r}"
            )
        return tuple(value)
    raise InvalidArgumentError(
        f"providers: expected 'cpu,cuda' or a list of names, got {_type_name(value)}"
    )


def batch_sizes_arg(value: object) -> Sequence[int]:
    """A sequence (not a bare int or string) of batch sizes; values are checked by the feeds."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(
            f"batch_sizes: expected a sequence of positive integers like (1, 3), got "
            f"{_type_name(value)}"
        )
    return value


def module_arg(value: object, name: str = "module") -> torch.nn.Module:
    """A ``torch.nn.Module``."""
    import torch

    if not isinstance(value, torch.nn.Module):
        raise InvalidArgumentError(
            f"{name}: expected a torch.nn.Module, got {_type_name(value)}"
        )
    return value


def example_inputs_arg(value: object, name: str = "example_inputs") -> tuple[Any, ...] | None:
    """A tensor or a tuple/list of positional inputs (tensors or plain Python values)."""
    import torch

    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise InvalidArgumentError(
        f"{name}: expected a tensor or a tuple of inputs, got {_type_name(value)}"
    )


def feeds_arg(value: object) -> str | os.PathLike[str] | Mapping[str, Any] | None:
    """User feeds: an ``.npz`` path or a mapping of input name → array."""
    if value is None or isinstance(value, Mapping):
        return value
    return as_path(value, "inputs")
