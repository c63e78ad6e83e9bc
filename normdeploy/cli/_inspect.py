"""`normdeploy inspect model.onnx`: the norm census of any ONNX file (PyTorch optional)."""

from __future__ import annotations

import argparse

from normdeploy.cli._options import (
    add_graph_input_shape,
    add_max_memory,
    add_output_options,
    check_report_path,
    emit,
    input_shapes,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the norm ops and patterns in an ONNX file, with deployment lints",
        description="Count BatchNormalization/LayerNormalization/GroupNormalization/"
        "InstanceNormalization/RMSNormalization ops and the decomposed LayerNorm, RMSNorm and "
        "GroupNorm patterns, name the norm each one is, and lint them. With --module, also say "
        "how each PyTorch norm layer was written and confirm it numerically. Exit 1 when a "
        "confirmation fails or an [error] lint is printed, 0 otherwise (warnings included).",
    )
    p.add_argument("onnx", metavar="MODEL.onnx", help="ONNX file to inspect")
    p.add_argument(
        "--module",
        metavar="MODEL",
        help="the PyTorch model it came from: reference name or package.module:factory",
    )
    p.add_argument("--weights", help="state_dict for --module (weights_only=True)")
    add_graph_input_shape(p)
    add_max_memory(p)
    add_output_options(p, force_help="overwrite an existing report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.census.inspection import inspect

    check_report_path(args, (args.onnx,))
    module = example_inputs = None
    if args.module:
        from normdeploy.modelspec import resolve_model

        resolved = resolve_model(args.module, weights=args.weights, need_inputs=False)
        module, example_inputs = resolved.module, resolved.example_inputs
    census = inspect(
        args.onnx, module=module, example_inputs=example_inputs,
        input_shapes=input_shapes(args),
    )  # fmt: skip
    emit(census, args)
    return 0 if census.passed and not census.errors else 1
