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
import inspect
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

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
from normdeploy.shapes import (
    DtypeRequest,
    ShapeRequest,
    dtype_of,
    example_dtype_high,
    input_dtypes_arg,
    shapes_by_name,
)

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


def forward_parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module.forward``'s positional parameters ([] where the signature is hidden)."""
    try:
        return [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return []


def forward_input_names(module: torch.nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` positional inputs of ``module.forward`` (``input`` /
    ``input_{i}`` where the signature does not say)."""
    params = forward_parameters(module)
    if len(params) >= count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _vocabulary(module: torch.nn.Module) -> int | None:
    """The smallest ``num_embeddings`` of the module's Embeddings: ids below it are valid."""
    import torch

    sizes = [
        m.num_embeddings
        for m in module.modules()
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    ]
    return min(sizes) if sizes else None


def example_inputs_for(
    module: torch.nn.Module,
    input_shapes: ShapeRequest,
    *,
    examples: Sequence[Any] | None = None,
    input_dtypes: DtypeRequest | None = None,
    seed: int = 0,
) -> tuple[Any, ...]:
    """Example inputs of the requested shapes (``input_shapes``: one per input in order, or by
    the forward's parameter name; inputs not named keep their example). Each keeps its
    example's dtype, else takes ``input_dtypes`` (one for all, or by name; default float32);
    integer inputs get ids below the vocabulary an Embedding reveals (within the example's own
    range where there is one), floats seeded normal values. Sized against the memory budget
    before anything is allocated."""
    import torch

    from normdeploy.budget import array_bytes, check_allocation
    from normdeploy.verification.runners import from_numpy

    examples = tuple(examples or ())
    if isinstance(input_shapes, Mapping):
        known = forward_input_names(
            module, max(len(examples), len(forward_parameters(module)))
        )
        shapes_by_name(known, input_shapes, owner="the model")  # unknown names: one line
        count = max(len(examples), *(known.index(n) + 1 for n in input_shapes))
    else:
        count = len(examples) or len(input_shapes)
    names = forward_input_names(module, count)
    wanted = shapes_by_name(names, input_shapes, owner="the model")
    dtypes = input_dtypes_arg(input_dtypes)
    if isinstance(dtypes, Mapping) and (unknown := sorted(set(dtypes) - {*names, "*"})):
        raise InvalidArgumentError(
            f"input_dtypes: no input named {', '.join(map(repr, unknown))} "
            f"(the forward's inputs: {', '.join(names)})"
        )
    plan: list[tuple[str, tuple[int, ...] | None, np.dtype, Any]] = []
    for i, name in enumerate(names):
        example = examples[i] if i < len(examples) else None
        asked = dtypes.get(name, dtypes.get("*")) if isinstance(dtypes, Mapping) else dtypes
        if name not in wanted:
            if example is None:
                raise InvalidArgumentError(
                    f"input_shapes: no shape for input '{name}' and the factory gives no "
                    "example inputs; give a shape for every input"
                )
            plan.append((name, None, np.dtype("float32"), example))
            continue
        if asked is not None:
            dtype = asked
        elif isinstance(example, torch.Tensor):
            dtype = to_numpy_dtype(example.dtype)
        else:
            dtype = np.dtype("float32")
        plan.append((name, wanted[name], dtype, example))
    check_allocation(
        "input_shapes: "
        + ", ".join(f"{'x'.join(map(str, s))} ({d.name})" for _, s, d, _ in plan if s),
        sum(array_bytes(s, d) for _, s, d, _ in plan if s is not None),
    )
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(module)
    out = []
    try:
        for _, shape, dtype, example in plan:
            if shape is None:
                out.append(example)
            elif dtype.kind in "iu":
                top = None
                if isinstance(example, torch.Tensor) and example.numel():
                    top = int(example.max())
                high = example_dtype_high(vocab, top)
                out.append(from_numpy(rng.integers(0, high, size=shape).astype(dtype)))
            elif dtype.kind == "b":
                out.append(from_numpy(rng.integers(0, 2, size=shape).astype(bool)))
            else:
                out.append(from_numpy(rng.standard_normal(shape).astype(dtype)))
    except MemoryError as exc:  # within the budget, yet the machine said no
        raise ResourceLimitError(
            f"input_shapes: cannot allocate the example inputs ({first_line(exc, 160)})"
        ) from None
    return tuple(out)


def to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (bfloat16 through ml_dtypes)."""
    import torch

    if dtype == torch.bfloat16:
        return dtype_of("bfloat16")
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


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
    input_shapes: ShapeRequest | None = None,
    input_dtypes: DtypeRequest | None = None,
    need_inputs: bool = True,
) -> ResolvedModel:
    """Turn MODEL into a module and example inputs (see the module docstring).

    ``input_shapes`` (and ``input_dtypes``) make new example inputs (:func:`example_inputs_for`).
    With ``need_inputs=False`` a factory that returns only a module is fine (example inputs
    ``()``: a graph's declared inputs will size the feeds); otherwise ModelSpecError.
    """
    import torch

    input_dtypes_arg(input_dtypes)  # bad names fail before the factory runs
    if input_dtypes is not None and not input_shapes:
        raise InvalidArgumentError(
            "input_dtypes: only with input_shapes=SHAPE (the inputs it makes take it; an "
            "example input's dtype is kept)"
        )
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
        inputs = example_inputs_for(
            module, input_shapes, examples=inputs, input_dtypes=input_dtypes
        )
    if inputs is None and need_inputs:
        raise ModelSpecError(
            f"MODEL '{spec}': factory gave no example inputs; give input_shapes=1x3x224x224 (the shape of each input)"
        )
    return ResolvedModel(
        name=name, module=module, example_inputs=tuple(inputs or ()), source=source
    )
