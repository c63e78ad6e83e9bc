"""The tolerance policy's constants, measured: honest exports' e/f and planted faults' e/f.

For every replica in ``tests/replicas.py`` (deep pre-activation BN stack, RepVGG-, DenseNet- and
MobileViT-shaped nets, a wide-range head, a CLIP-like B×B model, a sequence-first transformer, an
int64-token model with dict outputs) and both exporters, it exports the model, then measures with
the library's own policy:

- final outputs: e/f of every ``reference`` check of ``verify`` over ``--seeds`` seeds at batch
  sizes 1 and 3 (the floor pooled per output, as verify does);
- intermediate values: e/f of every census confirmation (module vs PyTorch, module vs oracle) and
  of every bisection probe (each module's output) on each seed;
- faults: seeded noise of 1e-4·std in ONE weight tensor (first, middle, last initializer the
  graph reads), the output's move in floors (e against float64 divided by the pooled floor), and
  whether ``verify`` fails.

The largest honest e/f bounds K from below (an honest export must pass); the smallest fault e/f
that must be caught bounds it from above. f_min is the dtype's unit roundoff (2^-24 for float32).

    python benchmarks/tolerance_bench.py --seeds 4
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import onnx

from normdeploy.exporting import export
from normdeploy.onnx_graph import graph_input_specs
from normdeploy.report import markdown_table
from normdeploy.shapes import batch_axes
from normdeploy.verification.bisection import bisect_module
from normdeploy.verification.compare import FLOOR_MIN, REFERENCE, K
from normdeploy.verification.feeds import stress_feed_sets
from normdeploy.verification.runners import TorchRunner
from normdeploy.verification.verifier import verify
from tests import replicas
from tests.replicas import plant_noise, weight_tensors

EXPORTERS = ("dynamo", "torchscript")


def honest_ratios(
    module, path: Path, seeds: int
) -> tuple[list[float], list[float], list[float]]:
    """(final-output e/f, census e/f, bisection-probe e/f) of an honest export."""
    result = verify(module, path, providers="cpu", seeds=seeds, bisect=False)
    finals = [
        c.comparison.ratio
        for c in result.checks
        if c.kind == REFERENCE and c.comparison.ratio is not None
    ]
    model = onnx.load(path)
    specs = graph_input_specs(model)
    sets, _ = stress_feed_sets(specs, (2,), seeds, None, batch_axes(specs))
    runner = TorchRunner(module, [s.name for s in specs])
    probes = []
    for fs in sets:
        found = bisect_module(model, module, fs.feeds, runner.args(fs.feeds))
        probes += [p.comparison.ratio for p in found.probes if p.comparison.ratio is not None]
    return finals, probes, [float(not result.passed)]


def bench(names: list[str], seeds: int) -> tuple[str, str]:
    honest_rows, fault_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for exporter in EXPORTERS:
                module, example = replicas.ALL[name]()
                path = Path(tmp) / f"{name}.{exporter}.onnx"
                try:
                    exported = export(module, example, path, exporter=exporter)
                except Exception as exc:  # an exporter that cannot do this model
                    honest_rows.append(
                        [name, exporter, f"export failed: {exc}"[:90]] + [""] * 6
                    )
                    continue
                if (
                    not exported.passed
                    and not exported.batch_checks[0].checks[0].comparison.max_abs
                ):
                    why = exported.batch_checks[0].error or "check failed"
                    honest_rows.append(
                        [name, exporter, f"graph does not run: {why}"[:90]] + [""] * 6
                    )
                    continue
                census = [
                    c.comparison.ratio
                    for e in exported.census.entries
                    for c in (e.vs_torch, e.vs_oracle)
                    if c is not None and c.comparison.ratio is not None
                ]
                finals, probes, failed = honest_ratios(module, path, seeds)
                verdict = "FAIL" if failed[0] else "pass"
                floors = [
                    c.comparison.floor
                    for c in exported.batch_checks[0].checks
                    if c.comparison.floor is not None
                ]
                honest_rows.append([
                    name, exporter, f"{max(finals):.2f}", f"{max(census, default=0):.2f}",
                    f"{max(probes, default=0):.2f}", str(len(census) + len(probes)),
                    f"{min(floors, default=0):.1e}", verdict,
                    "pass" if exported.passed else "FAIL",
                ])  # fmt: skip
                if exporter != "dynamo":
                    continue
                model = onnx.load(path)
                weights = weight_tensors(model)
                picks = {"first": weights[0], "middle": weights[len(weights) // 2],
                         "last": weights[-1]}  # fmt: skip
                for where, wname in picks.items():
                    for seed in range(2):
                        bad = Path(tmp) / f"{name}.{where}.{seed}.onnx"
                        onnx.save(plant_noise(model, wname, seed), bad)
                        r = verify(module, bad, providers="cpu", bisect=False)
                        refs = [c for c in r.checks if c.kind == REFERENCE]
                        ratio = max(c.comparison.ratio or 0 for c in refs)
                        fault_rows.append([
                            name, where, wname[:40], str(seed), f"{ratio:.1f}",
                            "caught" if not r.passed else "passed",
                        ])  # fmt: skip
    honest = markdown_table(
        ["model", "exporter", "max e/f outputs", "max e/f census", "max e/f probes",
         "intermediate values", "smallest floor", f"verify (K={K:g})", "export"],
        honest_rows,
    )  # fmt: skip
    faults = markdown_table(
        ["model", "weight", "tensor", "seed", "e/f (worst output)", "verify"], fault_rows
    )
    return honest, faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=list(replicas.ALL))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    honest, faults = bench(args.models, args.seeds)
    print(
        f"#### Honest exports: e/f over {args.seeds} seeds (f_min = {FLOOR_MIN['float32']:.2e})"
    )
    print()
    print(honest, end="\n\n")
    print("#### One weight tensor with seeded noise of 1e-4·std (dynamo export)\n")
    print(faults, end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
