"""fold-bn against the tools users would pick instead: whole-process wall time and peak RSS.

Every tool runs in a fresh interpreter on the same generated ResNet-style graph, interleaved
(one run of each tool per round) so that load on the machine hits all of them alike. Ratios are
against a plain ``onnx.load`` + ``onnx.save`` of the same file (the I/O floor), taken in the
same rounds. After timing, each output is checked: BatchNormalization nodes left, and the largest
output difference against the input graph (both run by onnxruntime with optimizations off),
relative to the largest output magnitude.

    python benchmarks/fold_bn_bench.py --sizes 5 50 --repeats 3
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from _common import (
    BUILD,
    PY,
    ROOT,
    ProcessRun,
    fmt_bytes,
    fmt_ratio,
    fmt_s,
    markdown_table,
    median,
    python_snippet,
    run_process,
)
from gen_graphs import graph_path

LOAD_SAVE = "onnx load+save"
OURS = "normdeploy fold-bn --no-verify"
OURS_VERIFY = "normdeploy fold-bn (verify on)"

_SNIPPETS = {
    LOAD_SAVE: "import onnx, sys\nm = onnx.load(sys.argv[1])\nonnx.save(m, sys.argv[2])",
    "onnxoptimizer fuse_bn_into_conv": (
        "import onnx, onnxoptimizer, sys\nm = onnx.load(sys.argv[1])\n"
        "m = onnxoptimizer.optimize(m, ['fuse_bn_into_conv'])\nonnx.save(m, sys.argv[2])"
    ),
    "onnxsim simplify": (
        "import onnx, sys\nfrom onnxsim import simplify\nm = onnx.load(sys.argv[1])\n"
        "m, ok = simplify(m)\nassert ok\nonnx.save(m, sys.argv[2])"
    ),
    "onnxslim slim": "import onnxslim, sys\nonnxslim.slim(sys.argv[1], sys.argv[2])",
    "onnxruntime offline (basic)": (
        "import onnxruntime as ort, sys\nso = ort.SessionOptions()\n"
        "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
        "so.optimized_model_filepath = sys.argv[2]\n"
        "ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])"
    ),
}


def ours_available() -> bool:
    """True when the fold-bn subcommand exists and answers --help."""
    probe = subprocess.run(
        [PY, "cli.py", "fold-bn", "--help"], cwd=ROOT, capture_output=True, check=False
    )
    return probe.returncode == 0


def tool_commands(include_ours: bool) -> dict[str, Callable[[Path, Path], list[str]]]:
    """Tool name → argv builder for (input, output)."""
    tools: dict[str, Callable[[Path, Path], list[str]]] = {}
    for name, code in _SNIPPETS.items():
        tools[name] = lambda i, o, code=code: python_snippet(code, str(i), str(o))
    if include_ours:
        tools[OURS] = lambda i, o: [
            PY,
            "cli.py",
            "fold-bn",
            str(i),
            "-o",
            str(o),
            "--no-verify",
        ]
        tools[OURS_VERIFY] = lambda i, o: [PY, "cli.py", "fold-bn", str(i), "-o", str(o)]
    return tools


@dataclass(frozen=True)
class ToolResult:
    tool: str
    runs: list[ProcessRun]
    bn_left: int | None
    max_rel_err: float | None

    @property
    def ok_runs(self) -> list[ProcessRun]:
        return [r for r in self.runs if r.returncode == 0]

    @property
    def wall(self) -> float:
        return median([r.wall_s for r in self.ok_runs]) if self.ok_runs else float("nan")

    @property
    def rss(self) -> float:
        return median([r.peak_rss for r in self.ok_runs]) if self.ok_runs else float("nan")


def _run_ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from normdeploy.verification.runners import OrtRunner

    return next(iter(OrtRunner(str(path), threads=2).infer(feeds).values()))


def check_output(original: Path, produced: Path, expected: np.ndarray, feeds: dict) -> tuple:
    """(BN nodes left, max |Δ| / max |expected|) of ``produced`` against ``original``."""
    model = onnx.load_model(str(produced), load_external_data=False)
    bn_left = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    del model
    actual = _run_ort(produced, feeds)
    err = float(
        np.max(np.abs(actual.astype(np.float64) - expected)) / np.max(np.abs(expected))
    )
    return bn_left, err


def bench_size(
    size_mb: float, repeats: int, include_ours: bool, only_ours: bool = False
) -> list[ToolResult]:
    from normdeploy.onnx_graph import graph_input_specs
    from normdeploy.verification.feeds import make_feeds

    src = graph_path(size_mb)
    out_dir = BUILD / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    tools = tool_commands(include_ours)
    if only_ours:
        tools = {k: v for k, v in tools.items() if k in (LOAD_SAVE, OURS, OURS_VERIFY)}
    runs: dict[str, list[ProcessRun]] = {t: [] for t in tools}
    outputs = {t: out_dir / f"{src.stem}.{i}.onnx" for i, t in enumerate(tools)}
    for _ in range(repeats):
        for tool, argv in tools.items():
            outputs[tool].unlink(missing_ok=True)
            runs[tool].append(run_process(argv(src, outputs[tool])))
    header = onnx.load_model(str(src), load_external_data=False)
    feeds = make_feeds(graph_input_specs(header), batch_size=2, seed=0)
    expected = _run_ort(src, feeds).astype(np.float64)
    results = []
    for tool in tools:
        bn_left, err = None, None
        if outputs[tool].exists() and any(r.returncode == 0 for r in runs[tool]):
            bn_left, err = check_output(src, outputs[tool], expected, feeds)
        results.append(ToolResult(tool, runs[tool], bn_left, err))
        outputs[tool].unlink(missing_ok=True)
    return results


def table(size_mb: float, results: list[ToolResult]) -> str:
    src = graph_path(size_mb)
    floor = next(r for r in results if r.tool == LOAD_SAVE)
    rows = []
    for r in results:
        failed = len(r.runs) - len(r.ok_runs)
        note = f"{failed} failed: {r.runs[-1].stderr_tail[:120]}" if failed else ""
        rows.append([
            r.tool, fmt_s(r.wall), fmt_ratio(r.wall / floor.wall),
            fmt_bytes(r.rss), fmt_ratio(r.rss / floor.rss),
            "-" if r.bn_left is None else r.bn_left,
            "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}", note,
        ])  # fmt: skip
    title = (
        f"#### fold-bn on {src.name} ({fmt_bytes(src.stat().st_size)}, 105 BN), "
        f"median of {len(floor.runs)} runs"
    )
    headers = ["tool", "wall", "× load+save", "peak RSS", "× load+save", "BN left",
               "max rel err", "note"]  # fmt: skip
    return title + "\n\n" + markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[5, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only-ours", action="store_true", help="load+save and normdeploy fold-bn only"
    )
    args = parser.parse_args(argv)
    include_ours = ours_available()
    if not include_ours:
        print("_normdeploy fold-bn is not available yet (cli.py fold-bn --help fails)._\n")
    for size in args.sizes:
        print(
            table(size, bench_size(size, args.repeats, include_ours, args.only_ours)),
            end="\n\n",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
