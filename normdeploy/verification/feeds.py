"""Inputs for every comparison: seeded stress inputs shaped from the graph, and user feeds.

Stress inputs are signed, carry a few large outliers and one constant channel (zero variance over
its spatial extent), so that normalization layers are exercised where they go wrong; integer
inputs (token ids, indices) get small non-negative values. User feeds come from an ``.npz`` (one
array per graph input name) or a mapping, checked against the graph's names, ranks and dtypes.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from normdeploy.budget import array_bytes, check_allocation, describe_shapes, generation_bytes
from normdeploy.errors import (
    InputFileError,
    InvalidArgumentError,
    ResourceLimitError,
    first_line,
)
from normdeploy.io import check_input_file, describe_content
from normdeploy.onnx_graph import InputSpec

SYMBOLIC_DEFAULT = 8  # value for a symbolic non-batch dim nothing else sizes


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
) -> dict[str, np.ndarray]:
    """Seeded stress inputs for every graph input (sized against the memory budget first)."""
    check_feed_memory(specs, [batch_size], 1, dim_values)
    rng = np.random.default_rng(seed)
    try:
        return {
            s.name: stress_array(concrete_shape(s, batch_size, dim_values), s.dtype, rng)
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
    rng = np.random.default_rng(seed)
    return {
        s.name: stress_array(tuple(x.shape), s.dtype, rng)
        for s, x in zip(specs, examples, strict=True)
    }


@dataclass(frozen=True)
class FeedSet:
    """One set of graph inputs: a label for reports and the batch size (None: user feeds)."""

    label: str
    batch_size: int | None
    feeds: dict[str, np.ndarray]

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


def stress_feed_sets(
    specs: Sequence[InputSpec],
    batch_sizes: Sequence[int],
    seeds: int = 1,
    dim_values: Mapping[str, int] | None = None,
) -> tuple[list[FeedSet], list[str]]:
    """One FeedSet per batch size and seed (duplicates dropped), and notes on what ran."""
    check_feed_memory(specs, batch_sizes, seeds, dim_values)  # all of them, before the first
    sets: list[FeedSet] = []
    seen: set[Any] = set()
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
    notes = []
    fixed = [
        s.name for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0
    ]
    if fixed:
        ran_sizes = sorted({f.batch_size for f in sets if f.batch_size})
        notes.append(
            f"input(s) {', '.join(fixed)} have a static batch dimension: ran batch "
            f"{', '.join(map(str, ran_sizes))} only"
        )
    return sets, notes


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
