"""What shapes cost: the export check with dynamic axes beyond the batch, fold-bn's probe for
free symbolic dims, and the exporter-failure hint.

    python benchmarks/shapes_bench.py [--repeats 3]

Prints a Markdown table of medians over ``--repeats`` runs (wall seconds, this process, CPU
onnxruntime): per replica and exporter, export with the batch dynamic only and with
``dynamic_axes``, its check's time and number of input sets; fold-bn on a ``[N, 3, H, W]``
graph that runs only at multiples of 32 (PaddleOCR's detector's constraint), probing H and W
or told them with ``input_shapes``; and how long an export that fails takes to say which
exporter works instead.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import onnx
import torch

from normdeploy.errors import ExportError
from normdeploy.exporting import export
from normdeploy.folding import fold_bn
from normdeploy.report import markdown_table
from tests import replicas
from tests.fold_support import multiple_of_model


class DataDependentBranch(torch.nn.Module):
    """torch.export cannot trace a branch on a tensor's value; TorchScript records one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() > 0:
            return self.fc(x)
        return x


def median_time(work: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def export_rows(tmp: Path, repeats: int) -> list[list[str]]:
    rows = []
    cases = (("bert_like", (0, 1)), ("fcn_like", (0, 2, 3)))
    for name, axes in cases:
        module, example = getattr(replicas, name)()
        for exporter in ("dynamo", "torchscript"):
            for label, dynamic in (("batch", None), (",".join(map(str, axes)), axes)):
                seconds, result = median_time(
                    lambda m=module, e=example, x=exporter, d=dynamic: export(
                        m, e, tmp / "m.onnx", exporter=x, dynamic_axes=d, overwrite=True
                    ),
                    repeats,
                )
                assert result, f"{name} {exporter} {label} failed"
                check, sets = result.timings["check"], len(result.batch_checks)
                rows.append([
                    f"export {name}", exporter, label, f"{seconds:.2f}", f"{check:.3f}",
                    str(sets),
                ])  # fmt: skip
    return rows


def fold_rows(tmp: Path, repeats: int) -> list[list[str]]:
    path = tmp / "det.onnx"
    onnx.save(multiple_of_model(32), path)
    rows = []
    for label, shapes in (("probe H, W", None), ("input_shapes 2x3x32x32", [(2, 3, 32, 32)])):
        seconds, result = median_time(lambda s=shapes: fold_bn(path, input_shapes=s), repeats)
        verify = result.timings["verify"]
        rows.append(["fold-bn det (H, W multiples of 32)", "-", label, f"{seconds:.2f}",
                     f"{verify:.3f}", "1"])  # fmt: skip
    return rows


def hint_rows(tmp: Path, repeats: int) -> list[list[str]]:
    def failing() -> str:
        try:
            export(DataDependentBranch().eval(), torch.randn(2, 4), tmp / "d.onnx")
        except ExportError as exc:
            return str(exc)
        raise AssertionError("the dynamo export was expected to fail")

    seconds, message = median_time(failing, repeats)
    assert str(message).endswith("exporter='torchscript' exports it"), message
    return [
        ["export failure + hint", "dynamo", "torchscript tried", f"{seconds:.2f}", "-", "-"]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            *export_rows(Path(tmp), args.repeats),
            *fold_rows(Path(tmp), args.repeats),
            *hint_rows(Path(tmp), args.repeats),
        ]
    print(
        markdown_table(
            ("what", "exporter", "dynamic axes / inputs", "wall s", "check s", "input sets"),
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
