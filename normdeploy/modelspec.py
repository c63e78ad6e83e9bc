"""Resolve a MODEL argument to a PyTorch module and example inputs.

MODEL is a reference model name (from the checkout's ``models/`` package) or an import path
``package.module:factory``; the factory returns a module, or ``(module, example_inputs)``.
Import paths come only from the MODEL argument; weights load with ``weights_only=True`` only.

``package.module`` is imported with the current directory first on ``sys.path`` (as
``python -m`` does), so a user's own ``models`` or ``cli`` package is theirs even when
``python /path/to/checkout/cli.py`` puts the checkout first. Reference names resolve from *this*
checkout's ``models/`` by its location, loaded under a private module name, so a user's package
named ``models`` never shadows ours and ours never shadows theirs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from normdeploy.errors import (
    InvalidArgumentError,
    ModelSpecError,
    ResourceLimitError,
    UserCodeError,
    WeightsError,
    first_line,
    user_code,
)
from normdeploy.io import check_input_file

if TYPE_CHECKING:
    import torch

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class ResolvedModel:
    """A module ready to export or verify, with where it came from."""

    name: str
    module: torch.nn.Module
    example_inputs: tuple[Any, ...]
    source: str


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' → (1, 3, 224, 224); InvalidArgumentError on anything else."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise InvalidArgumentError(
            f"input_shapes: '{text}' is not a shape like 1x3x224x224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise InvalidArgumentError(f"input_shapes: '{text}' must have positive dims")
    return dims


def check_input_shapes_fit(input_shapes: Sequence[Sequence[int]]) -> None:
    """Refuse example inputs (float32) over the memory budget before they are allocated."""
    from normdeploy.budget import array_bytes, check_allocation

    shapes = [tuple(int(d) for d in s) for s in input_shapes]
    check_allocation(
        f"input_shapes: {', '.join('x'.join(map(str, s)) for s in shapes)} (float32)",
        sum(array_bytes(s, "float32") for s in shapes),
    )


# The reference models' module name: private, so it neither shadows nor is shadowed by a
# user's package named ``models``.
REFERENCE_MODULE = "_normdeploy_reference_models"


def reference_models_dir() -> Path | None:
    """The checkout's ``models/`` folder next to the ``normdeploy`` package, or None when this
    normdeploy is installed without its checkout (models/ is not part of the wheel)."""
    root = Path(__file__).resolve().parent.parent
    folder = root / "models"
    ours = (folder / "_registry.py").is_file() and (root / "pyproject.toml").is_file()
    return folder if ours else None


def reference_registry() -> ModuleType:
    """The checkout's ``models`` package, loaded by location under :data:`REFERENCE_MODULE`;
    ModelSpecError when this installation has no checkout next to it."""
    loaded = sys.modules.get(REFERENCE_MODULE)
    if loaded is not None:
        return loaded
    folder = reference_models_dir()
    if folder is None:
        raise ModelSpecError(
            "reference models live in the normdeploy checkout's models/, which is not "
            "installed with the package: run python cli.py from the checkout (or pip install "
            "-e it), or pass MODEL as package.module:factory"
        )
    spec = importlib.util.spec_from_file_location(
        REFERENCE_MODULE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[REFERENCE_MODULE] = module  # before running it: its relative imports need it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[REFERENCE_MODULE]
        raise
    return module


@contextlib.contextmanager
def _current_directory_first() -> Iterator[None]:
    """The current directory first on ``sys.path`` for a user import, as ``python -m`` does."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if sys.path and sys.path[0] == cwd:
            del sys.path[0]
        elif cwd in sys.path:
            sys.path.remove(cwd)


def _call_factory(spec: str) -> tuple[Any, tuple[Any, ...] | None]:
    with _current_directory_first():
        return _import_and_call(spec)


def _import_and_call(spec: str) -> tuple[Any, tuple[Any, ...] | None]:
    mod_name, _, attr_path = spec.partition(":")
    try:
        with user_code(f"MODEL '{spec}': importing '{mod_name}'"):
            mod = importlib.import_module(mod_name)
    except UserCodeError:
        raise
    except ImportError as exc:
        raise ModelSpecError(
            f"MODEL '{spec}': cannot import module '{mod_name}': {exc}"
        ) from None
    except Exception as exc:
        raise ModelSpecError(
            f"MODEL '{spec}': importing '{mod_name}' raised {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = mod
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(
                f"MODEL '{spec}': module '{mod_name}' has no attribute '{part}'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"MODEL '{spec}': '{attr_path}' is not callable")
    try:
        with user_code(f"MODEL '{spec}': factory"):
            made = obj()
    except UserCodeError:
        raise
    except Exception as exc:
        raise ModelSpecError(
            f"MODEL '{spec}': factory raised {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(made, tuple) and len(made) == 2:
        module, inputs = made
        if not isinstance(inputs, tuple):
            inputs = (inputs,)
        return module, inputs
    return made, None


def load_weights(module: torch.nn.Module, weights: str | os.PathLike[str]) -> None:
    """Load a state_dict safely (``weights_only=True``) into ``module``, strictly."""
    import pickle

    import torch

    p = check_input_file(weights, "weights")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"{p}: refused to load: not a plain state_dict (weights_only=True); {first[:160]}"
        ) from None
    except Exception as exc:
        raise WeightsError(f"{p}: cannot load weights ({type(exc).__name__})") from None
    if (
        isinstance(state, dict)
        and "state_dict" in state
        and isinstance(state["state_dict"], dict)
    ):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f"{p}: not a state_dict (a mapping of parameter names to tensors)")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. '{unexpected[0]}'")
        raise WeightsError(f"{p}: weights do not match the model: {'; '.join(parts)}")
    _check_weight_values(p, state)
    for k, v in state.items():
        if hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape):
            raise WeightsError(
                f"{p}: weight '{k}' has shape {tuple(v.shape)}, model expects "
                f"{tuple(own[k].shape)}"
            )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise WeightsError(f"{p}: cannot load into the model: {first_line(exc)}") from None


def _check_weight_values(p: Path, state: dict[str, Any]) -> None:
    """Every value a dense tensor with data: not a number, None, a meta or a sparse tensor."""
    import torch

    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{p}: weight '{key}' is {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise WeightsError(f"{p}: weight '{key}' is a meta tensor (shape only, no data)")
        if value.layout != torch.strided:
            raise WeightsError(
                f"{p}: weight '{key}' is a {str(value.layout).removeprefix('torch.')} tensor; "
                "weights must be dense"
            )


def resolve_model(
    spec: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
) -> ResolvedModel:
    """Turn MODEL into a module and example inputs (see the module docstring)."""
    import torch

    if _IMPORT_PATH.match(spec):
        module, inputs = _call_factory(spec)
        name, source = spec.partition(":")[2].split(".")[-1], spec
    elif ":" in spec or "/" in spec or spec.endswith((".py", ".pt", ".pth", ".onnx")):
        if Path(spec).suffix == ".onnx":
            raise ModelSpecError(f"MODEL '{spec}': expected a PyTorch model, got an ONNX file")
        raise ModelSpecError(
            f"MODEL '{spec}': not a reference model name or an import path package.module:factory"
        )
    else:
        registry = reference_registry()
        try:
            ref = registry.get(spec)
        except KeyError as exc:
            raise ModelSpecError(f"MODEL: {exc.args[0]}") from None
        module, inputs, name, source = ref.build(), ref.inputs(1), spec, f"models/{spec}"
    if not isinstance(module, torch.nn.Module):
        raise ModelSpecError(
            f"MODEL '{spec}': factory returned {type(module).__name__}, not a torch.nn.Module"
        )
    if weights is not None:
        load_weights(module, weights)
    if input_shapes:
        check_input_shapes_fit(input_shapes)
        g = torch.Generator().manual_seed(0)
        try:
            inputs = tuple(torch.randn(tuple(s), generator=g) for s in input_shapes)
        except (RuntimeError, MemoryError) as exc:  # over a budget raised by the user
            raise ResourceLimitError(
                f"input_shapes: cannot allocate the example inputs ({first_line(exc, 160)})"
            ) from None
    if inputs is None:
        raise ModelSpecError(
            f"MODEL '{spec}': factory gave no example inputs; give input_shapes=1x3x224x224 (the shape of each input)"
        )
    return ResolvedModel(name=name, module=module, example_inputs=tuple(inputs), source=source)
