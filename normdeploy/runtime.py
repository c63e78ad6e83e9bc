"""onnxruntime sessions, execution-provider choice, and input generation.

Every place that runs an ONNX graph goes through :func:`resolve_providers` and
:class:`OrtRunner`, so CUDA is used wherever it exists and its absence is said once, clearly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from normdeploy.errors import InvalidArgumentError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}
_ALIAS_OF = {v: k for k, v in PROVIDER_ALIASES.items()}


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def provider_alias(provider: str) -> str:
    """Short name ('cpu', 'cuda') for a provider, or the full name when there is none."""
    return _ALIAS_OF.get(provider, provider)


@dataclass(frozen=True)
class ProviderChoice:
    """Providers to run on, and what was asked for but is not there (with why)."""

    providers: tuple[str, ...]
    notes: tuple[str, ...] = ()


def cuda_unavailable_reason() -> str:
    """Why CUDAExecutionProvider is not usable here, in one line."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        return "onnxruntime is not installed"
    if CUDA not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            "(install the 'gpu' extra: onnxruntime-gpu)"
        )
    return ""


def resolve_providers(requested: Sequence[str] | str | None = None) -> ProviderChoice:
    """Map user names ('cpu', 'cuda', full names) to available providers.

    ``None`` means every useful provider present (CPU, plus CUDA when available) and notes when
    CUDA is absent. Naming a provider that is not available is an error, not a silent fallback.
    """
    avail = available_providers()
    if requested is None or requested == "auto":
        chosen = [CPU]
        notes = []
        if CUDA in avail:
            chosen.append(CUDA)
        else:
            notes.append(f"CUDA not used: {cuda_unavailable_reason()}")
        return ProviderChoice(tuple(chosen), tuple(notes))
    if isinstance(requested, str):
        requested = [r for r in requested.split(",") if r.strip()]
    chosen = []
    for name in requested:
        key = name.strip()
        full = PROVIDER_ALIASES.get(key.lower(), key)
        if full not in PROVIDER_ALIASES.values() and full not in avail:
            known = ", ".join(sorted(PROVIDER_ALIASES))
            raise InvalidArgumentError(
                f"--providers: unknown provider '{key}' (known: {known})"
            )
        if full not in avail:
            reason = cuda_unavailable_reason() if full == CUDA else "not in this onnxruntime"
            raise InvalidArgumentError(f"--providers: '{key}' is not available here: {reason}")
        if full not in chosen:
            chosen.append(full)
    if not chosen:
        raise InvalidArgumentError("--providers: no provider given")
    return ProviderChoice(tuple(chosen))


def session_options(optimize: bool = False, threads: int | None = None) -> Any:
    """SessionOptions; graph optimizations off by default so we test the graph as written."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


@dataclass
class OrtRunner:
    """Runs one ONNX model on one execution provider: ``infer(feeds) -> {name: array}``."""

    model: onnx.ModelProto | str | os.PathLike[str] | bytes
    provider: str = CPU
    optimize: bool = False
    threads: int | None = None
    _session: Any = field(default=None, init=False, repr=False)

    @property
    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            src: Any = self.model
            if isinstance(src, onnx.ModelProto):
                src = src.SerializeToString()
            elif isinstance(src, Path):
                src = str(src)
            self._session = ort.InferenceSession(
                src,
                sess_options=session_options(self.optimize, self.threads),
                providers=[self.provider] if self.provider == CPU else [self.provider, CPU],
            )
        return self._session

    @property
    def providers_used(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        return dict(zip(names, self.session.run(names, dict(feeds)), strict=True))


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, and shape (ints, or str/None for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def graph_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of a graph (initializers listed as inputs are not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, np.dtype(dtype), tuple(dims)))
    return specs


def concrete_shape(
    spec: InputSpec, batch_size: int | None, dim_values: Mapping[str, int] | None = None
) -> tuple[int, ...]:
    """Fill symbolic dims: the first with ``batch_size``, named ones from ``dim_values``, else 8.

    Static dims are kept as written, the batch dim included.
    """
    out = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and dim_values and d in dim_values:
            out.append(int(dim_values[d]))
        elif i == 0 and batch_size is not None:
            out.append(batch_size)
        else:
            out.append(8)
    return tuple(out)


def stress_array(
    shape: Sequence[int], dtype: np.dtype, rng: np.random.Generator
) -> np.ndarray:
    """Inputs that stress normalization: signed, a few large outliers, one constant channel.

    Integer inputs (token ids, indices) get small non-negative values.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    x = rng.standard_normal(shape) * 1.5 + 0.25
    flat = x.reshape(-1)
    if flat.size >= 16:
        idx = rng.choice(flat.size, size=max(1, flat.size // 500), replace=False)
        flat[idx] *= 20.0  # outliers
    if len(shape) >= 3 and shape[1] >= 2:
        x[:, shape[1] - 1] = 0.75  # a constant channel: zero variance over its spatial extent
    return x.astype(dtype)


def make_feeds(
    specs: Sequence[InputSpec],
    batch_size: int | None = None,
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded stress inputs for every graph input."""
    rng = np.random.default_rng(seed)
    return {
        s.name: stress_array(concrete_shape(s, batch_size, dim_values), s.dtype, rng)
        for s in specs
    }
