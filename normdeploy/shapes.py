"""Input shapes: one description of every model input, built once, used by every command.

An :class:`InputPlan` holds one :class:`InputShape` per graph input: its name, dtype and, per
dim, a :class:`Dim` with the size feeds use, the graph's symbolic name, and what fixed it
(:data:`GRAPH` a static dim, :data:`USER` ``input_shapes``, :data:`EXAMPLE` the model's example
inputs, :data:`PROBE` a size at which the graph was seen to run). :func:`plan_inputs` builds it
from the graph's declared inputs, the example inputs and ``input_shapes`` (a shape for every
input in order, or ``{name: shape}``), and refuses a requested shape the graph cannot take
(:func:`check_input_shapes`: another count or rank, or a static dim of another size). Dims that
share a symbolic name are one dim: sizing one sizes all. The batch axis of every input (its dim
named ``batch``, else axis 0, or ``batch_axis``) stays symbolic: batch sizes fill it. Symbolic
non-batch dims nothing sizes are *free*; :func:`normdeploy.verification.feeds.size_free_dims`
chooses sizes at which the graph runs.

For export, :func:`dynamic_dims` turns ``dynamic_axes`` (axis indices for every input, or per
input name) into the graph's symbolic dims: one dim per axis index whose example sizes agree
across inputs (token ids and their attention mask vary together), named ``batch`` for the batch
axis and after the axis's usual meaning otherwise (``sequence``, ``height``, ``width``…).

This module is pure (no onnxruntime, no torch): the export, the MODEL resolution, the CLI and
the verification core all read shapes through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from normdeploy.errors import InvalidArgumentError
from normdeploy.onnx_graph import InputSpec

BATCH_DIM_NAME = (
    "batch"  # the dim name exporters (and normdeploy's export) give the batch axis
)
SYMBOLIC_DEFAULT = 8  # size of a free symbolic dim where nothing probes one

# What fixed a dim's size.
GRAPH = "graph"  # a static dim of the graph
USER = "user"  # input_shapes
EXAMPLE = "example"  # the model's example inputs
PROBE = "probe"  # the first candidate size at which the graph runs
FREE = "free"  # nothing yet (feeds use SYMBOLIC_DEFAULT)

BatchAxis = int | Mapping[str, int]
Shape = tuple[int, ...]
ShapeRequest = Sequence[Sequence[int]] | Mapping[str, Sequence[int]]
AxesRequest = int | Sequence[int] | Mapping[str, int | Sequence[int]]
DtypeRequest = str | np.dtype | Mapping[str, str | np.dtype]

# Input dtypes a user may ask for where no example input says it.
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "uint8",
    "int8",
    "bool",
)


# ------------------------------------------------------------------------------- parsing


def parse_shape(text: str, what: str = "input_shapes") -> Shape:
    """'1x3x224x224' → (1, 3, 224, 224); InvalidArgumentError on anything else."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise InvalidArgumentError(
            f"{what}: '{text}' is not a shape like 1x3x224x224"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise InvalidArgumentError(f"{what}: '{text}' must have positive dims")
    return dims


def parse_axes(text: str, what: str = "dynamic_axes") -> tuple[int, ...]:
    """'0,2,3' → (0, 2, 3); '' → () (no dynamic axis); InvalidArgumentError on anything else."""
    try:
        axes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"{what}: '{text}' is not a comma-separated list of axis indices like 0,2,3"
        ) from None
    if any(a < 0 for a in axes):
        raise InvalidArgumentError(f"{what}: '{text}' must be axis indices >= 0")
    return tuple(dict.fromkeys(axes))


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _one_shape(shape: object, what: str) -> Shape:
    if isinstance(shape, str):
        return parse_shape(shape, what)
    if isinstance(shape, bytes) or not isinstance(shape, Sequence):
        raise InvalidArgumentError(
            f"{what}: each shape must be a sequence of ints like (1, 3, 224, 224), got "
            f"{_type_name(shape)}"
        )
    if not shape or any(
        not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape
    ):
        raise InvalidArgumentError(f"{what}: {list(shape)} must be positive integers")
    return tuple(int(d) for d in shape)


def input_shapes_arg(
    value: object, what: str = "input_shapes"
) -> tuple[Shape, ...] | dict[str, Shape] | None:
    """A shape for every input in order (``[(1, 3, 224, 224)]``) or ``{name: shape}``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = {}
        for name, shape in value.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(
                    f"{what}: input names must be strings, got {name!r}"
                )
            out[name] = _one_shape(shape, f"{what}[{name!r}]")
        return out
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(
            f"{what}: expected a list of shapes like [(1, 3, 224, 224)] or "
            f"{{name: shape}}, got {_type_name(value)}"
        )
    return tuple(_one_shape(s, what) for s in value)


def dtype_of(value: object, what: str = "input_dtypes") -> np.dtype:
    """A dtype name from :data:`DTYPES` (or a numpy dtype) as a numpy dtype."""
    name = value.name if isinstance(value, np.dtype) else value
    if not isinstance(name, str) or name.strip().lower() not in DTYPES:
        raise InvalidArgumentError(f"{what}: '{value}' is not one of {', '.join(DTYPES)}")
    name = name.strip().lower()
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def input_dtypes_arg(
    value: object, what: str = "input_dtypes"
) -> np.dtype | dict[str, np.dtype] | None:
    """One dtype for every input, or ``{name: dtype}`` (``"*"``: every input not named)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): dtype_of(v, f"{what}[{k!r}]") for k, v in value.items()}
    return dtype_of(value, what)


def dynamic_axes_arg(
    value: object, what: str = "dynamic_axes"
) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """Axis indices for every input (``0``, ``(0, 1)``, ``"0,2,3"``) or ``{name: axes}``
    (``"*"``: every input not named)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): _axes(v, f"{what}[{k!r}]") for k, v in value.items()}
    return _axes(value, what)


def _axes(value: object, what: str) -> tuple[int, ...]:
    if isinstance(value, str):
        return parse_axes(value, what)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise InvalidArgumentError(
            f"{what}: expected axis indices like (0, 1), got {_type_name(value)}"
        )
    if any(not isinstance(a, int) or isinstance(a, bool) or a < 0 for a in value):
        raise InvalidArgumentError(f"{what}: {list(value)} must be axis indices >= 0")
    return tuple(dict.fromkeys(int(a) for a in value))


def names_arg(value: object, what: str) -> tuple[str, ...] | None:
    """Names given as a sequence of strings or one comma-separated string."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise InvalidArgumentError(
            f"{what}: expected names like ['x', 'mask'], got {_type_name(value)}"
        )
    names = tuple(value)
    if any(not isinstance(n, str) or not n for n in names):
        raise InvalidArgumentError(f"{what}: {list(names)} must be non-empty strings")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"{what}: {list(names)} has a name twice")
    return names


# --------------------------------------------------------------------------- batch axes


def default_batch_axis(spec: InputSpec) -> int:
    """The input's dim named ``batch``, else axis 0."""
    return next((i for i, d in enumerate(spec.shape) if d == BATCH_DIM_NAME), 0)


def batch_axes(
    specs: Sequence[InputSpec], batch_axis: BatchAxis | None = None
) -> dict[str, int]:
    """The batch axis of every input: ``batch_axis`` (one axis for all, or per input name),
    else the dim named ``batch``, else 0. InvalidArgumentError for an unknown name or axis."""
    names = [s.name for s in specs]
    if isinstance(batch_axis, Mapping):
        if unknown := sorted(set(batch_axis) - set(names)):
            raise InvalidArgumentError(
                f"batch_axis: no input named {', '.join(map(repr, unknown))} "
                f"(graph inputs: {', '.join(names)})"
            )
        chosen: dict[str, int | None] = {n: batch_axis.get(n) for n in names}
    else:
        chosen = dict.fromkeys(names, batch_axis)
    axes = {}
    for spec in specs:
        axis = chosen[spec.name]
        if axis is None:
            axes[spec.name] = default_batch_axis(spec)
            continue
        if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
            raise InvalidArgumentError(f"batch_axis: {axis!r} must be an integer >= 0")
        if spec.shape and axis >= len(spec.shape):
            raise InvalidArgumentError(
                f"batch_axis: input '{spec.name}' has rank {len(spec.shape)}, no axis {axis}"
            )
        axes[spec.name] = axis
    return axes


# -------------------------------------------------------------------- requested shapes


def dims_text(shape: Sequence[Any]) -> str:
    """'[N, 3, ?, 8]': a declared shape, '?' for an unnamed dim."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_input_shapes(
    specs: Sequence[InputSpec], shapes: ShapeRequest, what: str = "input_shapes"
) -> None:
    """Refuse requested input shapes the graph cannot take: another count, unknown names,
    another rank, or a static dim of another size. InvalidArgumentError naming the input and
    the dim."""
    requested = shapes_by_name([s.name for s in specs], shapes, what)
    for spec in specs:
        if spec.name in requested:
            _check_one(spec, requested[spec.name], what)


def _check_one(spec: InputSpec, shape: Sequence[int], what: str) -> None:
    given = "x".join(map(str, shape))
    if spec.shape and len(shape) != len(spec.shape):
        raise InvalidArgumentError(
            f"{what}: {given} has rank {len(shape)}, the graph's input '{spec.name}' has "
            f"rank {len(spec.shape)} {dims_text(spec.shape)}"
        )
    for i, (d, n) in enumerate(zip(spec.shape, shape, strict=False)):
        if isinstance(d, int) and d > 0 and d != n:
            raise InvalidArgumentError(
                f"{what}: {given} does not fit the graph: input '{spec.name}' dim {i} is "
                f"fixed at {d} {dims_text(spec.shape)}, asked for {n}"
            )


def shapes_by_name(
    names: Sequence[str],
    requested: ShapeRequest | None,
    what: str = "input_shapes",
    owner: str = "the graph",
) -> dict[str, Shape]:
    """``requested`` keyed by input name: a sequence is by position (one shape per input), a
    mapping must name inputs of ``owner``."""
    if requested is None:
        return {}
    if isinstance(requested, Mapping):
        if unknown := [n for n in requested if n not in names]:
            raise InvalidArgumentError(
                f"{what}: no input named {', '.join(map(repr, unknown))} "
                f"({owner.removeprefix('the ')} inputs: {', '.join(names)})"
            )
        return {n: tuple(requested[n]) for n in names if n in requested}
    if len(requested) != len(names):
        raise InvalidArgumentError(
            f"{what}: {len(requested)} shape(s) given, {owner} has {len(names)} input(s) "
            f"({', '.join(names)}); give one per input in order, or NAME=SHAPE"
        )
    return {n: tuple(s) for n, s in zip(names, requested, strict=True)}


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Dim:
    """One dim of one input: its size (None: not sized yet), the graph's symbolic name (None
    for a static or an unnamed dim) and what fixed the size."""

    size: int | None
    symbol: str | None = None
    source: str = GRAPH


@dataclass(frozen=True)
class FreeDim:
    """A symbolic non-batch dim nothing sized: ``key`` is its symbol, or ``input:axis`` for an
    unnamed dim; ``spatial`` when it is an image/volume/signal axis (axis >= 2, rank >= 3)."""

    key: str
    input: str
    axis: int
    spatial: bool

    @property
    def label(self) -> str:
        return self.key if ":" not in self.key else f"{self.input} dim {self.axis}"


@dataclass(frozen=True)
class InputShape:
    """A graph input as the feeds will make it: name, dtype, dims and batch axis."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...]
    batch_axis: int
    declared: tuple[int | str | None, ...] = ()

    def spec(self) -> InputSpec:
        """An :class:`InputSpec` whose non-batch dims are sizes (a free one:
        :data:`SYMBOLIC_DEFAULT`); the batch dim stays as declared."""
        shape: list[int | str | None] = []
        for i, d in enumerate(self.dims):
            if i == self.batch_axis and d.source != GRAPH:
                shape.append(self.declared[i] if i < len(self.declared) else d.symbol)
            else:
                shape.append(d.size if d.size is not None else SYMBOLIC_DEFAULT)
        return InputSpec(self.name, self.dtype, tuple(shape))

    def describe(self) -> str:
        """'x[N, 3, H=64, W=64]': the declared dims, with the size chosen for each symbol."""
        parts = []
        for i, d in enumerate(self.dims):
            declared = self.declared[i] if i < len(self.declared) else None
            if d.source == GRAPH:
                parts.append(str(d.size))
            elif i == self.batch_axis:
                parts.append(str(declared if declared is not None else "?"))
            else:
                label = declared if declared is not None else "?"
                parts.append(f"{label}={d.size if d.size is not None else SYMBOLIC_DEFAULT}")
        return f"{self.name}[{', '.join(parts)}]"


def _key(inp: str, axis: int, symbol: str | None) -> str:
    return symbol if symbol is not None else f"{inp}:{axis}"


@dataclass(frozen=True)
class InputPlan:
    """Every graph input's shape (see the module docstring). ``batch`` is the batch size the
    user's ``input_shapes`` (source :data:`USER`) or the example inputs (:data:`EXAMPLE`)
    give the symbolic batch axis, ``batch_source`` which of them."""

    inputs: tuple[InputShape, ...]
    batch: int | None = None
    batch_source: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def specs(self) -> list[InputSpec]:
        return [s.spec() for s in self.inputs]

    def axes(self) -> dict[str, int]:
        return {s.name: s.batch_axis for s in self.inputs}

    @property
    def user_batch(self) -> int | None:
        """The batch size ``input_shapes`` asked for, or None."""
        return self.batch if self.batch_source == USER else None

    def free(self) -> list[FreeDim]:
        """Symbolic non-batch dims nothing sized, one per symbol (first occurrence)."""
        seen: dict[str, FreeDim] = {}
        for s in self.inputs:
            for i, d in enumerate(s.dims):
                if d.source == FREE and i != s.batch_axis:
                    key = _key(s.name, i, d.symbol)
                    seen.setdefault(key, FreeDim(key, s.name, i, len(s.dims) >= 3 and i >= 2))
        return list(seen.values())

    def sized(self, sizes: Mapping[str, int], source: str) -> InputPlan:
        """A copy with the dims keyed in ``sizes`` (symbol, or ``input:axis``) sized."""
        inputs = []
        for s in self.inputs:
            dims = tuple(
                replace(d, size=sizes[k], source=source)
                if i != s.batch_axis and (k := _key(s.name, i, d.symbol)) in sizes
                else d
                for i, d in enumerate(s.dims)
            )
            inputs.append(replace(s, dims=dims))
        return replace(self, inputs=tuple(inputs))

    def with_note(self, note: str) -> InputPlan:
        return replace(self, notes=(*self.notes, note))

    def size_of(self, key: str) -> int | None:
        """The size of the dim keyed ``key`` (symbol, or ``input:axis``), None if none has."""
        for s in self.inputs:
            for i, d in enumerate(s.dims):
                if _key(s.name, i, d.symbol) == key and i != s.batch_axis:
                    return d.size
        return None

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.inputs)


def plan_inputs(
    specs: Sequence[InputSpec],
    *,
    input_shapes: ShapeRequest | None = None,
    examples: Sequence[Any] = (),
    batch_axis: BatchAxis | None = None,
    what: str = "input_shapes",
) -> InputPlan:
    """The shape of every graph input from its declaration, ``input_shapes`` and the example
    inputs (in that order of precedence for symbolic dims; static dims are the graph's, and a
    requested shape that contradicts one is an InvalidArgumentError naming input and dim)."""
    axes = batch_axes(specs, batch_axis)
    check_input_shapes(specs, input_shapes or {}, what)
    requested = shapes_by_name([s.name for s in specs], input_shapes, what)
    from_examples: dict[str, Shape] = {}
    if examples and len(examples) == len(specs):
        for spec, ex in zip(specs, examples, strict=True):
            shape = tuple(int(n) for n in getattr(ex, "shape", ()))
            if len(shape) == len(spec.shape) and all(
                not isinstance(d, int) or d == n
                for d, n in zip(spec.shape, shape, strict=True)
            ):
                from_examples[spec.name] = shape
    # Symbol → (size, source, where): the user first, then the examples.
    symbols: dict[str, tuple[int, str, str]] = {}
    batch: tuple[int, str] | None = None
    for source, shapes in ((USER, requested), (EXAMPLE, from_examples)):
        for spec in specs:
            given = shapes.get(spec.name)
            if given is None:
                continue
            for i, (d, n) in enumerate(zip(spec.shape, given, strict=True)):
                if isinstance(d, int) and d > 0:
                    continue
                if i == axes[spec.name]:
                    if batch is None or (batch[1] == EXAMPLE and source == USER):
                        batch = (n, source)
                    continue
                if not isinstance(d, str):
                    continue
                known = symbols.get(d)
                if known is None or (known[1] == EXAMPLE and source == USER):
                    symbols[d] = (n, source, spec.name)
                elif known[1] == source and known[0] != n and source == USER:
                    raise InvalidArgumentError(
                        f"{what}: input '{spec.name}' dim {i} is '{d}', which input "
                        f"'{known[2]}' sets to {known[0]}; asked for {n}"
                    )
    inputs = []
    for spec in specs:
        dims = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(Dim(d, None, GRAPH))
                continue
            symbol = d if isinstance(d, str) else None
            if i == axes[spec.name]:
                dims.append(Dim(None, symbol, FREE))
                continue
            for source, shapes in ((USER, requested), (EXAMPLE, from_examples)):
                if spec.name in shapes:
                    own: tuple[int, str] | None = (shapes[spec.name][i], source)
                    break
            else:
                own = None
            shared = symbols.get(symbol) if symbol is not None else None
            if shared is not None and (
                own is None or (own[1] == EXAMPLE and shared[1] == USER)
            ):
                dims.append(Dim(shared[0], symbol, shared[1]))
            elif own is not None:
                dims.append(Dim(own[0], symbol, own[1]))
            else:
                dims.append(Dim(None, symbol, FREE))
        inputs.append(
            InputShape(spec.name, spec.dtype, tuple(dims), axes[spec.name], tuple(spec.shape))
        )
    return InputPlan(
        tuple(inputs),
        batch=batch[0] if batch else None,
        batch_source=batch[1] if batch else None,
    )


# ---------------------------------------------------------------- export: dynamic axes

# The usual meaning of an axis by input rank, for the names of dynamic dims.
_AXIS_NAMES = {
    2: {1: "sequence"},
    3: {1: "sequence", 2: "length"},
    4: {2: "height", 3: "width"},
    5: {2: "depth", 3: "height", 4: "width"},
}


def axis_name(rank: int, axis: int) -> str:
    """'sequence', 'height', 'width', …, else 'dim{axis}'."""
    return _AXIS_NAMES.get(rank, {}).get(axis, f"dim{axis}")


@dataclass(frozen=True)
class DynamicDim:
    """One symbolic dim of an exported graph: its name, the example's size, and the (input
    position, axis) pairs that share it. ``batch`` when it is the batch axis."""

    symbol: str
    size: int
    members: tuple[tuple[int, int], ...]
    batch: bool = False

    def where(self, names: Sequence[str]) -> str:
        """'x:0, mask:0'."""
        return ", ".join(f"{names[i]}:{a}" for i, a in self.members)


def requested_axes(
    names: Sequence[str],
    ranks: Sequence[int | None],
    dynamic_axes: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None,
    batch_axes_: Sequence[int | None],
) -> list[tuple[int, ...]]:
    """The dynamic axes of every input: ``dynamic_axes`` (for all, or by name with ``"*"`` for
    the rest), default the input's batch axis; an index beyond the input's rank is dropped."""
    if isinstance(dynamic_axes, Mapping) and (
        unknown := sorted(set(dynamic_axes) - {*names, "*"})
    ):
        raise InvalidArgumentError(
            f"dynamic_axes: no input named {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(names)})"
        )
    out: list[tuple[int, ...]] = []
    for name, rank, batch in zip(names, ranks, batch_axes_, strict=True):
        if rank is None or rank == 0:
            out.append(())
            continue
        if isinstance(dynamic_axes, Mapping):
            axes = dynamic_axes.get(name, dynamic_axes.get("*"))
        else:
            axes = dynamic_axes
        if axes is None:
            axes = () if batch is None else (batch,)
        out.append(tuple(a for a in axes if a < rank))
    return out


def dynamic_dims(
    names: Sequence[str],
    shapes: Sequence[Shape | None],
    axes: Sequence[tuple[int, ...]],
    batch_axes_: Sequence[int | None],
) -> tuple[DynamicDim, ...]:
    """Group the dynamic axes of every input into symbolic dims (see the module docstring):
    the same axis index (for the batch: each input's batch axis) with the same example size on
    several inputs is one dim."""
    groups: dict[tuple[Any, int], list[tuple[int, int]]] = {}
    for i, (shape, wanted, batch) in enumerate(zip(shapes, axes, batch_axes_, strict=True)):
        if shape is None:
            continue
        for a in wanted:
            kind: Any = BATCH_DIM_NAME if a == batch else a
            groups.setdefault((kind, shape[a]), []).append((i, a))
    dims: list[DynamicDim] = []
    taken: set[str] = set()
    for (kind, size), members in groups.items():
        first, axis = members[0]
        rank = len(shapes[first] or ())
        base = BATCH_DIM_NAME if kind == BATCH_DIM_NAME else axis_name(rank, axis)
        symbol = base if base not in taken else f"{names[first]}_{base}"
        n = 2
        while symbol in taken:
            symbol, n = f"{names[first]}_{base}{n}", n + 1
        taken.add(symbol)
        dims.append(DynamicDim(symbol, size, tuple(members), kind == BATCH_DIM_NAME))
    return tuple(dims)


def other_size(size: int) -> int:
    """Another size for a dynamic dim that keeps the example's divisibility: the example plus
    the largest power of two dividing it, at most 32 (64 → 96, 48 → 64, 6 → 8, 7 → 8)."""
    step = 1
    while size % (step * 2) == 0 and step < 32:
        step *= 2
    return size + step


def example_dtype_high(vocab: int | None, example_max: int | None) -> int:
    """Exclusive upper bound for integer example values: below the vocabulary size where an
    Embedding reveals it, within the example's own range where there is one, else small."""
    bounds = [b for b in (vocab, None if example_max is None else example_max + 1) if b]
    return max(1, min(bounds)) if bounds else 4
