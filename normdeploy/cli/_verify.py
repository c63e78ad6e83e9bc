"""`normdeploy verify MODEL model.onnx` / `verify a.onnx b.onnx`: exit 0 match, 1 mismatch."""

from __future__ import annotations

import argparse
import sys

from normdeploy.errors import InvalidArgumentError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="prove an ONNX graph computes what the PyTorch model (eval) or another graph does",
        description="Run REFERENCE (a reference model name, package.module:factory, or an ONNX "
        "file) and CANDIDATE on the same stress inputs on every available onnxruntime provider, "
        "check batch independence and eval semantics, and bisect to the first differing module "
        "on a mismatch. Exit 0 when everything matches, 1 on a mismatch, 2 on bad input.",
    )
    p.add_argument("reference", metavar="REFERENCE", help="MODEL or reference .onnx")
    p.add_argument("candidate", metavar="CANDIDATE", help="ONNX file to verify")
    p.add_argument(
        "--providers",
        help="comma-separated: cpu,cuda (default: every available one; cuda when present)",
    )
    p.add_argument(
        "--batch-sizes", default="1,3", help="comma-separated batch sizes (default 1,3)"
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="input seeds per batch size (default 1)"
    )
    p.add_argument(
        "--inputs", metavar="FEEDS.npz", help="extra feeds: one array per input name"
    )
    p.add_argument(
        "--atol", type=float, help="absolute tolerance (default per dtype/provider)"
    )
    p.add_argument(
        "--rtol", type=float, help="relative tolerance (default per dtype/provider)"
    )
    p.add_argument("--no-bisect", dest="bisect", action="store_false", help="skip bisection")
    p.add_argument("--weights", help="state_dict for MODEL (torch.load weights_only=True)")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE",
        help="example input shape for MODEL, like 1x3x224x224 (repeat for several inputs)",
    )
    p.add_argument("--report", help="also write the report (.json, .md or text)")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(run=run)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"--batch-sizes: '{text}' is not a comma-separated list of integers"
        ) from None
    return sizes


def run(args: argparse.Namespace) -> int:
    from normdeploy.io import check_output_path
    from normdeploy.modelspec import parse_shape
    from normdeploy.report import render, write_report
    from normdeploy.verification import verify

    if args.report:
        check_output_path(
            args.report,
            inputs=(args.candidate, args.reference),
            overwrite=args.force,
            what="--report",
        )
    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
    result = verify(
        args.reference,
        args.candidate,
        providers=args.providers,
        batch_sizes=_batch_sizes(args.batch_sizes),
        seeds=args.seeds,
        inputs=args.inputs,
        atol=args.atol,
        rtol=args.rtol,
        bisect=args.bisect,
        weights=args.weights,
        input_shapes=shapes,
    )
    sys.stdout.write(render(result, args.format))
    if args.report:
        write_report(result, args.report)
    return 0 if result.passed else 1
