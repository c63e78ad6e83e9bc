"""`normdeploy fuse-norms in.onnx -o out.onnx [--opset N]`: decomposed LayerNorm/RMSNorm become
native ops, with a ledger."""

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
        "fuse-norms",
        help="rewrite decomposed LayerNorm/RMSNorm as LayerNormalization/RMSNormalization",
        description="Rewrite every decomposed LayerNorm (opset >= 17) and RMSNorm (opset >= 23) "
        "that fuses exactly into the native op, confirm each against its decomposition, explain "
        "every pattern kept and every look-alike left alone, and (unless --no-verify) check the "
        "result against the input on onnxruntime before writing it. The opset is kept unless "
        "--opset asks for another: then the whole model is converted first and the converted "
        "graph checked. Exit 1 when a check fails (nothing is written).",
    )
    add_graph_pass_options(p, "ONNX file (never modified)", "skip the checks")
    p.add_argument(
        "--opset",
        type=int,
        metavar="N",
        help="convert the model to opset N first (17: LayerNormalization, 23: RMSNormalization)",
    )
    add_output_options(p, force_help="overwrite existing outputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.folding import fuse_norms_file

    check_graph_pass_report(args)
    result = run_reported(
        args,
        lambda: fuse_norms_file(
            args.input,
            args.output,
            opset=args.opset,
            overwrite=args.force,
            verify=args.verify,
            keep_failed=args.keep_failed,
            input_shapes=input_shapes(args),
            inputs=args.inputs,
        ),
    )
    emit(result, args)
    return 0
