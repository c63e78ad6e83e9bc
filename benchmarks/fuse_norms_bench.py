"""What fuse-norms buys: onnxruntime CPU latency of graphs with decomposed norms, before and after.

Three networks, defined here (nothing fetched), exported the way their decomposed norms arise:

- ``encoder``: a 4-layer transformer encoder (d=256, 4 heads, 128 tokens; attention written
  out), TorchScript at opset 12 → 9 decomposed LayerNorms; fused with ``--opset 17``;
- ``ppocr_neck``: a PP-OCRv4-recognizer-shaped model (conv stem on a 3×48×320 text line, then
  the SVTR neck: two global-mixing blocks at d=120 over 40 tokens, written-out LayerNorms as in
  PaddleOCR), TorchScript at opset 12 → 5 decomposed LayerNorms; fused with ``--opset 17``;
- ``llama``: two Llama-style decoder blocks (d=512, 128 tokens) with Hugging Face's hand-written
  RMSNorm, dynamo at opset 18 → 5 decomposed RMSNorms; fused with ``--opset 23``;
- ``ln_only`` / ``rms_only``: one such LayerNorm (BERT-L size, 512×1024) / RMSNorm (a 7B LLM's
  hidden size, 512×4096) alone, exported the same ways: the norm's own cost, which the networks
  above dilute with their matmuls.

Variants: the export as it is, the same converted to the new opset without fusing (what
conversion alone does), and the fused graph. Each is timed at ORT_DISABLE_ALL (the graph as
written: what a runtime without pattern fusion runs), ORT_ENABLE_EXTENDED (where onnxruntime
fuses LayerNorm/RMSNorm decompositions itself) and ORT_ENABLE_ALL, batch 1 and 8, in
alternating blocks; latencies are medians of block means, ratios medians of per-round ratios of
adjacent blocks. "ORT norm ops" counts the norm kernels in the graph onnxruntime ends up running
at that level (its ``optimized_model_filepath``): it shows where onnxruntime fused the
decomposition on its own.

    python benchmarks/fuse_norms_bench.py --rounds 11
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import torch
from _common import (
    BLOCK_SECONDS,
    BUILD,
    THREADS,
    fmt_ratio,
    markdown_table,
    median,
    ort_session,
    paired_ratio,
    time_variants,
)
from torch import nn

OUT = BUILD / "fuse_norms"
LEVELS = ("DISABLE_ALL", "ENABLE_EXTENDED", "ENABLE_ALL")
NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization")  # fmt: skip


# ----------------------------------------------------------------------------- networks


class WrittenLayerNorm(nn.Module):
    """LayerNorm written out (PaddleOCR's and many older code bases' spelling)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / torch.sqrt(s + self.eps) * self.weight + self.bias


class LlamaRMSNorm(nn.Module):
    """Hugging Face's RMSNorm: rsqrt of the mean square, weight applied last."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = eps

    def forward(self, h):
        v = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, -1) @ v
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int, mlp: int, norm=WrittenLayerNorm) -> None:
        super().__init__()
        self.norm1, self.attn = norm(d), Attention(d, heads)
        self.norm2 = norm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, d: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[EncoderBlock(d, 4, 4 * d) for _ in range(layers)])
        self.norm = WrittenLayerNorm(d)

    def forward(self, x):
        return self.norm(self.blocks(x))


class PPOCRNeck(nn.Module):
    """PP-OCRv4-rec-shaped: conv stem (3×48×320 → 120×1×40), SVTR neck (2 blocks, d=120,
    mlp 2×), final LayerNorm, CTC head over 40 time steps."""

    def __init__(self, classes: int = 97) -> None:
        super().__init__()
        chans = [3, 32, 64, 96, 120]
        stem: list[nn.Module] = []
        for i, (cin, cout) in enumerate(pairwise(chans)):
            stride = (2, 2) if i < 2 else (2, 1)
            stem += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.Hardswish()]
        self.stem = nn.Sequential(*stem, nn.AdaptiveAvgPool2d((1, 40)))
        self.blocks = nn.Sequential(*[EncoderBlock(120, 8, 240) for _ in range(2)])
        self.norm = WrittenLayerNorm(120)
        self.head = nn.Linear(120, classes)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (N, 40, 120)
        return self.head(self.norm(self.blocks(tokens)))


class LlamaBlocks(nn.Module):
    def __init__(self, d: int = 512, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[EncoderBlock(d, 8, 3 * d, norm=LlamaRMSNorm) for _ in range(layers)]
        )
        self.norm = LlamaRMSNorm(d)

    def forward(self, x):
        return self.norm(self.blocks(x))


@dataclass(frozen=True)
class Network:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch
    exporter: str
    opset: int
    fuse_opset: int


NETWORKS = (
    Network("encoder", Encoder, (128, 256), "torchscript", 12, 17),
    Network("ppocr_neck", PPOCRNeck, (3, 48, 320), "torchscript", 12, 17),
    Network("llama", LlamaBlocks, (128, 512), "dynamo", 18, 23),
    Network("ln_only", lambda: WrittenLayerNorm(1024), (512, 1024), "torchscript", 12, 17),
    Network("rms_only", lambda: LlamaRMSNorm(4096), (512, 4096), "dynamo", 18, 23),
)


def export(net: Network) -> Path:
    torch.manual_seed(0)
    module = net.build().eval()
    x = torch.randn(2, *net.input_shape)
    path = OUT / f"{net.name}_opset{net.opset}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' chatter stays out of the tables
        if net.exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=net.opset,
                              input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
            onnx.save_model(onnx.load_from_string(buf.getvalue()), str(path))
        else:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                module, (x,), dynamo=True, opset_version=net.opset,
                dynamic_shapes=({0: batch},),
            )  # fmt: skip
            onnx.save_model(program.model_proto, str(path))
    return path


# ----------------------------------------------------------------------------- measuring


def variants(net: Network, original: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """original / converted only / fused, and facts about the fusion."""
    from normdeploy.folding import fuse_norms_file
    from normdeploy.passes.opset import convert_opset

    converted = OUT / f"{net.name}_opset{net.fuse_opset}_unfused.onnx"
    model = onnx.load(str(original))
    onnx.save_model(convert_opset(model, net.fuse_opset, str(original)), str(converted))
    fused = OUT / f"{net.name}_opset{net.fuse_opset}_fused.onnx"
    start = time.perf_counter()
    result = fuse_norms_file(original, fused, opset=net.fuse_opset, overwrite=True)
    wall = time.perf_counter() - start
    facts = {
        "fused": f"{len(result.applied)} of {len(result.ledger)}",
        "fuse-norms wall": f"{wall:.2f} s",
    }
    names = {
        f"opset {net.opset} (export)": original,
        f"opset {net.fuse_opset}, unfused": converted,
        f"opset {net.fuse_opset}, fused": fused,
    }
    return names, facts


def ort_norm_ops(path: Path, level: str) -> str:
    """Norm kernels in the graph onnxruntime runs at ``level`` ('-' when it has none)."""
    optimized = path.with_suffix(f".{level}.ort.onnx")
    ort_session(path, level, optimized_model=optimized)
    counts = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    found = [f"{counts[op]}×{op}" for op in NORM_OPS if counts[op]]
    return ", ".join(found) or "-"


def max_diff(paths: dict[str, Path], x: np.ndarray) -> float:
    sessions = [ort_session(p, False) for p in paths.values()]
    outs = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions]
    return float(max(np.max(np.abs(o.astype(np.float64) - outs[0])) for o in outs[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--networks", nargs="+", default=[n.name for n in NETWORKS])
    args = parser.parse_args(argv)
    rows: list[list[str]] = []
    facts_rows: list[list[str]] = []
    for net in NETWORKS:
        if net.name not in args.networks:
            continue
        paths, facts = variants(net, export(net))
        (first, unfused, fused) = paths
        for batch in (1, 8):
            x = np.random.default_rng(0).normal(0.3, 2.0, (batch, *net.input_shape))
            x = x.astype(np.float32)
            diff = max_diff(paths, x)
            for level in LEVELS:
                s = time_variants(paths, x, level, args.rounds)
                rows.append([
                    net.name, batch, level,
                    *(f"{median(s[k]) * 1e3:.3f}" for k in paths),
                    fmt_ratio(paired_ratio(s[fused], s[first])),
                    fmt_ratio(paired_ratio(s[fused], s[unfused])),
                    ort_norm_ops(paths[first], level), ort_norm_ops(paths[fused], level),
                    f"{diff:.1e}",
                ])  # fmt: skip
        facts_rows.append([net.name, f"{net.exporter} opset {net.opset} → {net.fuse_opset}",
                           facts["fused"], facts["fuse-norms wall"]])  # fmt: skip
    print(
        f"#### fuse-norms: onnxruntime CPU latency, {THREADS} threads ({args.rounds} rounds of "
        f"alternating blocks of ≥ {BLOCK_SECONDS * 1e3:.0f} ms)\n"
    )
    headers = ["network", "batch", "ORT level", "export ms", "converted ms", "fused ms",
               "fused / export", "fused / converted", "ORT norm ops (export)",
               "ORT norm ops (fused)", "max |Δ|"]  # fmt: skip
    print(markdown_table(headers, rows), end="\n\n")
    print(markdown_table(["network", "export", "norms fused", "fuse-norms wall (verify on)"],
                         facts_rows), end="\n\n", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
