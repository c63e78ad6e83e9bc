"""`normdeploy fold-bn in.onnx -o out.onnx`: fold BatchNorm exactly, with a ledger."""

from __future__ import annotations

import argparse

from normdeploy.cli._options import (
    add_graph_pass_options,
    add_output_options,
    check_graph_pass_report,
    emit,
    input_shapes,
    run_reported,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fold-bn",
        help="fold BatchNormalization into neighbouring Conv/ConvTranspose/Gemm/MatMul",
        description="Fold every BatchNormalization that folds exactly, merge summed parallel "
        "branches on the same input into one Conv (RepVGG-style blocks, identity BatchNorms "
        "included; --no-merge keeps them), explain every one kept, and (unless --no-verify) "
        "check the result against the input on onnxruntime before writing it. Exit 1 when "
        "they differ (nothing is written).",
    )
    add_graph_pass_options(
        p, "ONNX file to fold (never modified)", "skip the check against the input"
    )
    p.add_argument(
        "--no-merge",
        dest="merge",
        action="store_false",
        help="keep summed parallel branches (do not merge them into one Conv)",
    )
    add_output_options(p, force_help="overwrite existing outputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # torch is never imported on this path: fold-bn's memory is measured against load+save.
    from normdeploy.folding import fold_bn_file

    check_graph_pass_report(args)
    result = run_reported(
        args,
        lambda: fold_bn_file(
            args.input, args.output, overwrite=args.force, verify=args.verify,
            merge=args.merge, keep_failed=args.keep_failed, input_shapes=input_shapes(args),
            inputs=args.inputs,
        ),
    )  # fmt: skip
    emit(result, args)
    return 0
