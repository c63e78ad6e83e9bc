"""One comparison for every place that compares numbers, one check record, one tolerance policy.

Export's check, fold-bn's self-check, the census confirmation, ``verify`` and the bisection all
turn two arrays into an :class:`ArrayComparison` through :class:`TolerancePolicy` and record it
as a :class:`Check` (what was compared against what, where, on which inputs). Nothing here prints.

The rule: measure the noise instead of guessing it. Ground truth is the reference evaluated in
float64 on the same inputs (:mod:`~normdeploy.verification.float64`). Per output, relative to the
output's scale (not elementwise)::

    e = max|candidate − truth| / max|truth|     the candidate's error
    f = max|reference − truth| / max|truth|     the float32 reference's own error: the floor

and the output passes when shapes agree, NaN/inf sit in the same places, and
``e ≤ K · max(f, f_min)``. ``f`` is pooled per output: the largest floor over every input set
that ran. ``f_min`` (:data:`FLOOR_MIN`, the dtype's unit roundoff) keeps an output that float32
happens to compute exactly from getting a zero bound. Rules, by what is available:

- ``float64``: a float64 reference exists (PyTorch's float64 copy, or a float64 copy of the
  reference graph): the rule above.
- ``float64-floor``: two float32 evaluations compared with each other (batch independence)
  against the floor measured for that output.
- ``nominal``: no float64 reference (a graph onnxruntime cannot run in double, e.g. with Conv; a
  module that fails in float64): ``e = max|candidate − reference| / max|reference|`` against a
  documented floor per dtype (:data:`NOMINAL_FLOOR`, the largest float32 floor measured on deep
  nets, rounded up).
- CUDA: onnxruntime enables TF32 for float32 matmuls and convolutions by default, so on CUDA the
  floor is at least :data:`CUDA_FLOOR`.
- 16-bit candidates (a graph converted to float16 or bfloat16): f_min is the candidate dtype's
  unit roundoff, so a float16 graph against a float32 module may be off by K·2^-11 of scale.
- ``fixed``: an ``atol``/``rtol`` override: ``|candidate − reference| ≤ atol + rtol·|reference|``
  elementwise (numpy.allclose), for the outputs it names.
- ``exact``: integer and bool outputs must be equal.

K and f_min were chosen by measurement (``python benchmarks/tolerance_bench.py --seeds 4``;
README, "Defaults, and why"): on deep pre-activation BN stacks (40 blocks), RepVGG-, DenseNet- and
MobileViT-shaped nets, transformers, a wide-range head and a B×B model, over 4 seeds and both
exporters, honest exports reach e/f ≤ 1.5 on final outputs, ≤ 2.3 in the census and ≤ 4.8 on
bisection probes. ``K = 10`` leaves 2× headroom over the worst of them, and every fault that
moves an output 20 floors fails (e ≥ 20·f − e_honest > 10·f), as does any beyond about 11.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from normdeploy.errors import first_line
from normdeploy.onnx_graph import InputSpec, graph_input_specs
from normdeploy.shapes import batch_axes
from normdeploy.verification.feeds import FeedSet, stress_feed_sets
from normdeploy.verification.float64 import Float64Graph
from normdeploy.verification.runners import CPU, CUDA, OrtRunner

# Check kinds: what the candidate was compared against.
REFERENCE = "reference"  # the reference (PyTorch eval, or a reference graph)
CUDA_VS_CPU = "cuda-vs-cpu"  # the graph on CUDA against the graph on CPU
TORCH_CUDA = "torch-cuda"  # the graph on CUDA against PyTorch eval on CUDA
BATCH_INDEPENDENCE = "batch-independence"  # each sample alone against the same in the batch
GRAPH_VS_ORIGINAL = "graph-vs-original"  # a rewritten graph against the graph it came from
MODULE_VS_TORCH = "module-vs-torch"  # one module's ONNX value against its PyTorch output
MODULE_VS_ORACLE = "module-vs-oracle"  # one module's ONNX value against the float64 oracle

# Rules (see the module docstring).
FLOAT64 = "float64"
FLOAT64_FLOOR = "float64-floor"
NOMINAL = "nominal"
FIXED = "fixed"
EXACT_RULE = "exact"

# How many times its float32 floor a candidate's error may be (measured; module docstring).
K = 10.0
# Unit roundoff per dtype: the smallest floor a computation in that dtype can claim.
FLOOR_MIN = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
# Floors when no float64 reference exists: the largest measured float32 floor on deep nets
# (4.6e-7, benchmarks/tolerance_bench.py) rounded up; 16-bit types from their mantissa width.
NOMINAL_FLOOR = {"float64": 1e-12, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
# TF32 (10-bit mantissa) on CUDA: relative errors of ~1e-3 in deep float32 nets are honest.
CUDA_FLOOR = 1e-3


@dataclass(frozen=True)
class Tolerance:
    """A fixed elementwise bound: ``|actual - expected| <= atol + rtol * |expected|``."""

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


# Fixed bounds per dtype: only the half of an ``atol``/``rtol`` override the user left out.
DTYPE_TOLERANCE = {
    "float64": Tolerance(1e-9, 1e-7),
    "float32": Tolerance(1e-4, 1e-4),
    "float16": Tolerance(1e-2, 1e-2),
    "bfloat16": Tolerance(5e-2, 5e-2),
}
CUDA_FP32 = Tolerance(2e-3, 2e-3)
EXACT = Tolerance(0.0, 0.0)  # integers and bools must match exactly


def default_tolerance(dtype: Any, provider: str | None = None) -> Tolerance:
    """The fixed elementwise bound for an output dtype on a provider (override defaults)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name == "float32" and provider == CUDA:
        return CUDA_FP32
    return DTYPE_TOLERANCE.get(name, EXACT)


@dataclass(frozen=True)
class ArrayComparison:
    """Statistics of ``actual`` against ``expected`` for one output, and the verdict's numbers.

    ``max_abs`` … ``actual_at_worst`` describe actual against the reference as it ran (float32
    PyTorch, or the reference graph). ``error``, ``floor``, ``floor_used``, ``bound`` and
    ``usage`` are the policy's: e, f (None when not measured), max(f, f_min) or the nominal floor,
    K·floor_used, and e / bound (the share of the bound used; ≤ 1 passes). ``atol`` is the bound
    as an absolute difference (``rtol`` 0) under the scale-relative rules. The statistics are
    None when there was nothing to measure (a shape mismatch, a failed run); ``detail`` says why.
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
    rule: str = FIXED
    error: float | None = None
    floor: float | None = None
    floor_used: float | None = None
    bound: float | None = None
    usage: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def ratio(self) -> float | None:
        """e / max(f, f_min): how many floors the error is."""
        if self.error is None or not self.floor_used:
            return None
        return self.error / self.floor_used

    @property
    def margin(self) -> float | None:
        """bound / e: how many times larger the error could grow and still pass (None: e=0)."""
        if self.usage is None or self.usage == 0:
            return None
        return 1.0 / self.usage

    @property
    def severity(self) -> float:
        """How far into (or past) its bound: sorts the worst comparison last."""
        return math.inf if self.usage is None else self.usage

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        d["ratio"] = self.ratio
        d["margin"] = self.margin
        return d


def _unmeasured(
    name: str, shape: tuple[int, ...], dtype: str, detail: str, rule: str = FIXED
) -> ArrayComparison:
    return ArrayComparison(
        name, shape, dtype, None, None, None, None, (), None, None, 0.0, 0.0, False, None,
        detail, rule,
    )  # fmt: skip


def scale_relative_error(actual: np.ndarray, truth: np.ndarray) -> float:
    """``max|actual − truth| / max|truth|`` over entries finite in both (0 when none are);
    the one measure of e and f. A zero-scale truth is floored at float32's smallest normal."""
    a = np.asarray(actual, np.float64)
    t = np.asarray(truth, np.float64)
    delta = np.asarray(np.subtract(a, t))  # an array also for 0-d inputs
    np.abs(delta, out=delta)
    if not math.isfinite(float(delta.sum())):  # a sum is finite exactly when every entry is
        both = np.isfinite(a) & np.isfinite(t)
        if not both.any():
            return 0.0
        a, t, delta = a[both], t[both], delta[both]
    return _relative(float(np.max(delta)), float(np.max(np.abs(t))))


def _relative(diff: float, scale: float) -> float:
    """``diff / scale``, 0 for no difference; a zero scale counts as float32's smallest normal."""
    return 0.0 if diff == 0 else diff / max(scale, float(np.finfo(np.float32).tiny))


def _describe(
    name: str, e64: np.ndarray, a64: np.ndarray, judged: np.ndarray, dtype: str
) -> dict[str, Any]:
    """Descriptive statistics of actual against expected; the worst element is where
    ``judged`` (what the rule measures) is largest."""
    # In place where possible: outputs can hold millions of entries.
    diff = np.asarray(np.subtract(a64, e64))
    np.abs(diff, out=diff)
    total = float(diff.sum())  # finite exactly when every difference is (the common case)
    same_nonfinite = all_finite = math.isfinite(total)
    ef, af = e64.ravel(), a64.ravel()
    if not all_finite:
        e_fin, a_fin = np.isfinite(e64), np.isfinite(a64)
        both = e_fin & a_fin
        diff = np.where(e_fin == a_fin, np.where(both, diff, 0.0), np.inf)
        ef, af = e64[both], a64[both]
        same_nonfinite = bool(
            np.array_equal(e_fin, a_fin)
            and np.array_equal(e64[~e_fin], a64[~a_fin], equal_nan=True)
        )
        total = float(diff.sum())
    # Floor the denominator at float32's smallest normal so an exact 0 does not overflow.
    rel = np.asarray(np.abs(e64))
    np.maximum(rel, np.finfo(np.float32).tiny, out=rel)
    with np.errstate(invalid="ignore"):
        np.divide(diff, rel, out=rel)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(judged)), e64.shape))
    # einsum, not BLAS: a BLAS dot wakes its thread pool and took 8 ms for 200k elements on a
    # loaded 2-core machine (einsum: 0.1 ms).
    denom = math.sqrt(float(np.einsum("i,i->", ef, ef)) * float(np.einsum("i,i->", af, af)))
    dot = float(np.einsum("i,i->", ef, af))
    cosine = dot / denom if denom > 0 else (1.0 if np.array_equal(ef, af) else 0.0)
    return {
        "name": name,
        "shape": tuple(int(s) for s in a64.shape),
        "dtype": dtype,
        "max_abs": float(np.max(diff)),
        "max_rel": float(rel.max() if all_finite else np.fmax.reduce(rel, axis=None)),
        "mean_abs": total / diff.size,
        "cosine": cosine,
        "worst_index": worst,
        "expected_at_worst": float(e64[worst]),
        "actual_at_worst": float(a64[worst]),
        "same_nonfinite": same_nonfinite,
    }


# Elements per block of the blockwise statistics: two float64 work buffers of this size stay
# in cache, where whole-array float64 copies cost a page fault per 4 KiB and a pass through
# memory each (the census compares hundreds of module outputs).
BLOCK = 1 << 15


def _scaled_stats(
    name: str, e: np.ndarray, a: np.ndarray, t: np.ndarray, measure_floor: bool
) -> tuple[dict[str, Any], float, float, float] | None:
    """What :func:`compare_scaled` measures, for finite real arrays of one shape, block by
    block without a float64 copy of any of them: :func:`_describe`'s statistics (the worst
    entry: the first largest ``|a − t|``), ``max|a − t|``, ``max|t|`` and ``max|e − t|`` (with
    ``measure_floor``). None when an entry is not finite (the caller then takes the
    whole-array path that handles NaN/inf)."""
    ef, af, tf = e.reshape(-1), a.reshape(-1), t.reshape(-1)
    n = ef.size
    work = np.empty(min(n, BLOCK))
    rel = np.empty(min(n, BLOCK))
    tiny = float(np.finfo(np.float32).tiny)
    worst, at, scale, floor_err = -1.0, 0, 0.0, 0.0
    total, max_abs, max_rel, ee, aa, ea = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    f64 = np.float64
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        eb, ab, tb = ef[start:stop], af[start:stop], tf[start:stop]
        w, r = work[: stop - start], rel[: stop - start]
        np.subtract(ab, tb, out=w, dtype=f64)
        np.abs(w, out=w)
        i = int(np.argmax(w))  # the first NaN when there is one
        top = float(w[i])
        if not math.isfinite(top):  # a − t is finite exactly when both are
            return None
        if top > worst:
            worst, at = top, start + i
        scale = max(scale, float(tb.max()), -float(tb.min()))
        if measure_floor:
            np.subtract(eb, tb, out=w, dtype=f64)
            np.abs(w, out=w)
            floor_err = max(floor_err, float(w.max()))
        np.subtract(ab, eb, out=w, dtype=f64)
        np.abs(w, out=w)
        block_total = float(w.sum())
        if not math.isfinite(block_total):  # e not finite somewhere
            return None
        total += block_total
        max_abs = max(max_abs, float(w.max()))
        np.abs(eb, out=r, dtype=f64)
        np.maximum(r, tiny, out=r)
        np.divide(w, r, out=r)
        max_rel = max(max_rel, float(r.max()))
        ee += float(np.einsum("i,i->", eb, eb, dtype=f64))
        aa += float(np.einsum("i,i->", ab, ab, dtype=f64))
        ea += float(np.einsum("i,i->", eb, ab, dtype=f64))
    denom = math.sqrt(ee * aa)
    cosine = ea / denom if denom > 0 else (1.0 if np.array_equal(e, a) else 0.0)
    where = tuple(int(i) for i in np.unravel_index(at, e.shape))
    stats = {
        "name": name,
        "shape": tuple(int(s) for s in a.shape),
        "dtype": str(a.dtype),
        "max_abs": max_abs,
        "max_rel": max_rel,
        "mean_abs": total / n,
        "cosine": cosine,
        "worst_index": where,
        "expected_at_worst": float(e[where]),
        "actual_at_worst": float(a[where]),
    }
    return stats, worst, scale, floor_err


def _trivial(
    name: str, e: np.ndarray, a: np.ndarray, rule: str, atol: float = 0.0, rtol: float = 0.0
) -> ArrayComparison | None:
    """The comparison when there is nothing to measure: a shape mismatch (fails) or empty
    arrays (pass); None otherwise."""
    if e.shape != a.shape:
        return _unmeasured(
            name, tuple(a.shape), str(a.dtype),
            f"shape mismatch: expected {tuple(e.shape)}, got {tuple(a.shape)}", rule,
        )  # fmt: skip
    if e.size == 0:
        return ArrayComparison(
            name, tuple(a.shape), str(a.dtype), 0.0, 0.0, 0.0, 1.0, (), None, None, atol, rtol,
            True, 0.0, "", rule, 0.0, None, None, None, 0.0,
        )  # fmt: skip
    return None


def compare_arrays(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    tolerance: Tolerance,
    *,
    rule: str = FIXED,
    truth: np.ndarray | None = None,
) -> ArrayComparison:
    """The fixed elementwise rule (``rule`` names it: ``fixed`` or ``exact``); with ``truth``,
    e is reported beside it."""
    e = np.asarray(expected)
    a = np.asarray(actual)
    if (early := _trivial(name, e, a, rule, tolerance.atol, tolerance.rtol)) is not None:
        return early
    e64, a64 = e.astype(np.float64), a.astype(np.float64)
    both = np.isfinite(e64) & np.isfinite(a64)
    diff = np.where(both, np.abs(a64 - e64), 0.0)
    diff = np.where(np.isfinite(e64) == np.isfinite(a64), diff, np.inf)
    scaled = tolerance.rtol * np.where(both, np.abs(e64), 0.0)
    allowed = tolerance.atol + scaled
    excess = diff - scaled  # the atol that would have passed, given rtol
    stats = _describe(name, e64, a64, excess, str(a.dtype))
    same_nonfinite = stats.pop("same_nonfinite")
    passed = same_nonfinite and bool(np.all(diff <= allowed))
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(diff == 0, 0.0, diff / allowed)
    usage = float(np.max(shares))
    error = None if truth is None else scale_relative_error(a64, truth)
    return ArrayComparison(
        **stats,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        passed=passed,
        needed_atol=float(max(0.0, np.max(excess))),
        detail="" if same_nonfinite else "NaN/inf in different places",
        rule=rule,
        error=error,
        usage=usage if math.isfinite(usage) and same_nonfinite else None,
    )


def compare_scaled(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    *,
    floor_min: float,
    k: float = K,
    truth: np.ndarray | None = None,
    floor: float | None = None,
    nominal: float | None = None,
) -> ArrayComparison:
    """The scale-relative rules: ``float64`` with ``truth`` (``floor`` measured here when not
    given), ``float64-floor`` with ``floor`` alone, else ``nominal`` (floor ``nominal``)."""
    e = np.asarray(expected)
    a = np.asarray(actual)
    rule = FLOAT64 if truth is not None else (FLOAT64_FLOOR if floor is not None else NOMINAL)
    if (early := _trivial(name, e, a, rule)) is not None:
        return early
    t = e if truth is None else np.asarray(truth)
    if t.shape != e.shape:
        raise ValueError(f"{name}: truth shape {t.shape} differs from {e.shape}")
    measure_floor = truth is not None and floor is None
    fast = (
        _scaled_stats(name, e, a, t, measure_floor)
        if all(x.dtype.kind == "f" for x in (e, a, t))
        else None
    )
    if fast is not None:
        stats, worst, scale, floor_err = fast
        error, same_nonfinite = _relative(worst, scale), True
        if measure_floor:
            floor = _relative(floor_err, scale)
    else:
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        t64 = e64 if truth is None else np.asarray(truth, np.float64)
        if measure_floor:
            floor = scale_relative_error(e64, t64)
        judged = np.asarray(np.subtract(a64, t64))  # what the rule measures, elementwise
        np.abs(judged, out=judged)
        magnitude = np.abs(t64)
        if math.isfinite(float(judged.sum())):  # then the truth is finite too
            scale = float(magnitude.max())
            error = _relative(float(judged.max()), scale)
        else:  # NaN/inf somewhere: the one definition, over entries finite in both
            judged = np.nan_to_num(judged, nan=np.inf)
            finite_t = magnitude[np.isfinite(magnitude)]
            scale = float(finite_t.max()) if finite_t.size else 0.0
            error = scale_relative_error(a64, t64)
        stats = _describe(name, e64, a64, judged, str(a.dtype))
        same_nonfinite = stats.pop("same_nonfinite")
    floor_used = max(floor_min, floor if floor is not None else (nominal or floor_min))
    bound = k * floor_used
    return ArrayComparison(
        **stats,
        atol=bound * scale,
        rtol=0.0,
        passed=same_nonfinite and error <= bound,
        needed_atol=error * scale,
        detail="" if same_nonfinite else "NaN/inf in different places",
        rule=rule,
        error=error,
        floor=floor,
        floor_used=floor_used,
        bound=bound,
        usage=error / bound if same_nonfinite else None,
    )


Bounds = Mapping[str, float]


def _named_bounds(value: float | Bounds | None) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {"*": float(value)}


@dataclass(frozen=True)
class TolerancePolicy:
    """The one rule every comparison in the package uses (see the module docstring).

    ``atol``/``rtol`` (one value, or per output name with ``"*"`` for every other output) give
    the outputs they cover a fixed elementwise bound instead of the measured-noise rule; the
    other half of the bound comes from :data:`DTYPE_TOLERANCE`. ``tolerance`` does so for every
    output. ``k`` is the rule's K.
    """

    atol: float | Bounds | None = None
    rtol: float | Bounds | None = None
    tolerance: Tolerance | None = None
    k: float = K

    def overridden(self) -> set[str]:
        """Output names with a fixed bound ("*": every output)."""
        if self.tolerance is not None:
            return {"*"}
        return set(_named_bounds(self.atol)) | set(_named_bounds(self.rtol))

    def fixed_tolerance(
        self, output: str, dtype: Any, provider: str = CPU
    ) -> Tolerance | None:
        """The fixed elementwise bound for ``output``, or None when the measured rule applies."""
        atol, rtol = _named_bounds(self.atol), _named_bounds(self.rtol)
        a = atol.get(output, atol.get("*"))
        r = rtol.get(output, rtol.get("*"))
        if self.tolerance is None and a is None and r is None:
            return None
        base = self.tolerance or default_tolerance(dtype, provider)
        return Tolerance(base.atol if a is None else a, base.rtol if r is None else r)

    def floor_min(self, dtype: Any, provider: str = CPU) -> float:
        """f_min for an output dtype on a provider (CUDA: at least :data:`CUDA_FLOOR`)."""
        name = np.dtype(dtype).name
        low = FLOOR_MIN.get(name, FLOOR_MIN["float32"])
        return max(low, CUDA_FLOOR) if provider == CUDA else low

    def nominal_floor(self, dtype: Any, provider: str = CPU) -> float:
        """The floor used when no float64 reference exists."""
        name = np.dtype(dtype).name
        nominal = NOMINAL_FLOOR.get(name, NOMINAL_FLOOR["float32"])
        return max(nominal, CUDA_FLOOR) if provider == CUDA else nominal

    def compare(
        self,
        name: str,
        expected: np.ndarray,
        actual: np.ndarray,
        provider: str = CPU,
        *,
        truth: np.ndarray | None = None,
        floor: float | None = None,
        output: str | None = None,
    ) -> ArrayComparison:
        """``actual`` against ``expected`` (the reference as it ran) under the rule that applies
        to ``output`` (default ``name``): see the module docstring."""
        actual = np.asarray(actual)
        dtype = actual.dtype
        if dtype.kind not in "fc":
            return compare_arrays(name, expected, actual, EXACT, rule=EXACT_RULE)
        fixed = self.fixed_tolerance(output or name, dtype, provider)
        if fixed is not None:
            usable = truth if truth is not None and np.shape(truth) == actual.shape else None
            return compare_arrays(name, expected, actual, fixed, truth=usable)
        return compare_scaled(
            name, expected, actual, floor_min=self.floor_min(dtype, provider), k=self.k,
            truth=truth, floor=floor, nominal=self.nominal_floor(dtype, provider),
        )  # fmt: skip

    def describe(self) -> str:
        """The rule in words, for reports."""
        rule = (
            f"e = max|candidate − float64 truth| / max|truth| ≤ {self.k:g}·max(f, f_min), "
            "f = the float32 reference's own error (nominal floor where no float64 reference "
            "exists)"
        )
        fixed = self.overridden()
        if not fixed:
            return rule
        if "*" in fixed and len(fixed) == 1:
            return "fixed elementwise bound: " + str(self.fixed_tolerance("*", np.float32))
        return rule + "; fixed elementwise bound for " + ", ".join(sorted(fixed))


DEFAULT_POLICY = TolerancePolicy()


def pooled_floors(
    references: Iterable[Mapping[str, np.ndarray]], truths: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Per output, the largest float32 floor (reference against truth) over every input set."""
    floors: dict[str, float] = {}
    for ref, truth in zip(references, truths, strict=True):
        for name, value in ref.items():
            t = truth.get(name)
            if (
                t is None
                or np.shape(t) != np.shape(value)
                or np.asarray(value).dtype.kind != "f"
            ):
                continue
            floors[name] = max(floors.get(name, 0.0), scale_relative_error(value, t))
    return floors


@dataclass(frozen=True)
class Check:
    """One output compared once: what against what, on which provider and inputs."""

    kind: str
    provider: str
    inputs: str
    comparison: ArrayComparison
    batch_size: int | None = None
    input_shapes: str = ""

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
            "input_shapes": self.input_shapes,
            **self.comparison.to_dict(),
        }


def failed_check(
    kind: str, provider: str, inputs: str, what: str, exc: BaseException | str,
    batch_size: int | None = None, name: str = "-",
) -> Check:  # fmt: skip
    """A check whose run failed: no statistics, the cause in ``detail``."""
    message = exc if isinstance(exc, str) else first_line(exc, 200)
    comp = _unmeasured(name, (), "-", f"{what} failed: {message}")
    return Check(kind, provider, inputs, comp, batch_size)


@dataclass(frozen=True)
class OutputPairing:
    """Which expected output goes with which actual output, and how they were matched."""

    pairs: tuple[tuple[str, str], ...]
    by: str  # "name" | "position"

    def describe(self, what: str = "outputs") -> str:
        if self.by == "name":
            return f"{what} matched by name"
        pairs = ", ".join(f"{e} ↔ {a}" for e, a in self.pairs if e != a)
        return f"{what} matched by position (names differ: {pairs})"


def pair_outputs(expected: Sequence[str], actual: Sequence[str]) -> OutputPairing | None:
    """Match by name when the names agree (order free), else by position; None on a count
    mismatch."""
    if set(expected) == set(actual) and len(expected) == len(actual):
        return OutputPairing(tuple((n, n) for n in expected), "name")
    if len(expected) != len(actual):
        return None
    return OutputPairing(tuple(zip(expected, actual, strict=True)), "position")


def _dims_agree(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(
        not (isinstance(x, int) and isinstance(y, int)) or x == y
        for x, y in zip(a, b, strict=True)
    )


def pair_inputs(
    reference: Sequence[InputSpec], candidate: Sequence[InputSpec]
) -> OutputPairing | str:
    """Reference input for each candidate input: by name when the names agree, else by
    position when count, ranks, static dims and dtypes agree. The reason when neither works."""
    ref_names = [s.name for s in reference]
    names = [s.name for s in candidate]
    if sorted(ref_names) == sorted(names):
        return OutputPairing(tuple((n, n) for n in names), "name")
    if len(reference) != len(candidate):
        return f"{len(reference)} input(s) vs {len(candidate)}"
    for r, c in zip(reference, candidate, strict=True):
        if r.dtype != c.dtype or not _dims_agree(r.shape, c.shape):
            return (
                f"inputs differ by name and at position {names.index(c.name)} "
                f"({r.name}: {r.dtype} {list(r.shape)} vs {c.name}: {c.dtype} {list(c.shape)})"
            )
    return OutputPairing(tuple(zip(ref_names, names, strict=True)), "position")


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
    truth: Mapping[str, np.ndarray] | None = None,
    floors: Mapping[str, float] | None = None,
    input_shapes: str = "",
) -> list[Check]:
    """One check per output pair (see :func:`pair_outputs`); a count mismatch is one failed
    check. ``truth`` and ``floors`` are keyed by the expected names."""
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
            policy.compare(
                f"{a_name}{suffix}",
                expected[e_name],
                actual[a_name],
                provider,
                truth=None if truth is None else truth.get(e_name),
                floor=None if floors is None else floors.get(e_name),
                output=a_name,
            ),
            batch_size,
            input_shapes,
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
    truth: Float64Graph | None = None,
    specs: Sequence[InputSpec] | None = None,
    axes: Mapping[str, int] | None = None,
    extra: Sequence[FeedSet] = (),
) -> tuple[Check, ...]:
    """ONNX vs ONNX on the same seeded stress inputs, both as written (optimizations off).

    Ground truth is ``truth`` (a float64 copy of the reference graph, made here from a
    ModelProto reference when not given); without one the nominal rule applies. ``specs`` (the
    inputs as :meth:`~normdeploy.shapes.InputPlan.specs` sizes them) and ``axes`` (batch axis
    per input) default to the reference's declared inputs; ``extra`` feed sets (a user's
    ``.npz``) run as well. Checks are named ``output@bN`` (``output@LABEL`` for extra sets);
    static batch dims keep their size, so duplicates drop.
    """
    ref_runner = OrtRunner(reference, provider)
    cand_runner = OrtRunner(candidate, provider)
    if specs is None:
        specs = graph_input_specs(_header_proto(reference))
    if truth is None and isinstance(reference, onnx.ModelProto):
        truth = Float64Graph.of(reference)
    feed_sets, _ = stress_feed_sets(
        specs, batch_sizes, 1, None, axes if axes is not None else batch_axes(specs)
    )
    runs = []
    for fs in [*feed_sets, *extra]:
        ref = ref_runner.infer(fs.feeds)
        exact = truth.infer(fs.feeds) if truth is not None and truth.available else None
        runs.append((fs, ref, cand_runner.infer(fs.feeds), exact))
    truths = [r[3] for r in runs if r[3] is not None]
    floors = pooled_floors([r[1] for r in runs], truths) if len(truths) == len(runs) else None
    checks: list[Check] = []
    for fs, ref, cand, exact in runs:
        checks += compare_outputs(
            ref, cand, kind=GRAPH_VS_ORIGINAL, provider=provider, inputs=fs.label,
            policy=policy, batch_size=fs.batch_size,
            suffix=f"@b{fs.batch_size}" if fs.batch_size else f"@{fs.label}",
            truth=exact if floors is not None else None, floors=floors,
            input_shapes=fs.shapes(),
        )  # fmt: skip
    return tuple(checks)


def _header_proto(model: Any) -> onnx.ModelProto:
    """The model's proto, without reading external data (only its inputs are needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load_model(str(model), load_external_data=False)
