"""Branch merging on RepVGG-A0: what each tool leaves, what merging costs fold-bn, the numbers
against PyTorch eval, and onnxruntime CPU latency before and after.

The network is timm's ``repvgg_a0`` layout rebuilt in ``models/reparam.py`` (22 blocks, 61
BatchNorms of which 17 are identity branches), calibrated, exported by the TorchScript exporter
in eval mode without constant folding so that every BatchNormalization stays a node.

1. Every tool runs in a fresh interpreter on that file, interleaved over the rounds: wall time
   and peak RSS (medians), then BatchNormalization / Conv / Add left and the largest output
   difference against the input graph (onnxruntime, optimizations off) relative to the output
   magnitude. fold-bn runs with and without merging, so the difference is merging's cost.
2. The pass alone, in process (median of repeats): fold-bn with and without merging.
3. verify(): the merged graph against PyTorch eval of the module, at batch 1 and 8.
4. Latency: original vs fold-bn --no-merge vs fold-bn, onnxruntime CPU, 2 threads, at
   ORT_DISABLE_ALL and ORT_ENABLE_ALL, timed in alternating blocks; medians of block means,
   ratios are medians of per-round ratios of adjacent blocks.

    python benchmarks/merge_bench.py --rounds 11 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import (
    BUILD,
    PY,
    THREADS,
    fmt_bytes,
    fmt_ratio,
    fmt_s,
    markdown_table,
    median,
    paired_ratio,
    run_process,
    time_variants,
)
from fold_bn_bench import LOAD_SAVE, _run_ort, tool_commands
from latency_bench import export_keep_bn

from models.reparam import repvgg_a0
from normdeploy.folding import fold_bn, fold_bn_file

RESOLUTION = 224
FOLD = "normdeploy fold-bn --no-verify --no-merge"
MERGE = "normdeploy fold-bn --no-verify"


def build(out_dir: Path) -> tuple[torch.nn.Module, Path]:
    module = repvgg_a0()
    path = out_dir / "repvgg_a0.onnx"
    export_keep_bn(module, torch.randn(1, 3, RESOLUTION, RESOLUTION), path)
    return module, path


def histogram(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def tools_table(src: Path, repeats: int) -> str:
    from normdeploy.onnx_graph import graph_input_specs
    from normdeploy.verification.feeds import make_feeds

    tools = tool_commands(include_ours=False)
    tools[FOLD] = lambda i, o: [PY, "cli.py", "fold-bn", str(i), "-o", str(o), "--no-verify",
                                "--no-merge"]  # fmt: skip
    tools[MERGE] = lambda i, o: [PY, "cli.py", "fold-bn", str(i), "-o", str(o), "--no-verify"]
    outputs = {t: src.with_name(f"{src.stem}.tool{i}.onnx") for i, t in enumerate(tools)}
    runs: dict[str, list] = {t: [] for t in tools}
    for _ in range(repeats):
        for tool, argv in tools.items():
            outputs[tool].unlink(missing_ok=True)
            runs[tool].append(run_process(argv(src, outputs[tool])))
    feeds = make_feeds(graph_input_specs(onnx.load(str(src))), batch_size=2, seed=0)
    expected = _run_ort(src, feeds).astype(np.float64)
    floor = median([r.wall_s for r in runs[LOAD_SAVE]])
    floor_rss = median([r.peak_rss for r in runs[LOAD_SAVE]])
    before = histogram(src)
    rows = [["(exported graph)", "-", "-", "-", "-", before["BatchNormalization"],
             before["Conv"], before["Add"], "-"]]  # fmt: skip
    for tool in tools:
        ok = [r for r in runs[tool] if r.returncode == 0]
        if not ok or not outputs[tool].exists():
            rows.append(
                [tool, "failed", "", "", "", "", "", "", runs[tool][-1].stderr_tail[:80]]
            )
            continue
        wall, rss = median([r.wall_s for r in ok]), median([r.peak_rss for r in ok])
        after = histogram(outputs[tool])
        actual = _run_ort(outputs[tool], feeds).astype(np.float64)
        err = float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
        rows.append([
            tool, fmt_s(wall), fmt_ratio(wall / floor), fmt_bytes(rss), fmt_ratio(rss / floor_rss),
            after["BatchNormalization"], after["Conv"], after["Add"], f"{err:.1e}",
        ])  # fmt: skip
        outputs[tool].unlink(missing_ok=True)
    headers = ["tool", "wall", "× load+save", "peak RSS", "× load+save", "BN", "Conv", "Add",
               "max rel err"]  # fmt: skip
    title = (
        f"#### RepVGG-A0 ({fmt_bytes(src.stat().st_size)}): what each tool leaves, whole "
        f"process, median of {repeats} runs"
    )
    return title + "\n\n" + markdown_table(headers, rows)


def pass_table(src: Path, repeats: int) -> str:
    model = onnx.load(str(src))
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for merge in (False, True):
            start = time.perf_counter()
            fold_bn(model, verify=False, merge=merge)
            seconds[merge].append(time.perf_counter() - start)
    rows = [
        ["fold-bn --no-merge", fmt_s(median(seconds[False])), "1.00×"],
        ["fold-bn (merging)", fmt_s(median(seconds[True])),
         fmt_ratio(median(seconds[True]) / median(seconds[False]))],
    ]  # fmt: skip
    title = (
        f"#### The pass alone, in process (copy of the model included, no verification), "
        f"median of {repeats}"
    )
    return title + "\n\n" + markdown_table(["pass", "seconds", "× --no-merge"], rows)


def latency_table(paths: dict[str, Path], rounds: int, batches: tuple[int, ...]) -> str:
    rows = []
    for level, optimize in (("DISABLE_ALL", False), ("ENABLE_ALL", True)):
        for batch in batches:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((batch, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
            s = time_variants(paths, x, optimize, rounds)
            rows.append([
                level, batch, *(f"{median(s[k]) * 1e3:.2f}" for k in paths),
                fmt_ratio(paired_ratio(s["fold-bn"], s["original"])),
                fmt_ratio(paired_ratio(s["fold-bn + merge"], s["original"])),
                fmt_ratio(paired_ratio(s["fold-bn + merge"], s["fold-bn"])),
            ])  # fmt: skip
    headers = ["ORT level", "batch", *(f"{k} ms" for k in paths), "fold-bn / original",
               "merged / original", "merged / fold-bn"]  # fmt: skip
    title = (
        f"#### RepVGG-A0 at {RESOLUTION}×{RESOLUTION}, onnxruntime CPU, {THREADS} threads "
        f"({rounds} rounds of alternating blocks)"
    )
    return title + "\n\n" + markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    out_dir = BUILD / "merge"
    out_dir.mkdir(parents=True, exist_ok=True)
    module, src = build(out_dir)
    print(tools_table(src, args.repeats), end="\n\n", flush=True)
    print(pass_table(src, max(args.repeats, 5)), end="\n\n", flush=True)

    folded, merged = out_dir / "repvgg_a0.fold.onnx", out_dir / "repvgg_a0.merged.onnx"
    fold_bn_file(src, folded, overwrite=True, merge=False)
    result = fold_bn_file(src, merged, overwrite=True)
    lines = result.to_text().splitlines()
    print(f"fold-bn on the exported graph: {lines[0].split(': ', 1)[1]}; self-check: "
          f"{lines[-1].removeprefix('verification: ')}\n")  # fmt: skip
    paths = {"original": src, "fold-bn": folded, "fold-bn + merge": merged}
    table, passed = verify_table(module, paths)
    print(table, end="\n\n", flush=True)
    print(latency_table(paths, args.rounds, tuple(args.batches)), end="\n\n", flush=True)
    return 0 if result and passed else 1


def verify_table(module: torch.nn.Module, paths: dict[str, Path]) -> tuple[str, bool]:
    """verify() of each graph against PyTorch eval: the merged graph's error in context."""
    from normdeploy import verify

    rows, tolerance, passed = [], "", True
    for name, path in paths.items():
        report = verify(
            module, path, batch_sizes=(1, 8), input_shapes=[(1, 3, RESOLUTION, RESOLUTION)]
        )
        counts = histogram(path)
        worst, passed = report.worst_abs_error, passed and bool(report)
        rows.append([
            name, counts["BatchNormalization"], counts["Conv"], "PASS" if report else "FAIL",
            "-" if worst is None else f"{worst:.2e}",
        ])  # fmt: skip
        check = report.checks[0].comparison
        tolerance = f"atol={check.atol:g}, rtol={check.rtol:g}"
    title = (
        "#### verify() against PyTorch eval (onnxruntime CPU, batch 1 and 8, seeded stress "
        f"inputs; tolerance {tolerance})"
    )
    headers = ["graph", "BN", "Conv", "verify()", "worst |Δ| vs PyTorch eval"]
    return title + "\n\n" + markdown_table(headers, rows), passed


if __name__ == "__main__":
    raise SystemExit(main())
