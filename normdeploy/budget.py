"""The memory budget: arrays normdeploy allocates itself are sized up front and refused when
they would not fit.

normdeploy allocates the inputs it feeds (seeded stress inputs, example inputs made from
``input_shapes``, user ``.npz`` feeds) and the intermediate values it exposes for the census and
the bisection. Each is estimated from shapes and dtypes *before* it is allocated; an estimate over
the budget is a one-line :class:`~normdeploy.errors.ResourceLimitError` naming what and how much,
not a ``MemoryError`` (or a machine swapping to death) half way through.

The budget is, in this order: the innermost :func:`memory_limit` block (the CLI's
``--max-memory``), the ``NORMDEPLOY_MAX_MEMORY`` environment variable, or half the memory
available when the process starts (``MemAvailable``, and a cgroup limit when one is set). Sizes
are bytes or a number with a unit: ``512M``, ``8G``, ``1.5GiB`` (powers of 1024). The runtime's
own working memory (onnxruntime's activations, PyTorch's autograd-free forward) is not counted:
the budget refuses inputs that cannot fit, it does not promise that the rest fits.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from normdeploy.errors import InvalidArgumentError, ResourceLimitError

ENV_VAR = "NORMDEPLOY_MAX_MEMORY"
# Half of what is available: the rest is for the runtime's activations, the model's weights and
# everything else running on the machine.
DEFAULT_FRACTION = 0.5
# Stress inputs are drawn in float64 and scaled before the cast to the input's dtype: at most two
# float64 temporaries live next to the result.
GENERATION_BYTES_PER_ELEMENT = 16
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_override: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "normdeploy_max_memory", default=None
)


def parse_size(text: str | int, what: str = "max_memory") -> int:
    """'8G' → 8·2**30, '512M' → 512·2**20, '1000' → 1000 bytes; InvalidArgumentError else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    elif isinstance(text, str) and (m := _SIZE.match(text)):
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise InvalidArgumentError(
            f"{what}: '{text}' is not a size like 8G, 512M or a number of bytes"
        )
    if not math.isfinite(value) or value < 1:
        raise InvalidArgumentError(f"{what}: '{text}' must be at least one byte")
    return int(value)


def format_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '120.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop returns


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit, or None when there is none."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=1)
def available_memory() -> int | None:
    """Memory available to this process when first asked (bytes), or None when unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if (room := _cgroup_room()) is not None:
        found.append(room)
    return min(found) if found else None


def memory_budget() -> tuple[int | None, str]:
    """(bytes normdeploy may allocate for arrays, where that number comes from)."""
    if (given := _override.get()) is not None:
        return given[0], f"max_memory={given[1]}"
    if (env := os.environ.get(ENV_VAR)) is not None and env.strip():
        return parse_size(env, ENV_VAR), f"{ENV_VAR}={env.strip()}"
    available = available_memory()
    if available is None:
        return None, "no limit: available memory unknown"
    return int(available * DEFAULT_FRACTION), "half the available memory"


@contextlib.contextmanager
def memory_limit(size: str | int | None) -> Iterator[None]:
    """Use ``size`` as the budget inside the block (None keeps the current one)."""
    if size is None:
        yield
        return
    token = _override.set((parse_size(size), str(size).strip()))
    try:
        yield
    finally:
        _override.reset(token)


def array_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array, computed without overflow for absurd shapes."""
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


def generation_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Peak bytes while one stress input is generated (float64 temporaries + the result)."""
    n = math.prod(int(d) for d in shape)
    kind = np.dtype(dtype).kind
    per = GENERATION_BYTES_PER_ELEMENT if kind in "fc" else 8  # integers: int64 then cast
    return n * (per + np.dtype(dtype).itemsize)


# Blocks of at least this many bytes get pages of their own from glibc, returned when freed.
MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_allocator = {"tune": False}


def tune_allocator() -> None:
    """Let :func:`release_memory` also pin glibc's mmap threshold: a setting of the whole
    process that glibc cannot take back, so only for a process that owns its allocator (the
    CLI's); a library caller's process keeps glibc's own policy."""
    _allocator["tune"] = True


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` was called in this process."""
    return _allocator["tune"]


def release_memory() -> None:
    """Hand the heap pages the process has freed back to the system (glibc keeps them
    otherwise), so that a stage's peak does not sit on top of the memory an earlier stage
    used and freed. After :func:`tune_allocator`, also pin glibc's mmap threshold at
    :data:`MMAP_THRESHOLD`: glibc raises that threshold (up to 32 MiB) each time a mapped block
    is freed, after which large blocks come from the heap, which cannot shrink below its newest
    block; a forward whose activations grow layer by layer (DenseNet's concatenations) then
    never reuses what it freed, and its float64 run at batch 3 held 300 MiB more than it used.
    A no-op where the C library has no ``mallopt``/``malloc_trim``."""
    import contextlib
    import ctypes

    if _allocator["tune"]:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def check_allocation(what: str, nbytes: int) -> None:
    """Raise ResourceLimitError when ``nbytes`` for ``what`` exceed the budget."""
    budget, source = memory_budget()
    if budget is None or nbytes <= budget:
        return
    hint = "" if source.startswith("max_memory") else "; raise it with max_memory=SIZE"
    raise ResourceLimitError(
        f"{what} needs {format_size(nbytes)}, over the memory budget of "
        f"{format_size(budget)} ({source}{hint})"
    )


def describe_shapes(arrays: Iterable[tuple[str, Sequence[int], Any]]) -> str:
    """'x[1, 3, 100000, 100000] float32, mask[...] bool' for messages."""
    return ", ".join(
        f"{name}{list(shape)} {np.dtype(dtype).name}" for name, shape, dtype in arrays
    )
