"""Benchmark helpers: whole-process measurement, medians, machine description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from normdeploy.report import markdown_table  # noqa: E402

BUILD = ROOT / "build" / "bench"
PY = sys.executable
THREADS = 2
BLOCK_SECONDS = 0.03
__all__ = ["BUILD", "PY", "ROOT", "markdown_table"]


@dataclass(frozen=True)
class ProcessRun:
    """One whole-process run: wall seconds, peak RSS in bytes, exit code and stderr tail."""

    wall_s: float
    peak_rss: int
    returncode: int
    stderr_tail: str = ""


# Runs argv as its child and prints "wall_s maxrss_kib returncode". Linux charges a child
# the parent's peak RSS when it forks and execs, so the measuring parent must be this small
# wrapper, not the benchmark process (which holds torch and whole graphs).
_WRAPPER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_process(argv: Sequence[str], timeout: float = 1800.0) -> ProcessRun:
    """Run ``argv`` in a fresh process; wall time and peak RSS of that process alone."""
    done = subprocess.run(
        [PY, "-S", "-c", _WRAPPER, *argv], cwd=ROOT, capture_output=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    tail = " / ".join(done.stderr.decode(errors="replace").strip().splitlines()[-3:])
    wall, maxrss_kib, returncode = done.stdout.split()
    return ProcessRun(float(wall), int(maxrss_kib) * 1024, int(returncode), tail)


def python_snippet(code: str, *args: str) -> list[str]:
    """argv running ``code`` in a fresh interpreter with ``args`` as sys.argv[1:]."""
    return [PY, "-c", code, *(str(a) for a in args)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line: CPU, cores, memory, load average now, library versions."""
    import onnx
    import onnxruntime

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {fmt_bytes(mem)} RAM, load avg {load}; "
        f"Python {platform.python_version()}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )


def loadavg_1m() -> float:
    return os.getloadavg()[0]


def ort_session(path: Path, optimize: bool | str, optimized_model: Path | None = None) -> Any:
    """A CPU session; ``optimize`` is off/ENABLE_ALL, or a level's name ('ENABLE_EXTENDED').
    With ``optimized_model``, onnxruntime writes the graph it runs there."""
    import onnxruntime as ort

    from normdeploy.verification.runners import session_options

    so = session_options(optimize is True, THREADS)
    if isinstance(optimize, str):
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{optimize}")
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_variants(
    paths: dict[str, Path], x: np.ndarray, optimize: bool | str, rounds: int
) -> dict[str, list[float]]:
    """Per-round mean latency (seconds) of each variant, timed in alternating blocks."""
    sessions = {k: ort_session(p, optimize) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    per_block: dict[str, int] = {}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
        t0 = time.perf_counter()
        s.run(None, feeds[k])
        per_block[k] = max(1, int(BLOCK_SECONDS / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            n = per_block[k]
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, feeds[k])
            samples[k].append((time.perf_counter() - t0) / n)
    return samples


def paired_ratio(a: list[float], b: list[float]) -> float:
    return median([x / y for x, y in zip(a, b, strict=True)])
