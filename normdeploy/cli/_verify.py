"""`normdeploy verify MODEL model.onnx` / `verify a.onnx b.onnx`: exit 0 match, 1 mismatch."""

from __future__ import annotations

import argparse

from normdeploy.cli._options import (
    add_input_shape,
    add_max_memory,
    add_output_options,
    check_report_path,
    emit,
    input_shapes,
    parse_batch_sizes,
)


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
    add_input_shape(
        p, "example input shape for MODEL, like 1x3x224x224 (repeat for several inputs)"
    )
    add_max_memory(p)
    add_output_options(p, force_help="overwrite an existing report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.verification.verifier import verify

    check_report_path(args, (args.candidate, args.reference))
    result = verify(
        args.reference,
        args.candidate,
        providers=args.providers,
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        seeds=args.seeds,
        inputs=args.inputs,
        atol=args.atol,
        rtol=args.rtol,
        bisect=args.bisect,
        weights=args.weights,
        input_shapes=input_shapes(args),
    )
    emit(result, args)
    return 0 if result.passed else 1
