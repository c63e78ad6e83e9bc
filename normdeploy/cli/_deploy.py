"""`normdeploy deploy MODEL -o DIR` / `deploy --all-reference -o DIR`: the whole job."""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help="e.g. 1x3x224x224")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("-f", "--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(run=run)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidArgumentError(f"--batch-sizes: '{text}' is not a list like 1,3")
    return sizes


def run(args: argparse.Namespace) -> int:
    from normdeploy.modelspec import parse_shape, reference_registry
    from normdeploy.pipeline import deploy, deploy_many
    from normdeploy.progress import Progress
    from normdeploy.report import render

    if bool(args.model) == bool(args.all_reference):
        raise InvalidArgumentError("deploy: give exactly one of MODEL or --all-reference")
    options = {
        "providers": args.providers,
        "opset": args.opset,
        "exporter": args.exporter,
        "batch_sizes": _batch_sizes(args.batch_sizes),
        "overwrite": args.force,
        "progress": Progress(enabled=not args.quiet),
    }
    if args.all_reference:
        if args.weights or args.input_shape:
            raise InvalidArgumentError(
                "--weights/--input-shape go with one MODEL, not --all-reference"
            )
        result = deploy_many(reference_registry().names(), args.output, **options)
        failed = result.failed
    else:
        shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
        result = deploy(
            args.model, args.output, weights=args.weights, input_shapes=shapes, **options
        )
        failed = [] if result else [result.model_name]
    sys.stdout.write(render(result, args.format))
    if failed:
        print(f"normdeploy deploy: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
