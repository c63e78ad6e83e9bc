"""Inputs for every comparison: seeded stress inputs shaped from the graph, and user feeds.

Stress inputs are signed, carry a few large outliers and one constant channel (zero variance over
its spatial extent), so that normalization layers are exercised where they go wrong; integer
inputs (token ids, indices) get small non-negative values. User feeds come from an ``.npz`` (one
array per graph input name) or a mapping, checked against the graph's names, ranks and dtypes.

Shapes come from :mod:`normdeploy.shapes` (the batch axis of an input is its dim named ``batch``,
axis 0 when none is, or what the caller says). For each seed the inputs are drawn once at the
largest batch size and the smaller batch sizes are its leading samples, so a batch-1 run is sample
0 of the batch-3 run: the batch-independence check needs no extra run.

Symbolic dims nothing sizes (files from other toolchains: ``[N, 3, H, W]``) are chosen by
:func:`size_free_dims`: a few candidate sizes, smallest first, until the graph runs.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.random import default_rng

from normdeploy.budget import array_bytes, check_allocation, describe_shapes, generation_bytes
from normdeploy.errors import (
    InputFileError,
    InvalidArgumentError,
    InvalidModelError,
    NormdeployError,
    ResourceLimitError,
    first_line,
)
from normdeploy.io import check_input_file, describe_content
from normdeploy.onnx_graph import InputSpec
from normdeploy.shapes import PROBE, SYMBOLIC_DEFAULT, FreeDim, InputPlan, batch_axes
from normdeploy.verification.runners import ort_message


def validate_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    """Positive integers, duplicates dropped, order kept; InvalidArgumentError otherwise."""
    try:
        sizes = tuple(batch_sizes)
    except TypeError:
        raise InvalidArgumentError(
            f"batch_sizes: expected a sequence of positive integers, got "
            f"{type(batch_sizes).__name__}"
        ) from None
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise InvalidArgumentError(
            f"batch_sizes: {list(sizes)} must be positive integers, e.g. 1,3"
        )
    return tuple(dict.fromkeys(sizes))


def concrete_shape(
    spec: InputSpec,
    batch_size: int | None,
    dim_values: Mapping[str, int] | None = None,
    batch_axis: int = 0,
) -> tuple[int, ...]:
    """Fill symbolic dims: the batch axis with ``batch_size``, named ones from ``dim_values``,
    else 8. Static dims are kept as written, the batch dim included."""
    out = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif i == batch_axis and batch_size is not None:
            out.append(batch_size)
        elif isinstance(d, str) and dim_values and d in dim_values:
            out.append(int(dim_values[d]))
        else:
            out.append(SYMBOLIC_DEFAULT)
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


def check_feed_memory(
    specs: Sequence[InputSpec],
    batch_sizes: Sequence[int | None],
    seeds: int = 1,
    dim_values: Mapping[str, int] | None = None,
) -> None:
    """Refuse (before anything is allocated) stress inputs over the memory budget: every feed
    set is kept, and the largest input is generated through float64 temporaries."""
    total, peak, largest = 0, 0, ""
    seen: set[tuple[tuple[int, ...], ...]] = set()
    for batch in batch_sizes:
        shapes = [(s.name, concrete_shape(s, batch, dim_values), s.dtype) for s in specs]
        if (key := tuple(shape for _, shape, _ in shapes)) in seen:
            continue  # a static batch dim: the same feeds, made once
        seen.add(key)
        total += seeds * sum(array_bytes(shape, dtype) for _, shape, dtype in shapes)
        for entry in shapes:
            if (gen := generation_bytes(entry[1], entry[2])) > peak:
                peak, largest = gen, describe_shapes([entry])
    if total + peak > 0:
        sizes = ", ".join(str(b) for b in batch_sizes if b is not None)
        check_allocation(
            f"stress inputs (largest {largest}"
            + (f"; batch sizes {sizes}" if sizes else "")
            + ")",
            total + peak,
        )


def make_feeds(
    specs: Sequence[InputSpec],
    batch_size: int | None = None,
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
    axes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded stress inputs for every graph input (``axes``: batch axis per input name), sized
    against the memory budget first."""
    check_feed_memory(specs, [batch_size], 1, dim_values)
    rng = default_rng(seed)
    try:
        return {
            s.name: stress_array(
                concrete_shape(s, batch_size, dim_values, (axes or {}).get(s.name, 0)),
                s.dtype,
                rng,
            )
            for s in specs
        }
    except MemoryError as exc:  # within the budget, yet the machine said no
        raise ResourceLimitError(
            f"stress inputs: cannot allocate ({first_line(exc, 160)})"
        ) from None


def feeds_like(
    specs: Sequence[InputSpec], examples: Sequence[Any], seed: int
) -> dict[str, np.ndarray]:
    """Seeded stress inputs with the shapes of ``examples`` (tensors or arrays), one per spec."""
    shapes = [(s.name, tuple(x.shape), s.dtype) for s, x in zip(specs, examples, strict=True)]
    check_allocation(
        f"stress inputs ({describe_shapes(shapes)})",
        sum(generation_bytes(shape, dtype) for _, shape, dtype in shapes),
    )
    rng = default_rng(seed)
    return {
        s.name: stress_array(tuple(x.shape), s.dtype, rng)
        for s, x in zip(specs, examples, strict=True)
    }


@dataclass(frozen=True)
class FeedSet:
    """One set of graph inputs: a label for reports, the batch size (None: user feeds) and the
    seed (None: user feeds)."""

    label: str
    batch_size: int | None
    feeds: dict[str, np.ndarray]
    seed: int | None = None

    def shapes(self) -> str:
        return ", ".join(f"{k}{list(v.shape)}" for k, v in self.feeds.items())


def dim_values_from(specs: Sequence[InputSpec], examples: Sequence[Any]) -> dict[str, int]:
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


def leading_samples(
    feeds: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    axes: Mapping[str, int],
    n: int,
) -> dict[str, np.ndarray]:
    """The first ``n`` samples along each input's batch axis (inputs with a static batch dim
    are kept whole)."""
    out = {}
    for spec in specs:
        v = feeds[spec.name]
        axis = axes.get(spec.name, 0)
        if _symbolic_axis(spec, axis) and v.ndim > axis:
            v = np.ascontiguousarray(np.take(v, np.arange(n), axis=axis))
        out[spec.name] = v
    return out


def _symbolic_axis(spec: InputSpec, axis: int) -> bool:
    return len(spec.shape) > axis and not isinstance(spec.shape[axis], int)


def ran_batch(
    feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec], axes: Mapping[str, int]
) -> int | None:
    """The batch size these feeds run at: the first input's size along its batch axis."""
    for spec in specs:
        v = feeds[spec.name]
        axis = axes.get(spec.name, 0)
        if v.ndim > axis:
            return int(v.shape[axis])
    return None


def stress_feed_sets(
    specs: Sequence[InputSpec],
    batch_sizes: Sequence[int],
    seeds: int = 1,
    dim_values: Mapping[str, int] | None = None,
    axes: Mapping[str, int] | None = None,
) -> tuple[list[FeedSet], list[str]]:
    """One FeedSet per batch size and seed (duplicates dropped), and notes on what ran.

    Per seed the inputs are drawn at the largest batch size; smaller batch sizes take its
    leading samples (see the module docstring).
    """
    check_feed_memory(specs, batch_sizes, seeds, dim_values)  # all of them, before the first
    axes = dict(axes or batch_axes(specs))
    sets: list[FeedSet] = []
    seen: set[Any] = set()
    for seed in range(seeds):
        full = make_feeds(specs, max(batch_sizes), seed, dim_values, axes)
        for batch in batch_sizes:
            feeds = leading_samples(full, specs, axes, batch)
            key = (seed, tuple((k, v.shape) for k, v in feeds.items()))
            if key in seen:
                continue
            seen.add(key)
            # A static batch dim keeps its size: report the batch that actually ran.
            ran = ran_batch(feeds, specs, axes) or batch
            sets.append(FeedSet(f"b{ran}/seed{seed}", ran, feeds, seed))
    sets.sort(key=lambda fs: (fs.batch_size or 0, fs.seed or 0))
    notes = []
    fixed = [s.name for s in specs if s.shape and not _symbolic_axis(s, axes[s.name])]
    if fixed:
        ran_sizes = sorted({f.batch_size for f in sets if f.batch_size})
        notes.append(
            f"input(s) {', '.join(fixed)} have a static batch dimension: ran batch "
            f"{', '.join(map(str, ran_sizes))} only"
        )
    return sets, notes


# Candidate sizes for free symbolic dims, smallest first: 8 (cheap, and what a free dim gets when
# nothing probes), then the multiples of 32 detection/segmentation nets and ViTs need for
# spatial axes (PaddleOCR's detector: H and W multiples of 32), and common lengths otherwise.
SPATIAL_CANDIDATES = (8, 32, 64, 224, 640)
OTHER_CANDIDATES = (8, 16, 128)


def _candidates(dim: FreeDim) -> tuple[int, ...]:
    return SPATIAL_CANDIDATES if dim.spatial else OTHER_CANDIDATES


def size_free_dims(
    plan: InputPlan,
    run: Callable[[dict[str, np.ndarray]], object],
    label: str,
    seed: int = 0,
) -> InputPlan:
    """Size the plan's free symbolic dims: the i-th candidate for every free dim at once, at
    batch 1, until ``run`` (the original graph on onnxruntime) succeeds; a note says which
    sizes were chosen. Candidates over the memory budget are not tried (ResourceLimitError when
    not even the first fits); InvalidModelError with the shapes tried when none runs."""
    free = plan.free()
    if not free:
        return plan
    tried: list[str] = []
    error, last = "", plan
    for i in range(max(len(_candidates(f)) for f in free)):
        sizes = {f.key: _candidates(f)[min(i, len(_candidates(f)) - 1)] for f in free}
        trial = plan.sized(sizes, PROBE)
        if trial.describe() in tried:
            continue
        try:
            feeds = make_feeds(trial.specs(), 1, seed, axes=trial.axes())
        except ResourceLimitError:
            if not tried:
                raise
            break
        tried.append(trial.describe())
        last = trial
        try:
            run(feeds)
        except NormdeployError:
            raise
        except Exception as exc:  # onnxruntime's own error types
            error = ort_message(exc)
            continue
        chosen = ", ".join(f"{f.label}={sizes[f.key]}" for f in free)
        failed = f" (not at {'; '.join(tried[:-1])})" if len(tried) > 1 else ""
        return trial.with_note(
            f"symbolic dim(s) {chosen} chosen: {label} runs at {tried[-1]}{failed}; "
            "input_shapes (--input-shape) sets them"
        )
    example = next(s for s in last.inputs if s.name == free[0].input)
    shape = "x".join(str(d) if isinstance(d, int) else "1" for d in example.spec().shape)
    named = f"{example.name}=" if len(plan.inputs) > 1 else ""
    raise InvalidModelError(
        f"{label}: onnxruntime cannot run it at any size tried for its symbolic dim(s) "
        f"{', '.join(f.label for f in free)} ({'; '.join(tried)}; last error: {error}); "
        f"give the sizes it takes, e.g. input_shapes={named}{shape}"
    )


def _npy_header(member: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header (nothing else is read)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return tuple(shape), np.dtype(dtype)


def _read_npz(path: os.PathLike[str] | str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``; every member's header is read and sized before any data."""
    p = check_input_file(path, "inputs")
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(b"\x93NUMPY"):
        raise InputFileError(
            f"{p}: a single .npy array, not an .npz with one array per graph input name"
        )
    if not zipfile.is_zipfile(p):
        raise InputFileError(f"{p}: not an .npz archive ({describe_content(head)})")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(p) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            headers = []
            for m in members:
                name = m.filename[:-4] if m.filename.endswith(".npy") else m.filename
                try:
                    with archive.open(m) as f:
                        shape, dtype = _npy_header(f)
                except (ValueError, EOFError, OSError) as exc:
                    raise InputFileError(
                        f"{p}: member '{m.filename}' is not a NumPy array ({first_line(exc, 120)})"
                    ) from None
                if dtype.hasobject:
                    raise InputFileError(
                        f"{p}: member '{m.filename}' holds Python objects (pickled data); "
                        "refused: feeds must be numeric arrays"
                    )
                headers.append((name, shape, dtype))
            check_allocation(
                f"{p}: arrays {describe_shapes(headers)}",
                sum(array_bytes(shape, dtype) for _, shape, dtype in headers),
            )
            for m, (name, _, _) in zip(members, headers, strict=True):
                with archive.open(m) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except InputFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise InputFileError(f"{p}: cannot read as .npz ({first_line(exc, 160)})") from None
    return arrays


def load_feeds(
    source: str | os.PathLike[str] | Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> tuple[str, dict[str, np.ndarray]]:
    """User feeds from an .npz file (or a mapping), checked against the graph inputs."""
    if isinstance(source, Mapping):
        label, what = "user feeds", "inputs"
        raw = {str(k): np.asarray(v) for k, v in source.items()}
    else:
        label, what = os.path.basename(source), str(source)
        raw = _read_npz(source)
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
