"""`normdeploy deploy MODEL -o DIR` / `deploy --all-reference -o DIR`: the whole job."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from normdeploy.cli._options import (
    add_batch_axis,
    add_dynamic_options,
    add_input_shape,
    add_interface,
    add_keep_failed,
    add_max_memory,
    add_output_options,
    emit,
    input_dtypes,
    input_shapes,
    interface_options,
    parse_batch_sizes,
    parse_named,
)
from normdeploy.errors import InvalidArgumentError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="export → census → fold-bn → verify, with report.md / report.json",
        description="Export MODEL in eval mode, record its norm census, fold every BatchNorm "
        "that folds exactly, verify the final graph against PyTorch eval on every available "
        "provider, and write DIR/model.onnx, DIR/report.json and DIR/report.md. Exit 1 if any "
        "model fails (each failing model is named); one failure does not stop the others.",
    )
    p.add_argument(
        "model", metavar="MODEL", nargs="?", help="reference name or module:factory"
    )
    p.add_argument("--all-reference", action="store_true", help="every model in models/")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--providers", help="cpu,cuda (default: every available provider)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: export's default)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"))
    p.add_argument("--batch-sizes", default="1,3", help="batch sizes to verify (default 1,3)")
    p.add_argument("--weights", help="state_dict to load (torch.load weights_only=True)")
    p.add_argument(
        "--no-merge",
        dest="merge",
        action="store_false",
        help="fold-bn keeps summed parallel branches (no RepVGG-style merge into one Conv)",
    )
    add_dynamic_options(p)
    add_input_shape(p, "example input shape like 1x3x224x224 (replaces the factory's)")
    add_interface(p)
    add_batch_axis(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_keep_failed(p)
    add_max_memory(p)
    add_output_options(p, report=False, force_help="overwrite existing outputs")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.modelspec import reference_registry
    from normdeploy.pipeline import deploy, deploy_many
    from normdeploy.progress import Progress

    if bool(args.model) == bool(args.all_reference):
        raise InvalidArgumentError("deploy: give exactly one of MODEL or --all-reference")
    options: dict[str, Any] = {
        "providers": args.providers,
        "opset": args.opset,
        "exporter": args.exporter,
        "batch_sizes": parse_batch_sizes(args.batch_sizes),
        "overwrite": args.force,
        "merge": args.merge,
        "keep_failed": args.keep_failed,
        "progress": Progress(enabled=not args.quiet),
    }
    if args.all_reference:
        one_model = (
            args.weights, args.input_shape, args.batch_axis, args.dynamic_axes,
            args.input_dtype, args.input_names, args.output_names,
        )  # fmt: skip
        if any(one_model):
            raise InvalidArgumentError(
                "--weights/--input-shape/--input-dtype/--batch-axis/--dynamic-axes/"
                "--input-names/--output-names go with one MODEL, not --all-reference"
            )
        if not args.dynamic_batch:
            options["dynamic_batch"] = False
        summary = deploy_many(reference_registry().names(), args.output, **options)
        failed = summary.failed
        emit(summary, args)
    else:
        result = deploy(
            args.model,
            args.output,
            weights=args.weights,
            input_shapes=input_shapes(args),
            input_dtypes=input_dtypes(args),
            batch_axis=parse_named(args.batch_axis, "--batch-axis", int, "an integer"),
            **interface_options(args),
            **options,
        )
        failed = [] if result else [result.model_name]
        emit(result, args)
    if failed:
        print(f"normdeploy deploy: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
