"""One comparison for every place that compares numbers, one check record, one tolerance policy.

Export's check, fold-bn's self-check, the census confirmation, ``verify`` and the bisection all
turn two arrays into an :class:`ArrayComparison` through :class:`TolerancePolicy` and record it
as a :class:`Check` (what was compared against what, where, on which inputs). Nothing here prints.

The rule: an output passes when it has the expected shape, NaN/inf in the same places, and
``|actual - expected| <= atol + rtol * |expected|`` elementwise (numpy.allclose), with ``atol``
and ``rtol`` from the output's dtype and provider (:data:`DTYPE_TOLERANCE`) unless overridden.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from normdeploy.errors import first_line
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.verification.feeds import make_feeds
from normdeploy.verification.runners import CPU, CUDA, OrtRunner

# Check kinds: what the candidate was compared against.
REFERENCE = "reference"  # the reference (PyTorch eval, or a reference graph)
CUDA_VS_CPU = "cuda-vs-cpu"  # the graph on CUDA against the graph on CPU
TORCH_CUDA = "torch-cuda"  # the graph on CUDA against PyTorch eval on CUDA
BATCH_INDEPENDENCE = "batch-independence"  # each sample alone against the same in the batch
GRAPH_VS_ORIGINAL = "graph-vs-original"  # a rewritten graph against the graph it came from
MODULE_VS_TORCH = "module-vs-torch"  # one module's ONNX value against its PyTorch output
MODULE_VS_ORACLE = "module-vs-oracle"  # one module's ONNX value against the float64 oracle


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


# Defaults per dtype. fp32: PyTorch and onnxruntime pick different conv/gemm kernels and
# summation orders; deep fp32 nets differ by ~1e-6 relative, so 1e-4 leaves headroom while a
# 1e-3 weight error still fails. fp16/bf16: 10/7 mantissa bits.
DTYPE_TOLERANCE = {
    "float64": Tolerance(1e-9, 1e-7),
    "float32": Tolerance(1e-4, 1e-4),
    "float16": Tolerance(1e-2, 1e-2),
    "bfloat16": Tolerance(5e-2, 5e-2),
}
# CUDA: cuDNN algorithm choice and TF32 matmuls (onnxruntime enables TF32 by default on Ampere+)
# give ~1e-3 relative differences in fp32.
CUDA_FP32 = Tolerance(2e-3, 2e-3)
EXACT = Tolerance(0.0, 0.0)  # integers and bools must match exactly


def default_tolerance(dtype: Any, provider: str | None = None) -> Tolerance:
    """Documented default tolerance for an output dtype on a provider."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name == "float32" and provider == CUDA:
        return CUDA_FP32
    return DTYPE_TOLERANCE.get(name, EXACT)


@dataclass(frozen=True)
class ArrayComparison:
    """Statistics of ``actual`` against ``expected`` for one output.

    The statistics are None when there was nothing to measure (a shape mismatch, a failed run);
    ``detail`` then says why.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float | None
    max_rel: float | None
    mean_abs: float | None
    cosine: float | None
    worst_index: tuple[int, ...]
    expected_at_worst: float | None
    actual_at_worst: float | None
    atol: float
    rtol: float
    passed: bool
    needed_atol: float | None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.passed

    @property
    def severity(self) -> float:
        """How far outside (or inside) its tolerance: sorts the worst comparison last."""
        return math.inf if self.needed_atol is None else self.needed_atol

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        return d


def _unmeasured(
    name: str, shape: tuple[int, ...], dtype: str, tolerance: Tolerance, detail: str
) -> ArrayComparison:
    return ArrayComparison(
        name, shape, dtype, None, None, None, None, (), None, None,
        tolerance.atol, tolerance.rtol, False, None, detail,
    )  # fmt: skip


def compare_arrays(
    name: str, expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance
) -> ArrayComparison:
    """Compare two arrays in float64; see the module docstring for the pass rule."""
    e = np.asarray(expected)
    a = np.asarray(actual)
    if e.shape != a.shape:
        return _unmeasured(
            name, tuple(a.shape), str(a.dtype), tolerance,
            f"shape mismatch: expected {tuple(e.shape)}, got {tuple(a.shape)}",
        )  # fmt: skip
    e64 = e.astype(np.float64)
    a64 = a.astype(np.float64)
    if e.size == 0:
        return ArrayComparison(
            name, tuple(a.shape), str(a.dtype), 0.0, 0.0, 0.0, 1.0, (), None, None,
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
    scaled = tolerance.rtol * np.where(both, np.abs(e64), 0.0)
    excess = diff - scaled
    flat_worst = int(np.argmax(excess))
    worst = tuple(int(i) for i in np.unravel_index(flat_worst, e.shape))
    ef, af = e64[both].ravel(), a64[both].ravel()
    denom = float(np.linalg.norm(ef) * np.linalg.norm(af))
    cosine = float(ef @ af / denom) if denom > 0 else (1.0 if np.array_equal(ef, af) else 0.0)
    passed = same_nonfinite and bool(np.all(diff <= tolerance.atol + scaled))
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
        needed_atol=float(max(0.0, np.max(excess))),
        detail="" if same_nonfinite else "NaN/inf in different places",
    )


@dataclass(frozen=True)
class TolerancePolicy:
    """The one rule every comparison in the package uses (see the module docstring).

    ``atol``/``rtol`` replace the per-dtype default for every output; ``tolerance`` replaces the
    whole default.
    """

    atol: float | None = None
    rtol: float | None = None
    tolerance: Tolerance | None = None

    def tolerance_for(self, dtype: Any, provider: str = CPU) -> Tolerance:
        base = self.tolerance or default_tolerance(dtype, provider)
        return Tolerance(
            base.atol if self.atol is None else float(self.atol),
            base.rtol if self.rtol is None else float(self.rtol),
        )

    def compare(
        self, name: str, expected: np.ndarray, actual: np.ndarray, provider: str = CPU
    ) -> ArrayComparison:
        dtype = np.asarray(actual).dtype
        return compare_arrays(name, expected, actual, self.tolerance_for(dtype, provider))

    def describe(self) -> str:
        """The rule in words, for reports."""
        if self.tolerance is None and self.atol is None and self.rtol is None:
            return "per-dtype defaults (fp32 atol=rtol=1e-4; CUDA fp32 2e-3; fp16 1e-2)"
        return str(self.tolerance_for(np.float32))


DEFAULT_POLICY = TolerancePolicy()


@dataclass(frozen=True)
class Check:
    """One output compared once: what against what, on which provider and inputs."""

    kind: str
    provider: str
    inputs: str
    comparison: ArrayComparison
    batch_size: int | None = None

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "provider": self.provider,
            "inputs": self.inputs,
            "batch_size": self.batch_size,
            **self.comparison.to_dict(),
        }


def failed_check(
    kind: str, provider: str, inputs: str, what: str, exc: BaseException | str,
    batch_size: int | None = None, name: str = "-",
) -> Check:  # fmt: skip
    """A check whose run failed: no statistics, the cause in ``detail``."""
    message = exc if isinstance(exc, str) else first_line(exc, 200)
    comp = _unmeasured(name, (), "-", EXACT, f"{what} failed: {message}")
    return Check(kind, provider, inputs, comp, batch_size)


@dataclass(frozen=True)
class OutputPairing:
    """Which expected output goes with which actual output, and how they were matched."""

    pairs: tuple[tuple[str, str], ...]
    by: str  # "name" | "position"


def pair_outputs(expected: Sequence[str], actual: Sequence[str]) -> OutputPairing | None:
    """Match by name when the names agree (order free), else by position; None on a count
    mismatch."""
    if set(expected) == set(actual) and len(expected) == len(actual):
        return OutputPairing(tuple((n, n) for n in expected), "name")
    if len(expected) != len(actual):
        return None
    return OutputPairing(tuple(zip(expected, actual, strict=True)), "position")


def compare_outputs(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    *,
    kind: str,
    provider: str,
    inputs: str,
    policy: TolerancePolicy = DEFAULT_POLICY,
    batch_size: int | None = None,
    suffix: str = "",
) -> list[Check]:
    """One check per output pair (see :func:`pair_outputs`); a count mismatch is one failed
    check."""
    pairing = pair_outputs(list(expected), list(actual))
    if pairing is None:
        return [
            failed_check(
                kind, provider, inputs, "output matching",
                f"{len(expected)} expected output(s) vs {len(actual)}", batch_size,
            )
        ]  # fmt: skip
    return [
        Check(
            kind,
            provider,
            inputs,
            policy.compare(f"{a_name}{suffix}", expected[e_name], actual[a_name], provider),
            batch_size,
        )
        for e_name, a_name in pairing.pairs
    ]


def compare_graphs(
    reference: onnx.ModelProto | str | bytes | Any,
    candidate: onnx.ModelProto | str | bytes | Any,
    *,
    provider: str = CPU,
    policy: TolerancePolicy = DEFAULT_POLICY,
    batch_sizes: Sequence[int] = (1, 2),
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
) -> tuple[Check, ...]:
    """ONNX vs ONNX on the same seeded stress inputs, both as written (optimizations off).

    Checks are named ``output@bN``; static batch dims keep their size, so duplicates drop.
    """
    ref_runner = OrtRunner(reference, provider)
    cand_runner = OrtRunner(candidate, provider)
    specs = graph_input_specs(_header_proto(reference))
    checks: list[Check] = []
    seen: set[Any] = set()
    for batch in batch_sizes:
        feeds = make_feeds(specs, batch, seed, dim_values)
        key = tuple((k, v.shape) for k, v in feeds.items())
        if key in seen:
            continue
        seen.add(key)
        ran = next((v.shape[0] for v in feeds.values() if v.ndim), batch)
        checks += compare_outputs(
            ref_runner.infer(feeds), cand_runner.infer(feeds),
            kind=GRAPH_VS_ORIGINAL, provider=provider, inputs=f"b{ran}/seed{seed}",
            policy=policy, batch_size=int(ran), suffix=f"@b{batch}",
        )  # fmt: skip
    return tuple(checks)


def _header_proto(model: Any) -> onnx.ModelProto:
    """The model's proto, without reading external data (only its inputs are needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load_model(str(model), load_external_data=False)
