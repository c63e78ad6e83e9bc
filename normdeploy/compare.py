"""Compare two sets of outputs: per-output statistics and a pass/fail against tolerances.

A comparison returns data (:class:`ArrayComparison`); nothing here prints. Pass means
``|actual - expected| <= atol + rtol * |expected|`` elementwise (numpy.allclose), identical shapes,
and NaN/inf in the same places.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from normdeploy.runtime import CPU, CUDA, OrtRunner, graph_input_specs, make_feeds


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


# Defaults per dtype. fp32: PyTorch and onnxruntime pick different conv/gemm kernels and
# summation orders; deep fp32 nets differ by ~1e-6 relative, so 1e-4 leaves headroom while a
# 1e-3 weight error still fails. fp16/bf16: 10/7 mantissa bits.
_DTYPE_TOLERANCE = {
    "float64": Tolerance(1e-9, 1e-7),
    "float32": Tolerance(1e-4, 1e-4),
    "float16": Tolerance(1e-2, 1e-2),
    "bfloat16": Tolerance(5e-2, 5e-2),
}
# CUDA: cuDNN algorithm choice and TF32 matmuls (onnxruntime enables TF32 by default on Ampere+)
# give ~1e-3 relative differences in fp32.
_CUDA_FP32 = Tolerance(2e-3, 2e-3)


def default_tolerance(dtype: Any, provider: str | None = None) -> Tolerance:
    """Documented default tolerance for an output dtype on a provider."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name in ("float32",) and provider == CUDA:
        return _CUDA_FP32
    if name not in _DTYPE_TOLERANCE:
        return Tolerance(0.0, 0.0)  # integers and bools must match exactly
    return _DTYPE_TOLERANCE[name]


@dataclass(frozen=True)
class ArrayComparison:
    """Statistics of ``actual`` against ``expected`` for one output."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    worst_index: tuple[int, ...]
    expected_at_worst: float
    actual_at_worst: float
    atol: float
    rtol: float
    passed: bool
    needed_atol: float
    detail: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        return d


def compare_arrays(
    name: str, expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance
) -> ArrayComparison:
    """Compare two arrays in float64; see the module docstring for the pass rule."""
    e = np.asarray(expected)
    a = np.asarray(actual)
    nan = float("nan")
    if e.shape != a.shape:
        return ArrayComparison(
            name, tuple(a.shape), str(a.dtype), nan, nan, nan, nan, (), nan, nan,
            tolerance.atol, tolerance.rtol, False, nan,
            detail=f"shape mismatch: expected {tuple(e.shape)}, got {tuple(a.shape)}",
        )  # fmt: skip
    e64 = e.astype(np.float64)
    a64 = a.astype(np.float64)
    if e.size == 0:
        return ArrayComparison(
            name, tuple(a.shape), str(a.dtype), 0.0, 0.0, 0.0, 1.0, (), nan, nan,
            tolerance.atol, tolerance.rtol, True, 0.0,
        )  # fmt: skip
    e_fin, a_fin = np.isfinite(e64), np.isfinite(a64)
    same_nonfinite = bool(
        np.array_equal(e_fin, a_fin)
        and np.array_equal(e64[~e_fin], a64[~a_fin], equal_nan=True)
    )
    both = e_fin & a_fin
    diff = np.where(both, np.abs(a64 - e64), 0.0)
    diff = np.where(e_fin == a_fin, diff, np.inf)
    # Floor the denominator at float32's smallest normal so an exact 0 does not overflow.
    rel = diff / np.maximum(np.abs(e64), np.finfo(np.float32).tiny)
    rel = np.where(diff == 0, 0.0, rel)
    flat_worst = int(np.argmax(diff - tolerance.rtol * np.where(both, np.abs(e64), 0.0)))
    worst = tuple(int(i) for i in np.unravel_index(flat_worst, e.shape))
    ef, af = e64[both].ravel(), a64[both].ravel()
    denom = float(np.linalg.norm(ef) * np.linalg.norm(af))
    cosine = float(ef @ af / denom) if denom > 0 else (1.0 if np.array_equal(ef, af) else 0.0)
    excess = diff - tolerance.rtol * np.abs(np.where(both, e64, 0.0))
    needed = float(max(0.0, np.max(excess)))
    passed = same_nonfinite and bool(
        np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(np.where(both, e64, 0.0)))
    )
    detail = "" if same_nonfinite else "NaN/inf in different places"
    return ArrayComparison(
        name=name,
        shape=tuple(int(s) for s in a.shape),
        dtype=str(a.dtype),
        max_abs=float(np.max(diff)),
        max_rel=float(np.max(rel)),
        mean_abs=float(np.mean(diff)),
        cosine=cosine,
        worst_index=worst,
        expected_at_worst=float(e64[worst]),
        actual_at_worst=float(a64[worst]),
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        passed=passed,
        needed_atol=needed,
        detail=detail,
    )


def compare_onnx_models(
    reference: Any,
    candidate: Any,
    *,
    provider: str = CPU,
    batch_sizes: tuple[int, ...] = (1, 2),
    seed: int = 0,
    tolerance: Tolerance | None = None,
    dim_values: dict[str, int] | None = None,
) -> list[ArrayComparison]:
    """Run two ONNX models (protos, paths or bytes) on the same seeded stress inputs and compare.

    Both run with onnxruntime graph optimizations off, so the comparison is of the graphs as
    written. Outputs are matched by name, or by position when the names differ. Comparison names
    carry the batch size (``logits@b2``). Static batch dims are kept, so duplicates are dropped.
    """
    ref_runner = OrtRunner(reference, provider)
    cand_runner = OrtRunner(candidate, provider)
    specs = graph_input_specs(_header_proto(reference))
    results: list[ArrayComparison] = []
    seen: set[tuple] = set()
    for batch in batch_sizes:
        feeds = make_feeds(specs, batch, seed, dim_values)
        key = tuple((k, v.shape) for k, v in feeds.items())
        if key in seen:
            continue
        seen.add(key)
        expected = ref_runner.infer(feeds)
        actual = cand_runner.infer(feeds)
        pairs = (
            [(n, n) for n in expected]
            if set(expected) == set(actual)
            else list(zip(expected, actual, strict=False))
        )
        for e_name, a_name in pairs:
            e = expected[e_name]
            tol = tolerance or default_tolerance(e.dtype, provider)
            results.append(compare_arrays(f"{e_name}@b{batch}", e, actual[a_name], tol))
    return results


def _header_proto(model: Any) -> onnx.ModelProto:
    """The model's proto, without reading external data (only its inputs are needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load_model(str(model), load_external_data=False)
