"""Inference latency of what fold-bn produces: original vs folded vs the network built without BN.

onnxruntime CPU, 2 intra-op threads, at ORT_DISABLE_ALL and ORT_ENABLE_ALL. The "no-BN" graph
is the same network with every BatchNorm replaced by nothing and every conv given a bias: the
floor that a perfect fold reaches. The three variants are timed in alternating blocks; latencies
are medians of block means, and ratios are medians of the per-round ratios of adjacent blocks
(paired, so that load from other processes cancels).

    python benchmarks/latency_bench.py --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import (
    BLOCK_SECONDS,
    BUILD,
    PY,
    ROOT,
    THREADS,
    fmt_ratio,
    markdown_table,
    median,
    paired_ratio,
    time_variants,
)
from gen_graphs import graph_path
from torch import nn


@dataclass(frozen=True)
class Case:
    """A network at one input size (without batch) and its three ONNX files."""

    name: str
    input_shape: tuple[int, ...]
    original: Path
    folded: Path | None
    floor: Path


def without_bn(module: nn.Module) -> nn.Module:
    """A copy with BatchNorm → Identity and a bias on every conv: the floor a fold reaches."""
    m = copy.deepcopy(module)
    for name, child in list(m.named_modules()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            parent_name, _, attr = name.rpartition(".")
            setattr(m.get_submodule(parent_name) if parent_name else m, attr, nn.Identity())
        elif isinstance(child, nn.modules.conv._ConvNd) and child.bias is None:
            out_ch = child.out_channels
            child.bias = nn.Parameter(torch.zeros(out_ch))
    return m.eval()


def export_keep_bn(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TorchScript export without optimization: BatchNormalization nodes stay in the graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamo=False, do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17,
        )  # fmt: skip
    return path


def fold_with_cli(src: Path) -> Path | None:
    """Folded copy of ``src`` made by ``cli.py fold-bn --no-verify``; None when that fails."""
    out = src.with_name(src.stem + ".folded.onnx")
    out.unlink(missing_ok=True)
    argv = [PY, "cli.py", "fold-bn", str(src), "-o", str(out), "--no-verify"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, check=False)
    return out if done.returncode == 0 and out.exists() else None


def reference_cases(resolutions: dict[str, list[tuple[int, ...]]]) -> list[Case]:
    """Cases for registry models at their stock and at larger input sizes."""
    import models

    out_dir = BUILD / "latency"
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, shapes in resolutions.items():
        module = models.get(name).build()
        for shape in shapes:
            tag = f"{name}_{'x'.join(map(str, shape))}"
            example = torch.randn((1, *shape))
            original = export_keep_bn(module, example, out_dir / f"{tag}.onnx")
            floor = export_keep_bn(without_bn(module), example, out_dir / f"{tag}.nobn.onnx")
            cases.append(Case(tag, shape, original, fold_with_cli(original), floor))
    return cases


def generated_case(size_mb: float) -> Case:
    from gen_graphs import IN_CHANNELS, SPATIAL

    original = graph_path(size_mb)
    local = BUILD / "latency" / original.name
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(original.read_bytes())
    shape = (IN_CHANNELS, SPATIAL, SPATIAL)
    name = f"generated ResNet {size_mb:g} MiB"
    return Case(name, shape, local, fold_with_cli(local), graph_path(size_mb, with_bn=False))


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def bench(cases: list[Case], batches: tuple[int, ...], rounds: int) -> str:
    rows = []
    for case in cases:
        paths = {"original": case.original, "floor": case.floor}
        if case.folded is not None:
            paths["folded"] = case.folded
        for level, optimize in (("DISABLE_ALL", False), ("ENABLE_ALL", True)):
            for batch in batches:
                rng = np.random.default_rng(0)
                x = rng.standard_normal((batch, *case.input_shape)).astype(np.float32)
                s = time_variants(paths, x, optimize, rounds)
                folded = s.get("folded")
                vs_floor = None if folded is None else paired_ratio(folded, s["floor"])
                rows.append([
                    case.name, level, batch, _fmt_ms(median(s["original"])),
                    "-" if folded is None else _fmt_ms(median(folded)),
                    _fmt_ms(median(s["floor"])),
                    fmt_ratio(paired_ratio(s["original"], s["floor"])),
                    "-" if vs_floor is None else f"{(vs_floor - 1) * 100:+.1f} %",
                ])  # fmt: skip
    headers = ["model", "ORT level", "batch", "original ms", "folded ms", "no-BN ms",
               "original / no-BN", "folded vs no-BN"]  # fmt: skip
    title = (
        f"#### Inference latency, onnxruntime CPU, {THREADS} threads "
        f"({rounds} rounds of alternating blocks of ≥ {BLOCK_SECONDS * 1e3:.0f} ms)"
    )
    return title + "\n\n" + markdown_table(headers, rows)


QUICK_RESOLUTIONS = {
    "resnet_mini": [(3, 32, 32)],
    "mobilenet_mini": [(3, 32, 32), (3, 224, 224)],
    "decoder_convt": [(32, 8, 8), (32, 32, 32)],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--generated-mb", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cases = [*reference_cases(QUICK_RESOLUTIONS), generated_case(args.generated_mb)]
    if any(c.folded is None for c in cases):
        print("_folded column empty: `cli.py fold-bn` is not available or failed._\n")
    print(bench(cases, (1, 8), args.rounds), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
