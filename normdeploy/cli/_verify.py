"""`normdeploy verify MODEL model.onnx` / `verify a.onnx b.onnx` / `verify --load-run run.npz
model.onnx`: exit 0 match, 1 mismatch."""

from __future__ import annotations

import argparse

from normdeploy.cli._options import (
    add_batch_axis,
    add_graph_input_shape,
    add_max_memory,
    add_output_options,
    check_report_path,
    emit,
    input_shapes,
    parse_batch_sizes,
    parse_named,
)
from normdeploy.errors import InvalidArgumentError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="prove an ONNX graph computes what the PyTorch model (eval) or another graph does",
        description="Run REFERENCE (a reference model name, package.module:factory, or an ONNX "
        "file) and CANDIDATE on the same stress inputs, shaped as CANDIDATE declares its "
        "inputs (a factory may return only a module) on every available onnxruntime provider, "
        "judge every output's error against the reference's own float32 error (both measured "
        "against a float64 evaluation), check batch independence and eval semantics, and "
        "bisect to the first differing module on a mismatch. With --load-run, the reference "
        "is a run saved by --save-run (no PyTorch needed). Exit 0 when everything matches, 1 "
        "on a mismatch, 2 on bad input.",
    )
    p.add_argument("reference", metavar="REFERENCE", help="MODEL or reference .onnx")
    p.add_argument("candidate", metavar="CANDIDATE", nargs="?", help="ONNX file to verify")
    p.add_argument(
        "--providers",
        help="comma-separated: cpu,cuda (default: every available one; cuda when present)",
    )
    p.add_argument(
        "--batch-sizes",
        help="comma-separated batch sizes (default: the batch of --input-shape, else 1,3)",
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="input seeds per batch size (default 1)"
    )
    p.add_argument(
        "--inputs", metavar="FEEDS.npz", help="extra feeds: one array per input name"
    )
    p.add_argument(
        "--atol",
        action="append",
        metavar="[NAME=]X",
        help="fixed absolute bound instead of the measured-noise rule, for output NAME (or "
        "every output); repeatable",
    )
    p.add_argument(
        "--rtol",
        action="append",
        metavar="[NAME=]X",
        help="fixed relative bound (elementwise, atol + rtol*|expected|), like --atol",
    )
    add_batch_axis(p)
    p.add_argument(
        "--save-run",
        metavar="FILE.npz",
        help="also write the inputs, reference outputs, float64 truth and floors",
    )
    p.add_argument(
        "--load-run",
        metavar="FILE.npz",
        help="use a run saved with --save-run as the reference: verify --load-run FILE.npz "
        "CANDIDATE.onnx",
    )
    p.add_argument("--no-bisect", dest="bisect", action="store_false", help="skip bisection")
    p.add_argument("--weights", help="state_dict for MODEL (torch.load weights_only=True)")
    add_graph_input_shape(p)
    add_max_memory(p)
    add_output_options(p, force_help="overwrite an existing report or --save-run file")
    p.set_defaults(run=run)


def _sides(args: argparse.Namespace) -> tuple[object, str]:
    """(reference, candidate) from the positionals and --load-run."""
    if args.load_run:
        if args.candidate is not None:
            raise InvalidArgumentError(
                "verify: with --load-run give only CANDIDATE (the run is the reference)"
            )
        from normdeploy.verification.record import load_run

        return load_run(args.load_run), args.reference
    if args.candidate is None:
        raise InvalidArgumentError("verify: give REFERENCE and CANDIDATE (or --load-run FILE)")
    return args.reference, args.candidate


def run(args: argparse.Namespace) -> int:
    from normdeploy.verification.verifier import verify

    reference, candidate = _sides(args)
    sources = [s for s in (candidate, args.reference, args.load_run) if s]
    check_report_path(args, sources)
    if args.save_run:
        from normdeploy.io import check_output_path

        check_output_path(
            args.save_run, inputs=tuple(sources), overwrite=args.force, what="run"
        )
    result = verify(
        reference,
        candidate,
        providers=args.providers,
        batch_sizes=None if args.batch_sizes is None else parse_batch_sizes(args.batch_sizes),
        seeds=args.seeds,
        inputs=args.inputs,
        atol=parse_named(args.atol, "--atol", float, "a number"),
        rtol=parse_named(args.rtol, "--rtol", float, "a number"),
        bisect=args.bisect,
        weights=args.weights,
        input_shapes=input_shapes(args),
        batch_axis=parse_named(args.batch_axis, "--batch-axis", int, "an integer"),
        save_run=args.save_run,
        overwrite=args.force,
    )
    emit(result, args)
    return 0 if result.passed else 1
