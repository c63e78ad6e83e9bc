"""verify: prove an ONNX graph computes what the PyTorch model computes in eval mode.

Runners produce outputs, the comparator turns two output sets into :class:`Check` records, and
:class:`VerifyResult` renders them as a table, JSON or Markdown. Both runners share
``infer(feeds) -> {name: array}``; the PyTorch runner works on a deep copy in eval mode under
``no_grad``, so the caller's module keeps its mode and its BatchNorm statistics.

Checks, per output:

- ``reference``: the graph on every provider against the reference: PyTorch eval on CPU, or a
  reference ONNX graph on the same provider (``verify a.onnx b.onnx``);
- ``cuda-vs-cpu`` (CUDA present): the graph on CUDA against the graph on CPU;
- ``torch-cuda`` (CUDA present and PyTorch built with CUDA): the graph on CUDA against PyTorch
  eval on CUDA;
- ``batch-independence``: every sample run alone against the same sample inside the largest
  batch. A graph that normalizes with batch statistics (BatchNorm baked in training mode) fails.

Inputs are seeded stress inputs (signed, outliers, a constant channel; :func:`runtime.make_feeds`)
at every batch size and seed, plus user feeds from an ``.npz``. PyTorch and ONNX outputs are
matched by position (tensors, tuples and dicts are flattened in order). Tolerances default per
output dtype and provider (:func:`compare.default_tolerance`: fp32 1e-4/1e-4, CUDA fp32
2e-3/2e-3 for TF32 and cuDNN algorithm choice, fp16 1e-2/1e-2); ``atol``/``rtol`` override.
The graph is also read for BatchNormalization with ``training_mode=1`` and Dropout that is active,
and a module handed over in train mode is reported with how far its train output is from eval.
On a mismatch :mod:`normdeploy.bisect` names the module where the error jumps.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from normdeploy.compare import ArrayComparison, Tolerance, compare_arrays, default_tolerance
from normdeploy.errors import (
    InputFileError,
    InvalidArgumentError,
    InvalidModelError,
    VerificationFailed,
)
from normdeploy.io import check_input_file, read_onnx
from normdeploy.modes import TrainModeReport, training_report
from normdeploy.report import fmt_num, markdown_table, text_table
from normdeploy.runtime import (
    CPU,
    CUDA,
    InputSpec,
    OrtRunner,
    graph_input_specs,
    make_feeds,
    provider_alias,
    resolve_providers,
)

logger = logging.getLogger(__name__)

REFERENCE = "reference"
CUDA_VS_CPU = "cuda-vs-cpu"
TORCH_CUDA = "torch-cuda"
BATCH_INDEPENDENCE = "batch-independence"
CHECK_KINDS = (REFERENCE, CUDA_VS_CPU, TORCH_CUDA, BATCH_INDEPENDENCE)
ERROR, WARNING = "error", "warning"


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Check:
    """One output compared once: what against what, where, on which inputs."""

    kind: str
    provider: str
    inputs: str
    comparison: ArrayComparison

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "provider": self.provider,
            "inputs": self.inputs,
            **self.comparison.to_dict(),
        }


@dataclass(frozen=True)
class GraphFlag:
    """Something in the graph that contradicts eval semantics (error) or deserves a look."""

    severity: str
    op: str
    node: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "op": self.op,
            "node": self.node,
            "message": self.message,
        }


@dataclass(frozen=True)
class VerifyResult:
    """Everything verify compared and found; truthy when every check passed and no flag is an
    error."""

    reference: str
    reference_kind: str  # "pytorch" or "onnx"
    candidate: str
    providers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    seeds: int
    checks: tuple[Check, ...]
    graph_flags: tuple[GraphFlag, ...] = ()
    train_mode: TrainModeReport | None = None
    bisection: Any = None  # bisect.Bisection
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return (
            bool(self.checks)
            and all(c.passed for c in self.checks)
            and not any(f.severity == ERROR for f in self.graph_flags)
        )

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def worst_abs_error(self) -> float | None:
        """Largest max|Δ| of the checks against the reference (None when there were none)."""
        errs = [c.comparison.max_abs for c in self.checks if c.kind == REFERENCE]
        return max(errs, key=lambda e: math.inf if math.isnan(e) else e) if errs else None

    @property
    def diagnosis(self) -> str | None:
        """One line saying what is wrong, or None when everything passed."""
        if self.passed:
            return None
        parts = [f.message for f in self.graph_flags if f.severity == ERROR]
        kinds = sorted({c.kind for c in self.failures})
        if kinds:
            worst = max(self.failures, key=lambda c: _sort_key(c.comparison.needed_atol))
            parts.append(
                f"{len(self.failures)} check(s) failed ({', '.join(kinds)}); worst "
                f"{worst.comparison.name} on {provider_alias(worst.provider)}: max|Δ| "
                f"{fmt_num(worst.comparison.max_abs)}"
                + (f" ({worst.comparison.detail})" if worst.comparison.detail else "")
            )
        if self.bisection is not None:
            parts.append(self.bisection.summary())
        return "; ".join(parts) or "no checks ran"

    def raise_if_failed(self) -> VerifyResult:
        """Return self when it passed, else raise VerificationFailed carrying this result."""
        if not self.passed:
            raise VerificationFailed(self.diagnosis or "verification failed", self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
            "candidate": self.candidate,
            "providers": list(self.providers),
            "batch_sizes": list(self.batch_sizes),
            "seeds": self.seeds,
            "worst_abs_error": self.worst_abs_error,
            "diagnosis": self.diagnosis,
            "checks": [c.to_dict() for c in self.checks],
            "graph_flags": [f.to_dict() for f in self.graph_flags],
            "train_mode": None if self.train_mode is None else self.train_mode.to_dict(),
            "bisection": None if self.bisection is None else self.bisection.to_dict(),
            "notes": list(self.notes),
        }

    _HEADERS = (
        "check", "provider", "inputs", "output", "max abs", "max rel", "mean abs", "cosine",
        "worst [index] expected → actual", "tolerance", "result",
    )  # fmt: skip

    def _rows(self) -> list[list[str]]:
        rows = []
        for c in self.checks:
            comp = c.comparison
            worst = (
                f"[{','.join(map(str, comp.worst_index))}] "
                f"{fmt_num(comp.expected_at_worst)} → {fmt_num(comp.actual_at_worst)}"
            )
            result = (
                "ok" if comp.passed else "FAIL" + (f": {comp.detail}" if comp.detail else "")
            )
            rows.append([
                c.kind, provider_alias(c.provider), c.inputs, comp.name, fmt_num(comp.max_abs),
                fmt_num(comp.max_rel), fmt_num(comp.mean_abs), f"{comp.cosine:.6f}", worst,
                f"atol={comp.atol:g} rtol={comp.rtol:g}", result,
            ])  # fmt: skip
        return rows

    def _summary_pairs(self) -> list[tuple[str, str]]:
        pairs = [
            ("reference", f"{self.reference} ({self.reference_kind})"),
            ("candidate", self.candidate),
            ("providers", ", ".join(self.providers)),
            ("batch sizes", ", ".join(map(str, self.batch_sizes)) + f"; seeds: {self.seeds}"),
        ]
        if self.train_mode is not None:
            pairs.append(("module mode", self.train_mode.summary("verified against eval")))
        pairs.append(("result", "PASS" if self.passed else "FAIL"))
        if not self.passed:
            pairs.append(("diagnosis", self.diagnosis or ""))
        return pairs

    def to_text(self) -> str:
        lines = [f"{k + ':':13s} {v}" for k, v in self._summary_pairs()]
        lines += ["", text_table(self._HEADERS, self._rows())]
        lines += [f"{f.severity}: {f.node} ({f.op}): {f.message}" for f in self.graph_flags]
        lines += [f"note: {n}" for n in self.notes]
        if self.bisection is not None:
            lines += ["", self.bisection.to_text()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"## Verification: {'PASS' if self.passed else 'FAIL'}", ""]
        out += [f"- **{k}**: {v}" for k, v in self._summary_pairs()]
        out += [f"- note: {n}" for n in self.notes]
        out += ["", markdown_table(self._HEADERS, self._rows()), ""]
        if self.graph_flags:
            out += ["### Graph flags", ""]
            out += [
                f"- **{f.severity}** `{f.node}` ({f.op}): {f.message}"
                for f in self.graph_flags
            ]
            out.append("")
        if self.bisection is not None:
            out += [self.bisection.to_markdown(), ""]
        return "\n".join(out)


def _sort_key(x: float) -> float:
    return math.inf if math.isnan(x) else x


# ------------------------------------------------------------------------------ runners


def flatten_outputs(value: Any) -> list[Any]:
    """Tensors of a (nested) model output in order: tensor, tuple/list, dict values."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    return []


def _module_float_dtype(module: Any) -> Any:
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


@dataclass
class TorchRunner:
    """Runs a deep copy of ``module`` in eval mode, no_grad, on ``device``: ``infer(feeds)``.

    Inputs are taken from ``feeds`` in ``input_names`` order; floating inputs are cast to the
    module's parameter dtype. Outputs are named by position with ``output_names``.
    """

    module: Any
    input_names: Sequence[str]
    output_names: Sequence[str] | None = None
    device: str = "cpu"
    _model: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._model = copy.deepcopy(self.module).eval().to(self.device)

    def args(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        """The positional torch arguments for ``feeds``."""
        import torch

        dtype = _module_float_dtype(self._model)
        out = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out.append(t.to(self.device))
        return out

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            result = self._model(*self.args(feeds))
        tensors = flatten_outputs(result)
        arrays = [
            (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
            for t in tensors
        ]
        names = list(self.output_names or [f"output_{i}" for i in range(len(arrays))])
        if len(names) != len(arrays):
            raise InvalidArgumentError(
                f"the PyTorch model returns {len(arrays)} tensor(s) but the ONNX graph has "
                f"{len(names)} output(s) ({', '.join(names)}); are these the same model?"
            )
        return dict(zip(names, arrays, strict=True))


# ------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class FeedSet:
    """One set of graph inputs: a label for reports and the batch size (None: user feeds)."""

    label: str
    batch_size: int | None
    feeds: dict[str, np.ndarray]


def load_feeds(
    source: str | os.PathLike[str] | Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> tuple[str, dict[str, np.ndarray]]:
    """User feeds from an .npz file (or a mapping), checked against the graph inputs."""
    if isinstance(source, Mapping):
        label, what = "user feeds", "inputs"
        raw = {str(k): np.asarray(v) for k, v in source.items()}
    else:
        path = check_input_file(source, "--inputs")
        label, what = path.name, str(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise InputFileError(
                        f"{path}: a single .npy array; --inputs needs an .npz with one array "
                        "per graph input name"
                    )
                raw = {k: data[k] for k in data.files}
        except InputFileError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputFileError(f"{path}: cannot read as .npz ({exc})") from None
    names = [s.name for s in specs]
    missing = [n for n in names if n not in raw]
    extra = sorted(set(raw) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown name(s) {', '.join(extra)}")
        raise InputFileError(f"{what}: {'; '.join(parts)} (graph inputs: {', '.join(names)})")
    feeds = {}
    for spec in specs:
        arr = raw[spec.name]
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != s
            for d, s in zip(spec.shape, arr.shape, strict=True)
        ):
            raise InputFileError(
                f"{what}: '{spec.name}' has shape {tuple(arr.shape)}, the graph expects "
                f"{tuple(spec.shape)}"
            )
        if arr.dtype != spec.dtype:
            if arr.dtype.kind not in "fiub" or (arr.dtype.kind == "f") != (
                spec.dtype.kind == "f"
            ):
                raise InputFileError(
                    f"{what}: '{spec.name}' is {arr.dtype}, the graph expects {spec.dtype}"
                )
            arr = arr.astype(spec.dtype)
        feeds[spec.name] = arr
    return label, feeds


def _dim_values(specs: Sequence[InputSpec], examples: Sequence[Any]) -> dict[str, int]:
    """Sizes of named non-batch dims, read off the model's example inputs."""
    values: dict[str, int] = {}
    for spec, ex in zip(specs, examples, strict=False):
        shape = tuple(getattr(ex, "shape", ()))
        if len(shape) != len(spec.shape):
            continue
        for i, d in enumerate(spec.shape):
            if i > 0 and isinstance(d, str):
                values.setdefault(d, int(shape[i]))
    return values


def _feed_sets(
    specs: Sequence[InputSpec],
    batch_sizes: Sequence[int],
    seeds: int,
    dim_values: Mapping[str, int],
) -> tuple[list[FeedSet], list[str]]:
    sets, notes, seen = [], [], set()
    for batch in batch_sizes:
        for seed in range(seeds):
            feeds = make_feeds(specs, batch, seed, dim_values)
            key = (seed, tuple((k, v.shape) for k, v in feeds.items()))
            if key in seen:
                continue
            seen.add(key)
            # A static batch dim keeps its size: report the batch that actually ran.
            ran = next((v.shape[0] for v in feeds.values() if v.ndim), batch)
            sets.append(FeedSet(f"b{ran}/seed{seed}", int(ran), feeds))
    fixed = [
        s.name for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0
    ]
    if fixed:
        ran = sorted({f.batch_size for f in sets if f.batch_size})
        notes.append(
            f"input(s) {', '.join(fixed)} have a static batch dimension: ran batch "
            f"{', '.join(map(str, ran))} only"
        )
    return sets, notes


# ------------------------------------------------------------------------------- checks


def graph_flags(model: onnx.ModelProto) -> list[GraphFlag]:
    """BatchNormalization in training mode and Dropout, anywhere in the model."""
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    consts[node.output[0]] = a.t
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    flags = []
    for node in nodes:
        label = node.name or "<unnamed>"
        if node.op_type == "BatchNormalization":
            mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
            if mode or len([o for o in node.output if o]) > 1:
                flags.append(GraphFlag(
                    ERROR, node.op_type, label,
                    "BatchNormalization in training mode (training_mode=1 or running-stat "
                    "outputs): it normalizes with batch statistics",
                ))  # fmt: skip
        elif node.op_type == "Dropout":
            mode_input = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            if not mode_input:
                flags.append(GraphFlag(
                    WARNING, node.op_type, label,
                    "Dropout without training_mode: an identity at inference, but a "
                    "leftover of a training graph",
                ))  # fmt: skip
            elif mode_input in consts:
                active = bool(onnx.numpy_helper.to_array(consts[mode_input]).any())
                flags.append(GraphFlag(
                    ERROR if active else WARNING, node.op_type, label,
                    "Dropout with training_mode=True: drops activations at random"
                    if active else "Dropout with training_mode=False: an identity",
                ))  # fmt: skip
            else:
                flags.append(GraphFlag(
                    ERROR, node.op_type, label,
                    f"Dropout whose training_mode comes from '{mode_input}' (computed): it "
                    "may drop activations at run time",
                ))  # fmt: skip
    return flags


def _compare_outputs(
    kind: str,
    provider: str,
    label: str,
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    tolerance_for: Any,
) -> list[Check]:
    checks = []
    for e, (name, a) in zip(expected.values(), actual.items(), strict=True):
        comp = compare_arrays(name, e, a, tolerance_for(a.dtype, provider))
        checks.append(Check(kind, provider, label, comp))
    return checks


def _failed_run(kind: str, provider: str, label: str, what: str, exc: Exception) -> Check:
    nan = float("nan")
    message = (
        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    )
    comp = ArrayComparison(
        "-", (), "-", nan, nan, nan, nan, (), nan, nan, nan, nan, False, nan,
        detail=f"{what} failed: {message}",
    )  # fmt: skip
    return Check(kind, provider, label, comp)


def _batch_independence(
    runner: OrtRunner,
    fs: FeedSet,
    batched: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    tolerance_for: Any,
) -> tuple[list[Check], list[str]]:
    """Each sample alone against the same sample inside the batch, per output."""
    batch = fs.batch_size or 0
    sliced = [s.name for s in specs if s.shape and not isinstance(s.shape[0], int)]
    if not sliced:
        return [], ["batch independence not checked: no input has a symbolic batch dimension"]
    outputs = [n for n, v in batched.items() if v.ndim and v.shape[0] == batch]
    notes = []
    skipped = [n for n in batched if n not in outputs]
    if skipped:
        notes.append(
            f"batch independence: output(s) {', '.join(skipped)} have no batch dimension"
        )
    alone: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    try:
        for i in range(batch):
            feeds = {k: v[i : i + 1] if k in sliced else v for k, v in fs.feeds.items()}
            out = runner.infer(feeds)
            for n in outputs:
                alone[n].append(out[n])
    except Exception as exc:
        return [
            _failed_run(BATCH_INDEPENDENCE, runner.provider, fs.label, "batch 1 run", exc)
        ], notes
    checks = [
        Check(
            BATCH_INDEPENDENCE,
            runner.provider,
            f"{fs.label} vs 1×{batch}",
            compare_arrays(
                n,
                batched[n],
                np.concatenate(alone[n]),
                tolerance_for(batched[n].dtype, runner.provider),
            ),
        )
        for n in outputs
    ]
    return checks, notes


# ------------------------------------------------------------------------------- verify


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__


def _is_onnx_reference(reference: Any) -> bool:
    if isinstance(reference, (onnx.ModelProto, bytes)):
        return True
    if isinstance(reference, os.PathLike):
        return True
    return isinstance(reference, str) and reference.lower().endswith(".onnx")


def _load_model(model: Any, what: str) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, f"<{what} ModelProto>"
    if isinstance(model, bytes):
        try:
            return onnx.load_from_string(model), f"<{what} bytes>"
        except Exception as exc:
            raise InvalidModelError(f"{what}: cannot parse bytes as ONNX ({exc})") from None
    if isinstance(model, (str, os.PathLike)):
        return read_onnx(model).model, str(model)
    raise InvalidArgumentError(
        f"{what}: expected an ONNX path, ModelProto or bytes, got {type(model).__name__}"
    )


def _resolve_reference(
    reference: Any, weights: Any, input_shapes: Any
) -> tuple[Any, tuple[Any, ...], str]:
    """(module, example inputs, label) for a module, ResolvedModel or MODEL spec."""
    import torch

    from normdeploy.modelspec import ResolvedModel, resolve_model

    if isinstance(reference, str):
        reference = resolve_model(reference, weights=weights, input_shapes=input_shapes)
    if isinstance(reference, ResolvedModel):
        return reference.module, tuple(reference.example_inputs), reference.name
    if isinstance(reference, torch.nn.Module):
        return reference, (), type(reference).__name__
    raise InvalidArgumentError(
        "reference: expected a torch.nn.Module, a MODEL name/spec, or an ONNX model, got "
        f"{type(reference).__name__}"
    )


def _session(
    model: onnx.ModelProto, provider: str, label: str, explicit: bool
) -> OrtRunner | None:
    runner = OrtRunner(model, provider)
    try:
        used = runner.providers_used
    except Exception as exc:
        raise InvalidModelError(
            f"{label}: onnxruntime cannot load it: {_first_line(exc)}"
        ) from None
    if provider not in used:
        if explicit:
            raise InvalidArgumentError(
                f"--providers: onnxruntime fell back from {provider} to {', '.join(used)}"
            )
        return None
    return runner


def _validate(batch_sizes: Sequence[int], seeds: int, atol: Any, rtol: Any) -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise InvalidArgumentError(
            f"--batch-sizes: {list(sizes)} must be positive integers, e.g. 1,3"
        )
    if not isinstance(seeds, int) or seeds < 1:
        raise InvalidArgumentError(f"--seeds: {seeds} must be a positive integer")
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (
            isinstance(value, (int, float)) and 0 <= value < math.inf
        ):
            raise InvalidArgumentError(f"{name}: {value} must be a finite number >= 0")
    return tuple(dict.fromkeys(sizes))


def _tolerance_rule(
    tolerance: Tolerance | None, atol: float | None, rtol: float | None
) -> Any:
    def rule(dtype: Any, provider: str) -> Tolerance:
        base = tolerance or default_tolerance(dtype, provider)
        return Tolerance(
            base.atol if atol is None else float(atol),
            base.rtol if rtol is None else float(rtol),
        )

    return rule


def verify(
    reference: Any,
    onnx_model: Any,
    *,
    providers: Sequence[str] | str | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    seeds: int = 1,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    bisect: bool = True,
    weights: str | os.PathLike[str] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
) -> VerifyResult:
    """Compare ``onnx_model`` with ``reference`` on every provider; see the module docstring.

    ``reference`` is an ``nn.Module``, a ``ResolvedModel``, a MODEL spec string, or an ONNX
    path/ModelProto. The result is falsy on any mismatch; it never raises for one.
    """
    sizes = _validate(batch_sizes, seeds, atol, rtol)
    tolerance_for = _tolerance_rule(tolerance, atol, rtol)
    candidate, cand_label = _load_model(onnx_model, "ONNX model")
    onnx_ref = _is_onnx_reference(reference)
    if onnx_ref:
        ref_model, ref_label = _load_model(reference, "reference ONNX model")
        module, examples = None, ()
    else:
        module, examples, ref_label = _resolve_reference(reference, weights, input_shapes)

    choice = resolve_providers(providers)
    notes = list(choice.notes)
    explicit = providers is not None and providers != "auto"
    runners: dict[str, OrtRunner] = {}
    ref_runners: dict[str, OrtRunner] = {}
    for provider in choice.providers:
        runner = _session(candidate, provider, cand_label, explicit)
        if runner is None:
            notes.append(f"{provider} was requested but onnxruntime fell back; not used")
            continue
        runners[provider] = runner
        if onnx_ref:
            ref_runner = _session(ref_model, provider, ref_label, explicit)
            if ref_runner is not None:
                ref_runners[provider] = ref_runner
    if not runners:
        raise InvalidArgumentError("--providers: none of the requested providers can run it")

    specs = graph_input_specs(candidate)
    input_names = [s.name for s in specs]
    if onnx_ref:
        ref_names = [s.name for s in graph_input_specs(ref_model)]
        if sorted(ref_names) != sorted(input_names):
            raise InvalidArgumentError(
                f"{ref_label} and {cand_label} have different inputs "
                f"({', '.join(ref_names)} vs {', '.join(input_names)})"
            )
    feed_sets, feed_notes = _feed_sets(specs, sizes, seeds, _dim_values(specs, examples))
    notes += feed_notes
    if inputs is not None:
        label, user = load_feeds(inputs, specs)
        feed_sets.append(FeedSet(label, None, user))

    output_names = runners[next(iter(runners))].output_names
    torch_cpu = torch_cuda = None
    if module is not None:
        torch_cpu = TorchRunner(module, input_names, output_names)
        if CUDA in runners:
            import torch

            if torch.cuda.is_available():
                torch_cuda = TorchRunner(module, input_names, output_names, device="cuda")
            else:
                notes.append("PyTorch has no CUDA here: PyTorch-on-CUDA comparison skipped")

    checks: list[Check] = []
    ran_sizes: list[int] = []
    for fs in feed_sets:
        if fs.batch_size is not None:
            ran_sizes.append(fs.batch_size)
        expected_cpu = None
        if torch_cpu is not None:
            try:
                expected_cpu = torch_cpu.infer(fs.feeds)
            except InvalidArgumentError:
                raise
            except Exception as exc:
                shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in fs.feeds.items())
                raise InvalidArgumentError(
                    f"{ref_label}: the PyTorch model fails on the graph's inputs ({shapes}): "
                    f"{type(exc).__name__}: {_first_line(exc)}"
                ) from None
        actual_by_provider: dict[str, dict[str, np.ndarray]] = {}
        for provider, runner in runners.items():
            try:
                actual = runner.infer(fs.feeds)
            except Exception as exc:
                checks.append(
                    _failed_run(REFERENCE, provider, fs.label, "onnxruntime run", exc)
                )
                continue
            actual_by_provider[provider] = actual
            if expected_cpu is not None:
                expected = expected_cpu
            elif provider in ref_runners:
                try:
                    expected = ref_runners[provider].infer(fs.feeds)
                except Exception as exc:
                    checks.append(
                        _failed_run(REFERENCE, provider, fs.label, "reference run", exc)
                    )
                    continue
            else:
                continue
            if len(expected) != len(actual):
                raise InvalidArgumentError(
                    f"{ref_label} has {len(expected)} output(s), {cand_label} has "
                    f"{len(actual)}; are these the same model?"
                )
            checks += _compare_outputs(
                REFERENCE, provider, fs.label, expected, actual, tolerance_for
            )
        if CUDA in actual_by_provider and CPU in actual_by_provider:
            checks += _compare_outputs(
                CUDA_VS_CPU, CUDA, fs.label, actual_by_provider[CPU],
                actual_by_provider[CUDA], tolerance_for,
            )  # fmt: skip
        if torch_cuda is not None and CUDA in actual_by_provider:
            checks += _compare_outputs(
                TORCH_CUDA, CUDA, fs.label, torch_cuda.infer(fs.feeds),
                actual_by_provider[CUDA], tolerance_for,
            )  # fmt: skip

    largest = max(
        (fs for fs in feed_sets if fs.batch_size and fs.label.endswith("/seed0")),
        key=lambda fs: fs.batch_size or 0,
        default=None,
    )
    if largest is not None and (largest.batch_size or 0) > 1:
        for runner in runners.values():
            try:
                batched = runner.infer(largest.feeds)
            except Exception:
                continue  # already recorded as a failed reference check
            bi_checks, bi_notes = _batch_independence(
                runner, largest, batched, specs, tolerance_for,
            )  # fmt: skip
            checks += bi_checks
            notes += [n for n in bi_notes if n not in notes]
    else:
        notes.append("batch independence not checked: no batch size > 1 ran")

    train_mode = None
    if module is not None:
        args = torch_cpu.args(largest.feeds if largest else feed_sets[0].feeds)  # type: ignore[union-attr]
        train_mode = training_report(module, args)

    flags = tuple(graph_flags(candidate))
    result = VerifyResult(
        reference=ref_label,
        reference_kind="onnx" if onnx_ref else "pytorch",
        candidate=cand_label,
        providers=tuple(runners),
        batch_sizes=tuple(dict.fromkeys(ran_sizes)),
        seeds=seeds,
        checks=tuple(checks),
        graph_flags=flags,
        train_mode=train_mode,
        notes=tuple(notes),
    )
    if result.passed or not bisect:
        return result
    bisection = _bisect(
        result, candidate, module, ref_model if onnx_ref else None, feed_sets, torch_cpu,
        tolerance if (atol is None and rtol is None) else tolerance_for(np.float32, CPU),
    )  # fmt: skip
    return VerifyResult(**{**result.__dict__, "bisection": bisection})


def _bisect(
    result: VerifyResult,
    candidate: onnx.ModelProto,
    module: Any,
    ref_model: onnx.ModelProto | None,
    feed_sets: Sequence[FeedSet],
    torch_cpu: TorchRunner | None,
    tolerance: Tolerance | None,
) -> Any:
    """Bisect on the inputs and provider of the worst failing check (CPU if none failed)."""
    from normdeploy import bisect as bisection

    failing = [c for c in result.failures if c.kind in (REFERENCE, BATCH_INDEPENDENCE)]
    worst = max(failing, key=lambda c: _sort_key(c.comparison.needed_atol), default=None)
    provider = worst.provider if worst is not None else CPU
    label = worst.inputs.split(" vs ")[0] if worst is not None else feed_sets[0].label
    fs = next((f for f in feed_sets if f.label == label), feed_sets[0])
    try:
        if module is not None and torch_cpu is not None:
            return bisection.bisect_module(
                candidate, module, fs.feeds, torch_cpu.args(fs.feeds), provider=provider,
                inputs_label=fs.label, tolerance=tolerance,
            )  # fmt: skip
        if ref_model is not None:
            return bisection.bisect_onnx(
                candidate, ref_model, fs.feeds, provider=provider, inputs_label=fs.label,
                tolerance=tolerance,
            )  # fmt: skip
    except Exception:  # the verdict stands without a bisection; keep the cause in the log
        logger.exception("bisection failed")
    return None
