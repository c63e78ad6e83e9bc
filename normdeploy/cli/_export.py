"""`normdeploy export MODEL -o model.onnx`: eval-mode export, batch check and norm census."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normdeploy.cli._options import (
    add_dynamic_options,
    add_input_shape,
    add_interface,
    add_keep_failed,
    add_max_memory,
    add_output_options,
    check_report_path,
    emit,
    input_dtypes,
    input_shapes,
    interface_options,
)
from normdeploy.exporting import (
    DEFAULT_EXPORTER,
    DEFAULT_OPSET,
    EXPORTERS,
    OFFERED_OPSETS,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a PyTorch model to ONNX in eval mode and take its norm census",
        description="Export MODEL (a reference model name or package.module:factory) in eval "
        "mode, check onnxruntime against PyTorch eval at batch 1 and 3 (and each dynamic axis at "
        "another size), and report how every norm layer was written. Exit 1 when the outputs "
        "differ, 2 when the model rejects a size its dynamic axes allow.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="reference model name or package.module:factory"
    )
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}; tested: "
        f"{', '.join(map(str, OFFERED_OPSETS))})",
    )
    p.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER)
    add_dynamic_options(p)
    add_input_shape(p, "example input shape like 1x3x224x224 (replaces the factory's)")
    add_interface(p)
    p.add_argument("--weights", help="state_dict to load (torch.load weights_only=True)")
    simplify = p.add_mutually_exclusive_group()
    simplify.add_argument(
        "--simplify",
        dest="simplify",
        action="store_true",
        default=None,
        help="run onnxsim (default: only after the torchscript exporter)",
    )
    simplify.add_argument("--no-simplify", dest="simplify", action="store_false")
    add_keep_failed(p)
    add_max_memory(p)
    add_output_options(p, force_help="overwrite existing outputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.exporting import export_model
    from normdeploy.io import data_file_for, failed_file_for

    out = Path(args.output)
    check_report_path(
        args,
        (),
        [
            (out, "output"),
            (data_file_for(out), "output's external data"),
            *([(failed_file_for(out), "failed graph")] if args.keep_failed else []),
        ],
    )
    result = export_model(
        args.model,
        args.output,
        weights=args.weights,
        input_shapes=input_shapes(args),
        input_dtypes=input_dtypes(args),
        opset=args.opset,
        exporter=args.exporter,
        **interface_options(args),
        simplify=args.simplify,
        overwrite=args.force,
        keep_failed=args.keep_failed,
    )
    emit(result, args)
    if result.passed:
        return 0
    print(f"normdeploy export: {result.failure_line()}", file=sys.stderr)
    return 1
