"""verify: prove an ONNX graph computes what the PyTorch model computes in eval mode.

Runners produce outputs (:mod:`~normdeploy.verification.runners`), the one comparison turns two
output sets into :class:`~normdeploy.verification.compare.Check` records, and
:class:`~normdeploy.verification.results.VerifyResult` renders them. Checks, per output:

- ``reference``: the graph on every provider against the reference: PyTorch eval on CPU, or a
  reference ONNX graph on the same provider (``verify a.onnx b.onnx``);
- ``cuda-vs-cpu`` (CUDA present): the graph on CUDA against the graph on CPU;
- ``torch-cuda`` (CUDA present and PyTorch built with CUDA): the graph on CUDA against PyTorch
  eval on CUDA;
- ``batch-independence``: every sample run alone against the same sample inside the largest
  batch. A graph that normalizes with batch statistics (BatchNorm baked in training mode) fails.

Inputs are seeded stress inputs (:mod:`~normdeploy.verification.feeds`) at every batch size and
seed, plus user feeds from an ``.npz``. Outputs are matched by name when the names agree, else by
position. Tolerances come from the one policy (:class:`TolerancePolicy`); ``atol``/``rtol``
override it. The graph is linted for eval semantics (:mod:`normdeploy.census.lints`), a module
handed over in train mode is reported with how far its train output is from eval, and on a
mismatch :mod:`~normdeploy.verification.bisection` names the module where the error jumps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from normdeploy.arguments import (
    batch_sizes_arg,
    check_bool,
    feeds_arg,
    optional_path,
    providers_arg,
    shapes_arg,
)
from normdeploy.census.lints import model_eval_mode_lints
from normdeploy.errors import InvalidArgumentError, InvalidModelError, first_line
from normdeploy.io import read_onnx
from normdeploy.modes import training_report
from normdeploy.onnx_graph import InputSpec, graph_input_specs
from normdeploy.verification import bisection
from normdeploy.verification.compare import (
    BATCH_INDEPENDENCE,
    CUDA_VS_CPU,
    REFERENCE,
    TORCH_CUDA,
    Check,
    Tolerance,
    TolerancePolicy,
    compare_outputs,
    failed_check,
)
from normdeploy.verification.feeds import (
    FeedSet,
    dim_values_from,
    load_feeds,
    stress_feed_sets,
    validate_batch_sizes,
)
from normdeploy.verification.results import VerifyResult, worst
from normdeploy.verification.runners import (
    CPU,
    CUDA,
    OrtRunner,
    TorchRunner,
    resolve_providers,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ arguments


def tolerance_policy(
    tolerance: Tolerance | None = None, atol: float | None = None, rtol: float | None = None
) -> TolerancePolicy:
    """The policy for user overrides; InvalidArgumentError for a negative or non-finite bound."""
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and 0 <= value < math.inf
        ):
            raise InvalidArgumentError(f"{name}: {value} must be a finite number >= 0")
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
    batch_sizes_arg(batch_sizes)
    feeds_arg(inputs)
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise InvalidArgumentError(
            f"tolerance: expected a normdeploy.verification.Tolerance, got "
            f"{type(tolerance).__name__} (atol=/rtol= take numbers)"
        )
    check_bool(bisect, "bisect")
    optional_path(weights, "weights")
    shapes_arg(input_shapes)


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


def _is_onnx_reference(reference: Any) -> bool:
    if isinstance(reference, (onnx.ModelProto, bytes, os.PathLike)):
        return True
    return isinstance(reference, str) and reference.lower().endswith(".onnx")


def _resolve_module(
    reference: object,
    weights: str | os.PathLike[str] | None,
    input_shapes: Sequence[Sequence[int]] | None,
) -> tuple[torch.nn.Module, tuple[Any, ...], str]:
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


# ------------------------------------------------------------------------------- the run


@dataclass
class _Sides:
    """Both sides of a verification, resolved, with a runner per provider."""

    candidate: onnx.ModelProto
    candidate_label: str
    reference_label: str
    module: torch.nn.Module | None = None
    examples: tuple[Any, ...] = ()
    reference_model: onnx.ModelProto | None = None
    runners: dict[str, OrtRunner] = field(default_factory=dict)
    reference_runners: dict[str, OrtRunner] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return next(iter(self.runners.values())).output_names


def _open(
    model: onnx.ModelProto, provider: str, label: str, explicit: bool
) -> OrtRunner | None:
    """A runner on ``provider``; None (or an error when asked for explicitly) on a fallback."""
    runner = OrtRunner(model, provider).open(label)
    used = runner.providers_used
    if provider in used:
        return runner
    if explicit:
        raise InvalidArgumentError(
            f"providers: onnxruntime fell back from {provider} to {', '.join(used)}"
        )
    return None


def _open_runners(sides: _Sides, providers: Sequence[str] | str | None) -> None:
    choice = resolve_providers(providers)
    sides.notes += choice.notes
    explicit = providers is not None and providers != "auto"
    for provider in choice.providers:
        runner = _open(sides.candidate, provider, sides.candidate_label, explicit)
        if runner is None:
            sides.notes.append(f"{provider} was requested but onnxruntime fell back; not used")
            continue
        sides.runners[provider] = runner
        if sides.reference_model is not None:
            ref = _open(sides.reference_model, provider, sides.reference_label, explicit)
            if ref is not None:
                sides.reference_runners[provider] = ref
    if not sides.runners:
        raise InvalidArgumentError("providers: none of the requested providers can run it")


def _check_reference_inputs(sides: _Sides, specs: Sequence[InputSpec]) -> None:
    if sides.reference_model is None:
        return
    ref_names = [s.name for s in graph_input_specs(sides.reference_model)]
    names = [s.name for s in specs]
    if sorted(ref_names) != sorted(names):
        raise InvalidArgumentError(
            f"{sides.reference_label} and {sides.candidate_label} have different inputs "
            f"({', '.join(ref_names)} vs {', '.join(names)})"
        )


@dataclass
class _TorchSide:
    cpu: TorchRunner
    cuda: TorchRunner | None = None


def _torch_runners(sides: _Sides, input_names: list[str]) -> _TorchSide | None:
    if sides.module is None:
        return None
    side = _TorchSide(TorchRunner(sides.module, input_names, sides.output_names))
    if CUDA in sides.runners:
        import torch

        if torch.cuda.is_available():
            side.cuda = TorchRunner(sides.module, input_names, sides.output_names, "cuda")
        else:
            sides.notes.append("PyTorch has no CUDA here: PyTorch-on-CUDA comparison skipped")
    return side


def _torch_expected(torch_side: _TorchSide, fs: FeedSet, label: str) -> dict[str, np.ndarray]:
    try:
        return torch_side.cpu.infer(fs.feeds)
    except InvalidArgumentError:
        raise
    except Exception as exc:
        raise InvalidArgumentError(
            f"{label}: the PyTorch model fails on the graph's inputs ({fs.shapes()}): "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from None


def _check_feed_set(
    sides: _Sides, torch_side: _TorchSide | None, fs: FeedSet, policy: TolerancePolicy
) -> list[Check]:
    """Reference, CUDA-vs-CPU and PyTorch-on-CUDA checks on one set of inputs."""
    expected_cpu = (
        _torch_expected(torch_side, fs, sides.reference_label) if torch_side else None
    )
    checks: list[Check] = []
    actual_by_provider: dict[str, dict[str, np.ndarray]] = {}

    def compare(kind: str, provider: str, e: Mapping[str, Any], a: Mapping[str, Any]) -> None:
        checks.extend(
            compare_outputs(
                e, a, kind=kind, provider=provider, inputs=fs.label, policy=policy,
                batch_size=fs.batch_size,
            )
        )  # fmt: skip

    for provider, runner in sides.runners.items():
        try:
            actual = runner.infer(fs.feeds)
        except Exception as exc:
            checks.append(failed_check(REFERENCE, provider, fs.label, "onnxruntime run", exc))
            continue
        actual_by_provider[provider] = actual
        expected = expected_cpu
        if expected is None and provider in sides.reference_runners:
            try:
                expected = sides.reference_runners[provider].infer(fs.feeds)
            except Exception as exc:
                checks.append(
                    failed_check(REFERENCE, provider, fs.label, "reference run", exc)
                )
                continue
        if expected is None:
            continue
        if len(expected) != len(actual):
            raise InvalidArgumentError(
                f"{sides.reference_label} has {len(expected)} output(s), "
                f"{sides.candidate_label} has {len(actual)}; are these the same model?"
            )
        compare(REFERENCE, provider, expected, actual)
    if CUDA in actual_by_provider and CPU in actual_by_provider:
        compare(CUDA_VS_CPU, CUDA, actual_by_provider[CPU], actual_by_provider[CUDA])
    if torch_side is not None and torch_side.cuda is not None and CUDA in actual_by_provider:
        compare(TORCH_CUDA, CUDA, torch_side.cuda.infer(fs.feeds), actual_by_provider[CUDA])
    return checks


def _batch_independence(
    runner: OrtRunner, fs: FeedSet, specs: Sequence[InputSpec], policy: TolerancePolicy
) -> tuple[list[Check], list[str]]:
    """Each sample alone against the same sample inside the batch, per output."""
    batch = fs.batch_size or 0
    sliced = [s.name for s in specs if s.shape and not isinstance(s.shape[0], int)]
    if not sliced:
        return [], ["batch independence not checked: no input has a symbolic batch dimension"]
    try:
        batched = runner.infer(fs.feeds)
    except Exception:
        return [], []  # already recorded as a failed reference check
    outputs = [n for n, v in batched.items() if v.ndim and v.shape[0] == batch]
    notes = []
    if skipped := [n for n in batched if n not in outputs]:
        notes.append(
            f"batch independence: output(s) {', '.join(skipped)} have no batch dimension"
        )
    alone: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    try:
        for i in range(batch):
            out = runner.infer(
                {k: v[i : i + 1] if k in sliced else v for k, v in fs.feeds.items()}
            )
            for n in outputs:
                alone[n].append(out[n])
    except Exception as exc:
        return [
            failed_check(BATCH_INDEPENDENCE, runner.provider, fs.label, "batch 1 run", exc)
        ], notes
    label = f"{fs.label} vs 1×{batch}"
    checks = [
        Check(
            BATCH_INDEPENDENCE,
            runner.provider,
            label,
            policy.compare(n, batched[n], np.concatenate(alone[n]), runner.provider),
            batch,
        )
        for n in outputs
    ]
    return checks, notes


def _largest_batch(feed_sets: Sequence[FeedSet]) -> FeedSet | None:
    return max(
        (fs for fs in feed_sets if fs.batch_size and fs.label.endswith("/seed0")),
        key=lambda fs: fs.batch_size or 0,
        default=None,
    )


def _bisect(
    result: VerifyResult,
    sides: _Sides,
    feed_sets: Sequence[FeedSet],
    torch_side: _TorchSide | None,
    policy: TolerancePolicy,
) -> bisection.Bisection | None:
    """Bisect on the inputs and provider of the worst failing check (CPU if none failed)."""
    culprit = worst([c for c in result.failures if c.kind in (REFERENCE, BATCH_INDEPENDENCE)])
    provider = culprit.provider if culprit is not None else CPU
    label = culprit.inputs.split(" vs ")[0] if culprit is not None else feed_sets[0].label
    fs = next((f for f in feed_sets if f.label == label), feed_sets[0])
    try:
        if sides.module is not None and torch_side is not None:
            return bisection.bisect_module(
                sides.candidate, sides.module, fs.feeds, torch_side.cpu.args(fs.feeds),
                provider=provider, inputs_label=fs.label, policy=policy,
            )  # fmt: skip
        if sides.reference_model is not None:
            return bisection.bisect_onnx(
                sides.candidate, sides.reference_model, fs.feeds, provider=provider,
                inputs_label=fs.label, policy=policy,
            )  # fmt: skip
    except Exception:  # the verdict stands without a bisection; keep the cause in the log
        logger.exception("bisection failed")
    return None


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
    check_verify_arguments(
        providers=providers, batch_sizes=batch_sizes, inputs=inputs, tolerance=tolerance,
        bisect=bisect, weights=weights, input_shapes=input_shapes,
    )  # fmt: skip
    sizes = validate_batch_sizes(batch_sizes)
    _validate_seeds(seeds)
    policy = tolerance_policy(tolerance, atol, rtol)
    candidate, cand_label = load_model_arg(onnx_model, "ONNX model")
    if _is_onnx_reference(reference):
        ref_model, ref_label = load_model_arg(reference, "reference ONNX model")
        sides = _Sides(candidate, cand_label, ref_label, reference_model=ref_model)
    else:
        module, examples, ref_label = _resolve_module(reference, weights, input_shapes)
        sides = _Sides(candidate, cand_label, ref_label, module=module, examples=examples)
    _open_runners(sides, providers)

    specs = graph_input_specs(candidate)
    _check_reference_inputs(sides, specs)
    dims = dim_values_from(specs, sides.examples)
    feed_sets, feed_notes = stress_feed_sets(specs, sizes, seeds, dims)
    sides.notes += feed_notes
    if inputs is not None:
        label, user = load_feeds(inputs, specs)
        feed_sets.append(FeedSet(label, None, user))
    torch_side = _torch_runners(sides, [s.name for s in specs])

    checks = [c for fs in feed_sets for c in _check_feed_set(sides, torch_side, fs, policy)]
    largest = _largest_batch(feed_sets)
    if largest is not None and (largest.batch_size or 0) > 1:
        for runner in sides.runners.values():
            more, bi_notes = _batch_independence(runner, largest, specs, policy)
            checks += more
            sides.notes += [n for n in bi_notes if n not in sides.notes]
    else:
        sides.notes.append("batch independence not checked: no batch size > 1 ran")

    train_mode = None
    if sides.module is not None and torch_side is not None:
        train_args = torch_side.cpu.args((largest or feed_sets[0]).feeds)
        train_mode = training_report(sides.module, train_args)

    result = VerifyResult(
        reference=sides.reference_label,
        reference_kind="pytorch" if sides.module is not None else "onnx",
        candidate=cand_label,
        providers=tuple(sides.runners),
        batch_sizes=tuple(dict.fromkeys(fs.batch_size for fs in feed_sets if fs.batch_size)),
        seeds=seeds,
        checks=tuple(checks),
        graph_flags=tuple(model_eval_mode_lints(candidate)),
        train_mode=train_mode,
        notes=tuple(sides.notes),
    )
    if result.passed or not bisect:
        return result
    found = _bisect(result, sides, feed_sets, torch_side, policy)
    return VerifyResult(**{**result.__dict__, "bisection": found})
