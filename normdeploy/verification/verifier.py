"""verify: prove an ONNX graph computes what the PyTorch model computes in eval mode.

Runners produce outputs (:mod:`~normdeploy.verification.runners`), the one comparison turns two
output sets into :class:`~normdeploy.verification.compare.Check` records under the one tolerance
policy, and :class:`~normdeploy.verification.results.VerifyResult` renders them. The reference is
a PyTorch module (ground truth: its float64 copy), another ONNX graph (ground truth: a float64
copy of it where onnxruntime can run one, else the nominal floor), or a run saved with
``save_run`` (its inputs, outputs, ground truth and floors; no PyTorch needed). Checks, per
output:

- ``reference``: the graph on every provider against the reference, e against the float64
  truth, with the floor f pooled over every input set that ran;
- ``cuda-vs-cpu`` (CUDA present): the graph on CUDA against the graph on CPU;
- ``torch-cuda`` (CUDA present and PyTorch built with CUDA): the graph on CUDA against PyTorch
  eval on CUDA;
- ``batch-independence``: the leading samples of the largest batch against the same samples run
  as a smaller batch (the smaller batch sizes are those samples, so this costs no extra run
  unless only one batch size was asked for). Checked only where the reference itself is batch
  independent: a B×B output, a batch on another axis, or batch statistics by design in the
  reference skip the check with a note. The batch axis is the graph's dim named ``batch`` (axis
  0 otherwise) unless ``batch_axis`` says another.

Inputs are seeded stress inputs (:mod:`~normdeploy.verification.feeds`) at every batch size and
seed, shaped as the candidate declares its inputs (:mod:`normdeploy.shapes`: ``input_shapes``
and the reference's example inputs size its symbolic dims, sizes at which the graph runs are
probed for the rest), plus user feeds from an ``.npz``. Outputs are matched by name when the names agree, else by
position; an ONNX reference's inputs likewise (by position when only the names differ); the
result says which. Requested ``input_shapes`` the graph cannot take are a user error. The graph
is linted for eval semantics (:mod:`normdeploy.census.lints`), a module handed over in train mode
is reported with how far its train output is from eval, and on a mismatch
:mod:`~normdeploy.verification.bisection` names the module where the error jumps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.arguments import (
    batch_sizes_arg,
    check_bool,
    feeds_arg,
    optional_path,
    providers_arg,
)
from normdeploy.census.lints import model_eval_mode_lints
from normdeploy.errors import InvalidArgumentError, InvalidModelError, first_line
from normdeploy.io import check_output_path, read_onnx
from normdeploy.modes import training_report
from normdeploy.onnx_graph import InputSpec, graph_input_specs, value_shape
from normdeploy.shapes import (
    BATCH_DIM_NAME,
    BatchAxis,
    InputPlan,
    ShapeRequest,
    batch_axes,
    check_input_shapes,
    input_shapes_arg,
    plan_inputs,
)
from normdeploy.verification import bisection
from normdeploy.verification.compare import (
    BATCH_INDEPENDENCE,
    CUDA_VS_CPU,
    REFERENCE,
    TORCH_CUDA,
    Check,
    OutputPairing,
    Tolerance,
    TolerancePolicy,
    compare_outputs,
    failed_check,
    pair_inputs,
    pair_outputs,
    pooled_floors,
)
from normdeploy.verification.feeds import (
    FeedSet,
    leading_samples,
    load_feeds,
    size_free_dims,
    stress_feed_sets,
    validate_batch_sizes,
)
from normdeploy.verification.float64 import Float64Graph
from normdeploy.verification.record import (
    ALONE,
    CHECK,
    BatchPlan,
    RecordedRun,
    RecordedSet,
)
from normdeploy.verification.record import save_run as write_run
from normdeploy.verification.results import VerifyResult, worst
from normdeploy.verification.runners import (
    CPU,
    CUDA,
    OrtRunner,
    ReferenceMemo,
    TorchRunner,
    provider_alias,
    resolve_providers,
    torch_args,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


# ------------------------------------------------------------------------------ arguments


def _bound_values(name: str, value: float | Mapping[str, float] | None) -> None:
    values = value.values() if isinstance(value, Mapping) else [value]
    for v in values:
        if v is not None and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
        ):
            raise InvalidArgumentError(f"{name}: {v} must be a finite number >= 0")


def tolerance_policy(
    tolerance: Tolerance | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
) -> TolerancePolicy:
    """The policy for user overrides; InvalidArgumentError for a negative or non-finite bound.

    ``atol``/``rtol`` are one value for every output or ``{output: value}`` (``"*"``: every
    output not named); the outputs they cover get a fixed elementwise bound.
    """
    _bound_values("atol", atol)
    _bound_values("rtol", rtol)
    return TolerancePolicy(atol=atol, rtol=rtol, tolerance=tolerance)


def check_verify_arguments(
    *,
    providers: object,
    batch_sizes: object,
    inputs: object,
    tolerance: object,
    bisect: object,
    weights: object,
    input_shapes: object,
) -> None:
    """Argument types of :func:`verify` (values are checked where they are used)."""
    providers_arg(providers)
    if batch_sizes is not None:
        batch_sizes_arg(batch_sizes)
    feeds_arg(inputs)
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise InvalidArgumentError(
            f"tolerance: expected a normdeploy.verification.Tolerance, got "
            f"{type(tolerance).__name__} (atol=/rtol= take numbers)"
        )
    check_bool(bisect, "bisect")
    optional_path(weights, "weights")
    input_shapes_arg(input_shapes)


def _check_override_names(atol: Any, rtol: Any, outputs: Sequence[str]) -> None:
    """Per-output bounds must name graph outputs: a typo must not silently leave an output on
    the default rule."""
    for what, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, Mapping):
            unknown = sorted(n for n in value if n != "*" and n not in outputs)
            if unknown:
                raise InvalidArgumentError(
                    f"{what}: no output named {', '.join(map(repr, unknown))} "
                    f"(graph outputs: {', '.join(outputs)})"
                )


def _validate_seeds(seeds: int) -> int:
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise InvalidArgumentError(f"seeds: {seeds} must be a positive integer")
    return seeds


def load_model_arg(model: Any, what: str) -> tuple[onnx.ModelProto, str]:
    """An ONNX model given as a path, a ModelProto or bytes, and a label for reports."""
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


def _session_source(model: Any, proto: onnx.ModelProto) -> Any:
    """What onnxruntime loads: the file itself when there is one (its C++ loader reads it
    faster than the parsed proto can be serialized again), else the proto."""
    return str(model) if isinstance(model, (str, os.PathLike)) else proto


def _is_onnx_reference(reference: Any) -> bool:
    if isinstance(reference, (onnx.ModelProto, bytes, os.PathLike)):
        return True
    return isinstance(reference, str) and reference.lower().endswith(".onnx")


def _resolve_module(
    reference: object, weights: str | os.PathLike[str] | None
) -> tuple[torch.nn.Module, tuple[Any, ...], str]:
    """(module, example inputs, label) for a module, ResolvedModel or MODEL spec; a factory
    that returns only a module is fine: the graph's declared inputs size the feeds."""
    import torch

    from normdeploy.modelspec import ResolvedModel, resolve_model

    if isinstance(reference, str):
        reference = resolve_model(reference, weights=weights, need_inputs=False)
    if isinstance(reference, ResolvedModel):
        return reference.module, tuple(reference.example_inputs), reference.name
    if isinstance(reference, torch.nn.Module):
        return reference, (), type(reference).__name__
    raise InvalidArgumentError(
        "reference: expected a torch.nn.Module, a MODEL name/spec, an ONNX model or a saved "
        f"run, got {type(reference).__name__}"
    )


# --------------------------------------------------------------------- the reference side


@dataclass
class _Reference:
    """The reference side: its outputs on each input set, per provider, and its float64 truth."""

    label: str
    kind: str  # "pytorch" | "onnx" | "saved-run"
    output_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    module: torch.nn.Module | None = None
    examples: tuple[Any, ...] = ()
    model: onnx.ModelProto | None = None
    torch32: TorchRunner | None = None
    torch64: TorchRunner | None = None
    torch_cuda: TorchRunner | None = None
    graphs: dict[str, OrtRunner] = field(default_factory=dict)
    graph64: Float64Graph | None = None
    input_pairing: OutputPairing | None = None
    recorded: RecordedRun | None = None
    # A PyTorch reference: its input names, and outputs it already gave on some inputs. Its
    # runners (each a copy of the module) are made when an input set first needs them.
    input_names: list[str] = field(default_factory=list)
    memo: ReferenceMemo | None = None
    _no_float64: bool = False

    def runner32(self) -> TorchRunner | None:
        if self.torch32 is None and self.module is not None:
            self.torch32 = TorchRunner(self.module, self.input_names, self.output_names)
        return self.torch32

    def runner64(self) -> TorchRunner | None:
        import torch

        if self.torch64 is None and self.module is not None and not self._no_float64:
            try:
                self.torch64 = TorchRunner(
                    self.module, self.input_names, self.output_names, dtype=torch.float64
                )
            except Exception as exc:  # e.g. a parameter type that cannot be float64
                self._no_float64 = True
                self.notes.append(
                    f"no float64 copy of the module ({first_line(exc)}): nominal floors"
                )
        return self.torch64

    def _memo(self, fs: FeedSet, float64: bool) -> Outputs | None:
        """The module's outputs on ``fs`` when the memo has them under this graph's names."""
        hit = None if self.memo is None else self.memo.outputs(fs.feeds, float64)
        if hit is None or sorted(hit) != sorted(self.output_names):
            return None
        return {name: hit[name] for name in self.output_names}

    def feeds_for(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The candidate's feeds under the reference's input names."""
        if self.input_pairing is None or self.input_pairing.by == "name":
            return dict(feeds)
        return {r: feeds[c] for r, c in self.input_pairing.pairs}

    def expected(self, fs: FeedSet, provider: str) -> Outputs:
        if self.recorded is not None:
            return _recorded_set(self.recorded, fs.label).expected
        if self.module is not None:
            hit = self._memo(fs, float64=False)
            if hit is not None:
                return hit
            runner = self.runner32()
            assert runner is not None
            try:
                return runner.infer(fs.feeds)
            except InvalidArgumentError:
                raise
            except Exception as exc:
                raise InvalidArgumentError(
                    f"{self.label}: the PyTorch model fails on the graph's inputs "
                    f"({fs.shapes()}): {type(exc).__name__}: {first_line(exc)}"
                ) from None
        return self.graphs[provider].infer(self.feeds_for(fs.feeds))

    def truth(self, fs: FeedSet) -> Outputs | None:
        """Float64 outputs on ``fs``; None (with a note, once) when there are none."""
        if self.recorded is not None:
            return _recorded_set(self.recorded, fs.label).truth
        hit = self._memo(fs, float64=True)
        if hit is not None:
            return hit
        runner = self.runner64()
        if runner is not None:
            try:
                return runner.infer(fs.feeds)
            except Exception as exc:  # a module that cannot run in float64: nominal floors
                self.torch64 = None
                self._no_float64 = True
                self.notes.append(
                    f"the float64 copy of the module fails ({type(exc).__name__}: "
                    f"{first_line(exc, 160)}): nominal floors apply"
                )
                return None
        if self.graph64 is not None and self.graph64.available:
            return self.graph64.infer(self.feeds_for(fs.feeds))
        return None


def _recorded_set(run: RecordedRun, label: str) -> RecordedSet:
    return next(s for s in run.sets if s.feed_set.label == label)


def _open(
    model: Any, provider: str, label: str, explicit: bool, checked: bool = False
) -> OrtRunner | None:
    """A runner on ``provider``; None (or an error when asked for explicitly) on a fallback.
    ``checked``: onnxruntime already loaded this very file on CPU (export's check), so a CPU
    session is made only if a run needs one."""
    if checked and provider == CPU:
        return OrtRunner(model, provider)
    runner = OrtRunner(model, provider).open(label)
    used = runner.providers_used
    if provider in used:
        return runner
    if explicit:
        raise InvalidArgumentError(
            f"providers: onnxruntime fell back from {provider} to {', '.join(used)}"
        )
    return None


def _open_runners(
    source: Any,
    label: str,
    providers: Sequence[str] | str | None,
    notes: list[str],
    checked: bool = False,
) -> dict[str, OrtRunner]:
    choice = resolve_providers(providers)
    notes += choice.notes
    explicit = providers is not None and providers != "auto"
    runners = {}
    for provider in choice.providers:
        runner = _open(source, provider, label, explicit, checked)
        if runner is None:
            notes.append(f"{provider} was requested but onnxruntime fell back; not used")
            continue
        runners[provider] = runner
    if not runners:
        raise InvalidArgumentError("providers: none of the requested providers can run it")
    return runners


def _onnx_reference(
    reference: Any, specs: Sequence[InputSpec], providers: Sequence[str], cand_label: str
) -> _Reference:
    model, label = load_model_arg(reference, "reference ONNX model")
    ref = _Reference(label, "onnx", model=model)
    pairing = pair_inputs(graph_input_specs(model), specs)
    if isinstance(pairing, str):
        raise InvalidArgumentError(
            f"{label} and {cand_label} have different inputs ({pairing})"
        )
    ref.input_pairing = pairing
    if pairing.by == "position":
        ref.notes.append(pairing.describe("inputs"))
    source = _session_source(reference, model)
    for provider in providers:
        runner = _open(source, provider, label, False)
        if runner is not None:
            ref.graphs[provider] = runner
    if not ref.graphs:
        raise InvalidArgumentError(f"providers: none of them can run {label}")
    ref.output_names = next(iter(ref.graphs.values())).output_names
    ref.graph64 = Float64Graph.of(model)
    if not ref.graph64.available:
        ref.notes.append(f"no float64 copy of the reference graph ({ref.graph64.reason})")
    return ref


def _torch_reference(
    reference: Any,
    weights: str | os.PathLike[str] | None,
    input_names: list[str],
    output_names: list[str],
    providers: Sequence[str],
    memo: ReferenceMemo | None = None,
) -> _Reference:
    import torch

    module, examples, label = _resolve_module(reference, weights)
    ref = _Reference(
        label, "pytorch", list(output_names), module=module, examples=examples,
        input_names=list(input_names), memo=memo,
    )  # fmt: skip
    if CUDA in providers:
        if torch.cuda.is_available():
            ref.torch_cuda = TorchRunner(module, input_names, output_names, "cuda")
        else:
            ref.notes.append("PyTorch has no CUDA here: PyTorch-on-CUDA comparison skipped")
    return ref


# ------------------------------------------------------------------- batch independence


def output_batch_axes(model: onnx.ModelProto, batch_axis: BatchAxis | None) -> dict[str, int]:
    """The batch axis of every graph output: its dim named ``batch``, else the axis given for
    every input (an int ``batch_axis``), else 0."""
    default = batch_axis if isinstance(batch_axis, int) else 0
    axes = {}
    for out in model.graph.output:
        shape = value_shape(out) or ()
        axes[out.name] = next((i for i, d in enumerate(shape) if d == BATCH_DIM_NAME), default)
    return axes


def _leading(array: np.ndarray, axis: int, n: int) -> np.ndarray | None:
    if array.ndim <= axis or array.shape[axis] < n:
        return None
    return np.take(array, np.arange(n), axis=axis)


def _plan_batch_check(
    sets: list[FeedSet], specs: Sequence[InputSpec], axes: Mapping[str, int]
) -> tuple[FeedSet | None, FeedSet | None, FeedSet | None]:
    """(batched, alone, extra): the seed-0 set with the largest batch, the set holding its
    leading samples, and that set when it must run for this check alone."""
    seeded = [fs for fs in sets if fs.seed == 0 and fs.batch_size]
    if not seeded:
        return None, None, None
    batched = max(seeded, key=lambda fs: fs.batch_size or 0)
    if (batched.batch_size or 0) < 2:
        return None, None, None
    smaller = [fs for fs in seeded if (fs.batch_size or 0) < (batched.batch_size or 0)]
    if smaller:
        return batched, min(smaller, key=lambda fs: fs.batch_size or 0), None
    feeds = leading_samples(batched.feeds, specs, axes, 1)
    extra = FeedSet(f"b1/seed0 (sample 0 of {batched.label})", 1, feeds, 0)
    return batched, extra, extra


def _coupling(
    batched: Outputs, alone: Outputs, axes: Mapping[str, int], n: int, policy: TolerancePolicy
) -> dict[str, str]:
    """Reference outputs whose leading samples change with the rest of the batch, and why."""
    coupled = {}
    for name, value in alone.items():
        axis = axes.get(name, 0)
        head = _leading(batched[name], axis, n)
        if head is None or head.shape != value.shape:
            shapes = f"{tuple(batched[name].shape)} vs {tuple(value.shape)}"
            coupled[name] = f"its shape does not follow the batch on axis {axis} ({shapes})"
            continue
        if value.dtype.kind not in "fc":
            if not np.array_equal(head, value):
                coupled[name] = "its values change with the rest of the batch"
            continue
        comp = policy.compare(name, value, head)  # nominal rule in the reference's own dtype
        if not comp.passed:
            coupled[name] = (
                f"its first {n} sample(s) change by e={comp.error:.2g} with the rest of the "
                f"batch (axis {axis})"
            )
    return coupled


# ------------------------------------------------------------------------------- the run


@dataclass
class _SetRun:
    """One input set: the reference's outputs per provider, the truth, the candidate's."""

    fs: FeedSet
    role: str
    expected: dict[str, Outputs] = field(default_factory=dict)
    truth: Outputs | None = None
    actual: dict[str, Outputs] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)  # provider → (what, why)


# What onnxruntime already gave for the candidate on a provider and inputs, or None.
RecordedGraph = Callable[[str, FeedSet], "Outputs | None"]


def _recorded_graph(
    memo: ReferenceMemo | None, onnx_model: Any, notes: list[str]
) -> RecordedGraph | None:
    """onnxruntime's outputs the memo holds for the candidate file on inputs verify runs
    (export's check ran the same file, unchanged since, on the same inputs): taken instead of
    a second identical run, and said in the notes. None when the memo never ran this file."""
    if memo is None or not isinstance(onnx_model, (str, os.PathLike)):
        return None
    path = Path(onnx_model)
    if not memo.ran_file(path):
        return None
    said: set[str] = set()

    def recorded(provider: str, fs: FeedSet) -> Outputs | None:
        hit = memo.graph_outputs(path, provider, fs.feeds)
        if hit is not None and provider not in said:
            said.add(provider)
            notes.append(
                f"onnxruntime's outputs on {provider_alias(provider)} for input sets the export "
                "check ran are that check's: the same file, unchanged, on the same inputs"
            )
        return hit

    return recorded


def _run_set(
    fs: FeedSet,
    role: str,
    ref: _Reference,
    runners: Mapping[str, OrtRunner],
    recorded: RecordedGraph | None = None,
) -> _SetRun:
    run = _SetRun(fs, role)
    run.truth = ref.truth(fs)
    for provider, runner in runners.items():
        try:
            hit = None if recorded is None else recorded(provider, fs)
            run.actual[provider] = runner.infer(fs.feeds) if hit is None else hit
        except Exception as exc:
            run.errors[provider] = ("onnxruntime run", first_line(exc, 200))
            continue
        try:
            key = CPU if ref.kind != "onnx" else provider
            if key not in run.expected:
                run.expected[key] = ref.expected(fs, key)
        except InvalidArgumentError:
            raise
        except Exception as exc:
            run.errors[provider] = ("reference run", first_line(exc, 200))
    if not run.expected and ref.kind != "onnx":
        run.expected[CPU] = ref.expected(fs, CPU)
    return run


def _reference_checks(
    run: _SetRun,
    ref: _Reference,
    floors: Mapping[str, float] | None,
    policy: TolerancePolicy,
) -> list[Check]:
    checks: list[Check] = []
    fs = run.fs
    for provider in list(run.actual) + [p for p in run.errors if p not in run.actual]:
        if provider in run.errors:
            what, why = run.errors[provider]
            checks.append(failed_check(REFERENCE, provider, fs.label, what, why))
            continue
        expected = run.expected.get(provider if ref.kind == "onnx" else CPU)
        if expected is None:
            continue
        actual = run.actual[provider]
        if len(expected) != len(actual):
            raise InvalidArgumentError(
                f"{ref.label} has {len(expected)} output(s), the candidate has "
                f"{len(actual)}; are these the same model?"
            )
        checks += compare_outputs(
            expected, actual, kind=REFERENCE, provider=provider, inputs=fs.label,
            policy=policy, batch_size=fs.batch_size, truth=run.truth, floors=floors,
            input_shapes=fs.shapes(),
        )  # fmt: skip
    if CUDA in run.actual and CPU in run.actual:
        checks += compare_outputs(
            run.actual[CPU], run.actual[CUDA], kind=CUDA_VS_CPU, provider=CUDA,
            inputs=fs.label, policy=policy, batch_size=fs.batch_size,
            input_shapes=fs.shapes(),
        )  # fmt: skip
    if ref.torch_cuda is not None and CUDA in run.actual:
        checks += compare_outputs(
            ref.torch_cuda.infer(fs.feeds), run.actual[CUDA], kind=TORCH_CUDA, provider=CUDA,
            inputs=fs.label, policy=policy, batch_size=fs.batch_size,
            input_shapes=fs.shapes(),
        )  # fmt: skip
    return checks


def _recorded_sets(
    run: RecordedRun,
) -> tuple[list[FeedSet], FeedSet | None, FeedSet | None, FeedSet | None]:
    """(checked sets, batched set, alone set, the alone set when it ran only for that check)."""
    sets = [s.feed_set for s in run.sets if s.role == CHECK]
    extra = next((s.feed_set for s in run.sets if s.role == ALONE), None)
    batched = next((f for f in sets if f.label == run.batch.batched), None)
    alone = extra or next((f for f in sets if f.label == run.batch.alone), None)
    return sets, batched, alone, extra


def _plan_with_coupling(
    ref: _Reference,
    batched: _SetRun,
    alone: _SetRun,
    output_axes: dict[str, int],
    pairing: OutputPairing | None,
    policy: TolerancePolicy,
) -> BatchPlan:
    """The batch-independence plan, with the outputs the reference itself couples (judged on
    its float64 truth when there is one; a saved run brings its own)."""
    samples = alone.fs.batch_size or 1
    if ref.recorded is not None:
        coupled = dict(ref.recorded.batch.coupled)
    else:
        ref_axes = {e: output_axes.get(c, 0) for e, c in (pairing.pairs if pairing else ())}
        side_b = batched.truth or batched.expected.get(CPU) or {}
        side_a = alone.truth or alone.expected.get(CPU) or {}
        judge = TolerancePolicy(k=policy.k)  # the reference's own noise, no overrides
        coupled = _coupling(side_b, side_a, ref_axes, samples, judge) if side_a else {}
    return BatchPlan(batched.fs.label, alone.fs.label, samples, output_axes, coupled)


def _batch_checks(
    batched: _SetRun,
    alone: _SetRun,
    plan: BatchPlan,
    pairing: OutputPairing | None,
    floors: Mapping[str, float] | None,
    policy: TolerancePolicy,
) -> list[Check]:
    """The candidate's leading samples in the batch against the same samples run alone."""
    checks: list[Check] = []
    cand_of = dict(pairing.pairs) if pairing is not None else {}
    label = f"{batched.fs.label}[:{plan.samples}] vs {alone.fs.label}"
    for provider, outputs in batched.actual.items():
        if provider not in alone.actual:
            continue
        for ref_name, cand_name in cand_of.items():
            if ref_name in plan.coupled:
                continue
            axis = plan.output_axes.get(cand_name, 0)
            head = _leading(outputs[cand_name], axis, plan.samples)
            single = alone.actual[provider][cand_name]
            if head is None:
                head = outputs[cand_name]
            comp = policy.compare(
                cand_name, single, head, provider,
                floor=None if floors is None else floors.get(ref_name), output=cand_name,
            )  # fmt: skip
            checks.append(
                Check(BATCH_INDEPENDENCE, provider, label, comp, batched.fs.batch_size,
                      batched.fs.shapes())
            )  # fmt: skip
    return checks


def _bisect(
    result: VerifyResult, ref: _Reference, candidate: onnx.ModelProto, sets: Sequence[FeedSet]
) -> bisection.Bisection | None:
    """Bisect on the inputs and provider of the worst failing check (CPU if none failed)."""
    if ref.recorded is not None:
        return None
    culprit = worst([c for c in result.failures if c.kind in (REFERENCE, BATCH_INDEPENDENCE)])
    provider = culprit.provider if culprit is not None else CPU
    label = culprit.inputs.split(" vs ")[0].split("[")[0] if culprit is not None else ""
    fs = next((f for f in sets if f.label == label), sets[0])
    try:
        runner = ref.runner32()
        if ref.module is not None and runner is not None:
            return bisection.bisect_module(
                candidate, ref.module, fs.feeds, runner.args(fs.feeds),
                provider=provider, inputs_label=fs.label,
            )  # fmt: skip
        if ref.model is not None:
            return bisection.bisect_onnx(
                candidate, ref.model, fs.feeds, provider=provider, inputs_label=fs.label,
                reference_feeds=ref.feeds_for(fs.feeds),
            )  # fmt: skip
    except Exception:  # the verdict stands without a bisection; keep the cause in the log
        logger.exception("bisection failed")
    return None


DEFAULT_BATCH_SIZES = (1, 3)


def _input_plan(
    specs: Sequence[InputSpec],
    input_shapes: ShapeRequest | None,
    batch_axis: BatchAxis | None,
    ref: _Reference,
    runners: Mapping[str, OrtRunner],
    cand_label: str,
) -> InputPlan:
    """The inputs' shapes: the graph's, sized by ``input_shapes`` and the reference's example
    inputs; free symbolic dims probed on the reference graph (an ONNX reference) or on the
    candidate (a PyTorch reference)."""
    shapes = plan_inputs(
        specs, input_shapes=input_shapes, examples=ref.examples, batch_axis=batch_axis
    )
    if not shapes.free():
        return shapes
    if ref.kind == "onnx":
        graph = ref.graphs.get(CPU) or next(iter(ref.graphs.values()))
        return size_free_dims(shapes, lambda f: graph.infer(ref.feeds_for(f)), ref.label)
    runner = runners.get(CPU) or next(iter(runners.values()))
    return size_free_dims(shapes, runner.infer, cand_label)


def _batch_sizes(
    asked: tuple[int, ...] | None, shapes: InputPlan, notes: list[str]
) -> tuple[int, ...]:
    """The batch sizes asked for, else the batch of ``input_shapes``, else (1, 3); a note when
    both were given and disagree."""
    if asked is None:
        return (shapes.user_batch,) if shapes.user_batch else DEFAULT_BATCH_SIZES
    if shapes.user_batch and asked != (shapes.user_batch,):
        notes.append(
            f"batch sizes {', '.join(map(str, asked))} (batch_sizes) replace the batch "
            f"{shapes.user_batch} of input_shapes"
        )
    return asked


def verify(
    reference: Any,
    onnx_model: Any,
    *,
    providers: Sequence[str] | str | None = None,
    batch_sizes: Sequence[int] | None = None,
    seeds: int = 1,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance | None = None,
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    bisect: bool = True,
    weights: str | os.PathLike[str] | None = None,
    input_shapes: ShapeRequest | None = None,
    batch_axis: BatchAxis | None = None,
    save_run: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    reference_outputs: ReferenceMemo | None = None,
) -> VerifyResult:
    """Compare ``onnx_model`` with ``reference`` on every provider; see the module docstring.

    ``reference`` is an ``nn.Module``, a ``ResolvedModel``, a MODEL spec string, an ONNX
    path/ModelProto, or a :class:`~normdeploy.verification.record.RecordedRun` (``load_run``).
    Input shapes are the graph's (:mod:`normdeploy.shapes`): ``input_shapes`` (a shape per
    input, or ``{name: shape}``) and the reference's example inputs size its symbolic dims, and
    sizes at which the graph runs are probed for the rest. ``batch_sizes`` default to the batch
    of ``input_shapes`` when it gives one, else (1, 3). ``save_run`` writes the inputs,
    reference outputs, truth and floors to an ``.npz`` (refusing an existing file unless
    ``overwrite``). ``reference_outputs``: the PyTorch reference's outputs on inputs it already
    ran on (``ExportResult.reference``), used where an input set is byte-for-byte one of those.
    The result is falsy on any mismatch; it never raises for one.
    """
    check_verify_arguments(
        providers=providers, batch_sizes=batch_sizes, inputs=inputs, tolerance=tolerance,
        bisect=bisect, weights=weights, input_shapes=input_shapes,
    )  # fmt: skip
    asked_sizes = None if batch_sizes is None else validate_batch_sizes(batch_sizes)
    _validate_seeds(seeds)
    policy = tolerance_policy(tolerance, atol, rtol)
    candidate, cand_label = load_model_arg(onnx_model, "ONNX model")
    if save_run is not None:
        sources = [s for s in (onnx_model, reference) if isinstance(s, (str, os.PathLike))]
        check_output_path(save_run, inputs=tuple(sources), overwrite=overwrite, what="run")
    notes: list[str] = []
    recorded = _recorded_graph(reference_outputs, onnx_model, notes)
    runners = _open_runners(
        _session_source(onnx_model, candidate), cand_label, providers, notes,
        checked=recorded is not None,
    )  # fmt: skip
    specs = graph_input_specs(candidate)
    first = next(iter(runners.values()))
    cand_outputs = (
        first.output_names if first.opened else [o.name for o in candidate.graph.output]
    )
    _check_override_names(atol, rtol, cand_outputs)
    batch_axes(specs, batch_axis)  # bad axes fail before any work
    if input_shapes is not None:
        if isinstance(reference, RecordedRun):
            raise InvalidArgumentError("input_shapes: a saved run brings its own inputs")
        check_input_shapes(specs, input_shapes)

    if isinstance(reference, RecordedRun):
        ref = _Reference(
            f"{reference.source or 'saved run'} ({reference.reference_kind}: "
            f"{reference.reference})",
            "saved-run", list(reference.outputs), recorded=reference,
        )  # fmt: skip
        if [s.name for s in specs] != list(reference.inputs):
            raise InvalidArgumentError(
                f"{ref.label}: recorded inputs {', '.join(reference.inputs)} are not the "
                f"graph's ({', '.join(s.name for s in specs)})"
            )
        if inputs is not None:
            raise InvalidArgumentError("inputs: a saved run brings its own inputs")
        notes.append("inputs, batch sizes and seeds are the saved run's; so are its floors")
    elif _is_onnx_reference(reference):
        ref = _onnx_reference(reference, specs, list(runners), cand_label)
    else:
        ref = _torch_reference(
            reference, weights, [s.name for s in specs], cand_outputs, list(runners),
            reference_outputs,
        )  # fmt: skip
    pairing = pair_outputs(ref.output_names, cand_outputs)
    if pairing is not None and ref.kind != "pytorch":  # PyTorch outputs have no names
        notes.append(pairing.describe())

    if ref.recorded is not None:
        sets, batched_fs, alone_fs, extra = _recorded_sets(ref.recorded)
    else:
        shapes = _input_plan(specs, input_shapes, batch_axis, ref, runners, cand_label)
        sizes = _batch_sizes(asked_sizes, shapes, notes)
        notes += shapes.notes
        sets, feed_notes = stress_feed_sets(shapes.specs(), sizes, seeds, None, shapes.axes())
        notes += feed_notes
        if inputs is not None:
            label, user = load_feeds(inputs, specs)
            sets.append(FeedSet(label, None, user))
        batched_fs, alone_fs, extra = _plan_batch_check(sets, shapes.specs(), shapes.axes())

    runs = [_run_set(fs, CHECK, ref, runners, recorded) for fs in sets]
    extra_run = _run_set(extra, ALONE, ref, runners, recorded) if extra is not None else None
    notes += ref.notes
    floors: dict[str, float] | None = None
    if ref.recorded is not None:
        floors = dict(ref.recorded.floors) or None
    elif runs and all(r.truth is not None and CPU in r.expected for r in runs):
        floors = pooled_floors([r.expected[CPU] for r in runs], [r.truth or {} for r in runs])
    checks = [c for r in runs for c in _reference_checks(r, ref, floors, policy)]

    all_runs = [*runs, *([extra_run] if extra_run is not None else [])]
    by_label = {r.fs.label: r for r in all_runs}
    plan = BatchPlan(
        output_axes=output_batch_axes(candidate, batch_axis)
        if ref.recorded is None
        else dict(ref.recorded.batch.output_axes)
    )
    if batched_fs is None or alone_fs is None:
        notes.append("batch independence not checked: no batch size > 1 ran")
    else:
        b_run, a_run = by_label[batched_fs.label], by_label[alone_fs.label]
        plan = _plan_with_coupling(ref, b_run, a_run, plan.output_axes, pairing, policy)
        notes += [
            f"batch independence of '{name}' not checked: the reference itself couples "
            f"samples ({why})"
            for name, why in plan.coupled.items()
        ]
        checks += _batch_checks(b_run, a_run, plan, pairing, floors, policy)

    train_mode = None
    if ref.memo is not None and ref.memo.train_mode is not None:
        train_mode = ref.memo.train_mode  # taken by whoever ran the module before
    elif ref.module is not None:
        big = batched_fs or sets[0]
        train_mode = training_report(
            ref.module, torch_args(ref.module, ref.input_names, big.feeds)
        )

    result = VerifyResult(
        reference=ref.label,
        reference_kind=ref.kind,
        candidate=cand_label,
        providers=tuple(runners),
        batch_sizes=tuple(dict.fromkeys(fs.batch_size for fs in sets if fs.batch_size)),
        seeds=seeds if ref.recorded is None else len({fs.seed for fs in sets}),
        checks=tuple(checks),
        graph_flags=tuple(model_eval_mode_lints(candidate)),
        train_mode=train_mode,
        notes=tuple(dict.fromkeys(notes)),
        tolerance=policy.describe(),
        inputs_ran=tuple((r.fs.label, r.fs.shapes()) for r in all_runs),
    )
    if save_run is not None:
        record = RecordedRun(
            reference=ref.label, reference_kind=ref.kind, inputs=tuple(s.name for s in specs),
            outputs=tuple(ref.output_names),
            sets=tuple(
                RecordedSet(r.fs, r.expected[CPU], r.truth, r.role)
                for r in all_runs
                if CPU in r.expected
            ),
            floors=floors or {}, k=policy.k, batch=plan,
        )  # fmt: skip
        write_run(record, save_run)
    if result.passed or not bisect:
        return result
    found = _bisect(result, ref, candidate, sets)
    return VerifyResult(**{**result.__dict__, "bisection": found})
