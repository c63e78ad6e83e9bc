"""`normdeploy inspect model.onnx`: the norm census of any ONNX file (PyTorch optional)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the norm ops and patterns in an ONNX file, with deployment lints",
        description="Count BatchNormalization/LayerNormalization/GroupNormalization/"
        "InstanceNormalization ops and the decomposed LayerNorm and GroupNorm patterns, and "
        "lint them. With --module, also say how each PyTorch norm layer was written and "
        "confirm it numerically (exit 1 when a confirmation fails).",
    )
    p.add_argument("onnx", metavar="MODEL.onnx", help="ONNX file to inspect")
    p.add_argument(
        "--module",
        metavar="MODEL",
        help="the PyTorch model it came from: reference name or package.module:factory",
    )
    p.add_argument("--weights", help="state_dict for --module (weights_only=True)")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE",
        help="input shape for the confirmation run, e.g. 2x3x32x32",
    )
    p.add_argument("--report", help="also write the report (.json, .md or text)")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.census import inspect
    from normdeploy.io import check_output_path
    from normdeploy.report import render, write_report

    if args.report:
        check_output_path(
            args.report, inputs=(args.onnx,), overwrite=args.force, what="--report"
        )
    module = example_inputs = None
    if args.module:
        from normdeploy.modelspec import parse_shape, resolve_model

        shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
        resolved = resolve_model(args.module, weights=args.weights, input_shapes=shapes)
        module, example_inputs = resolved.module, resolved.example_inputs
    census = inspect(args.onnx, module=module, example_inputs=example_inputs)
    sys.stdout.write(render(census, args.format))
    if args.report:
        write_report(census, args.report)
    return 0 if census.passed else 1
