"""Options and output shared by the subcommands: one definition, the same behaviour everywhere."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from normdeploy.errors import InvalidArgumentError, OutputPathError, VerificationFailed
from normdeploy.report import Renderable
from normdeploy.shapes import DTYPES

FORMATS = ("text", "json", "markdown")

# Library messages name function parameters; the CLI speaks of its flags.
FLAGS = {
    "batch_sizes": "--batch-sizes",
    "input_shapes": "--input-shape",
    "providers": "--providers",
    "seeds": "--seeds",
    "atol": "--atol",
    "rtol": "--rtol",
    "opset": "--opset",
    "exporter": "--exporter",
    "inputs": "--inputs",
    "weights": "--weights",
    "max_memory": "--max-memory",
    "output_path": "-o",
    "out_dir": "-o",
    "path": "-o",
    "report": "--report",
    "batch_axis": "--batch-axis",
    "save_run": "--save-run",
    "dynamic_axes": "--dynamic-axes",
    "input_dtypes": "--input-dtype",
    "input_names": "--input-names",
    "output_names": "--output-names",
}
_SPELLED = {
    "dynamic_batch=False": "--static",
    "dynamic_batch=True": "--dynamic-batch",
    "verify=False": "--no-verify",
    "keep_failed=True": "--keep-failed",
    "overwrite=True": "--force",
}
_NAMES = "|".join(FLAGS)
_ASSIGNMENT = re.compile(rf"\b({_NAMES})=(['\"]?)([^'\"\s,;)]+)\2")
_LEADING = re.compile(rf"^({_NAMES}):")


def cli_words(message: str) -> str:
    """A library message in the CLI's words: ``opset=18`` → ``--opset 18``, a leading
    ``batch_sizes:`` → ``--batch-sizes:``, ``dynamic_batch=False`` → ``--static``."""
    for words, flag in _SPELLED.items():
        message = message.replace(words, flag)
    message = _ASSIGNMENT.sub(lambda m: f"{FLAGS[m.group(1)]} {m.group(3)}", message)
    return _LEADING.sub(lambda m: FLAGS[m.group(1)] + ":", message)


def add_input_shape(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="[NAME=]SHAPE",
        help=help_text + "; SHAPE for every input in order, or NAME=SHAPE per input "
        "(repeatable)",
    )


def add_graph_input_shape(p: argparse.ArgumentParser) -> None:
    """--input-shape for commands that read an ONNX file: sizes for its symbolic dims."""
    add_input_shape(
        p,
        "sizes for the graph's symbolic dims, like 1x3x640x640 (default: the sizes its "
        "declared shapes and the model's example inputs give, else the first of a few sizes "
        "at which the graph runs); static dims must match",
    )


def add_graph_pass_options(
    p: argparse.ArgumentParser, input_help: str, verify_help: str
) -> None:
    """What every command that rewrites an ONNX file into another takes (fold-bn, fuse-norms):
    IN.onnx, -o, --no-verify, --input-shape, --inputs, --keep-failed and --max-memory."""
    p.add_argument("input", metavar="IN.onnx", help=input_help)
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="file to write")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=verify_help)
    add_graph_input_shape(p)
    p.add_argument(
        "--inputs",
        metavar="FEEDS.npz",
        help="feeds the check also runs: one array per input name",
    )
    add_keep_failed(p)
    add_max_memory(p)


def add_dynamic_options(p: argparse.ArgumentParser) -> None:
    """--dynamic-axes, --dynamic-batch (its spelling of 0) and --static (none)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--dynamic-axes",
        action="append",
        metavar="[NAME=]AXES",
        help="comma-separated axis indices that stay symbolic, for every input (0,1: batch "
        "and sequence; 0,2,3: batch, height, width) or NAME=AXES for one input (repeatable); "
        "default 0 (the batch axis); an index beyond an input's rank is ignored for it; the "
        "same index on inputs whose example sizes agree is one dim",
    )
    group.add_argument(
        "--dynamic-batch",
        dest="dynamic_batch",
        action="store_true",
        default=True,
        help="only the batch axis is symbolic (the default; --dynamic-axes 0)",
    )
    group.add_argument(
        "--static", dest="dynamic_batch", action="store_false", help="no symbolic axis"
    )


def add_interface(p: argparse.ArgumentParser) -> None:
    """Export's interface options: dtypes of made inputs, names."""
    p.add_argument(
        "--input-dtype",
        action="append",
        metavar="[NAME=]DTYPE",
        help="dtype of the inputs --input-shape makes where there is no example input "
        "(default float32; an example input's dtype is kept): " + ", ".join(DTYPES),
    )
    p.add_argument("--input-names", metavar="A,B", help="names of the graph's inputs")
    p.add_argument(
        "--output-names",
        metavar="A,B",
        help="names of the graph's outputs (default: a dict's keys, else the exporter's)",
    )


def add_batch_axis(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-axis",
        action="append",
        metavar="[NAME=]N",
        help="the batch axis of input NAME (or of every input) when it is not the graph's dim "
        "named 'batch' (default: that dim, else 0); repeatable",
    )


def add_output_options(
    p: argparse.ArgumentParser, *, report: bool = True, force_help: str | None = None
) -> None:
    """--report (optional), --format, and -f/--force when ``force_help`` is given."""
    if report:
        p.add_argument("--report", help="also write the report (.json, .md or text)")
    p.add_argument("--format", choices=FORMATS, default="text")
    if force_help:
        p.add_argument("-f", "--force", action="store_true", help=force_help)


def add_keep_failed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="when the check fails, keep the graph as NAME.failed.onnx (default: write nothing)",
    )


def add_max_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget for the inputs and values normdeploy allocates, e.g. 8G "
        "(default: $NORMDEPLOY_MAX_MEMORY, else half the available memory)",
    )


def input_shapes(
    args: argparse.Namespace,
) -> list[tuple[int, ...]] | dict[str, tuple[int, ...]] | None:
    """The parsed --input-shape values: a shape per input in order, or {NAME: shape}; None
    when none were given."""
    from normdeploy.shapes import parse_shape

    if not args.input_shape:
        return None
    named = ["=" in text for text in args.input_shape]
    if any(named) and not all(named):
        raise InvalidArgumentError(
            "--input-shape: give SHAPE for every input in order, or NAME=SHAPE for each, "
            "not both"
        )
    if not any(named):
        return [parse_shape(text) for text in args.input_shape]
    shapes = parse_named(
        args.input_shape, "--input-shape", parse_shape, "a shape like 1x3x8x8"
    )
    return dict(shapes)


def interface_options(args: argparse.Namespace) -> dict[str, Any]:
    """export()'s keyword arguments from --dynamic-axes, --input-names, --output-names (and
    --static/--dynamic-batch)."""
    from normdeploy.shapes import parse_axes

    return {
        "dynamic_batch": args.dynamic_batch,
        "dynamic_axes": parse_named(
            args.dynamic_axes, "--dynamic-axes", parse_axes, "axis indices like 0,2,3"
        ),
        "input_names": args.input_names,
        "output_names": args.output_names,
    }


def input_dtypes(args: argparse.Namespace) -> Any:
    """--input-dtype: one dtype name for every input, or {NAME: dtype}."""
    return parse_named(args.input_dtype, "--input-dtype", str, "a dtype name")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,3' → (1, 3); the values themselves are checked by the library."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"--batch-sizes: '{text}' is not a comma-separated list of integers"
        ) from None


def parse_named(
    values: Sequence[str] | None, flag: str, convert: Callable[[str], Any], what: str
) -> Any:
    """Repeated ``VALUE`` / ``NAME=VALUE`` flags: None, one value for everything, or a mapping
    (a bare value then stands for every name not given, under the key ``"*"``)."""
    if not values:
        return None
    named: dict[str, Any] = {}
    for text in values:
        name, sep, value = text.rpartition("=")
        key = name.strip() if sep else "*"
        if sep and not key:
            raise InvalidArgumentError(f"{flag}: '{text}' has an empty NAME")
        try:
            named[key] = convert(value.strip())
        except ValueError:
            raise InvalidArgumentError(
                f"{flag}: '{text}' must be X or NAME=X with X {what}"
            ) from None
    if list(named) == ["*"]:
        return named["*"]
    return named


def check_report_path(
    args: argparse.Namespace,
    inputs: Sequence[str | os.PathLike[str]],
    outputs: Sequence[tuple[str | os.PathLike[str], str]] = (),
) -> None:
    """Fail before any work when --report cannot be written: against the inputs, existing
    files, and the command's other ``outputs`` (which the library checks itself)."""
    if args.report is not None:
        from normdeploy.io import OutputPlan, plan_outputs

        plan: OutputPlan = plan_outputs([], inputs=inputs, overwrite=args.force)
        for path, what in outputs:
            plan.reserve(path, what)
        plan.add(args.report, "report")


def check_graph_pass_report(args: argparse.Namespace) -> None:
    """:func:`check_report_path` for a command that rewrites ``args.input`` into
    ``args.output`` (fold-bn, fuse-norms): the output, its external data and, with
    --keep-failed, the failed graph are its other outputs."""
    from normdeploy.io import data_file_for, failed_file_for

    out = Path(args.output)
    outputs = [(out, "output"), (data_file_for(out), "output's external data")]
    if args.keep_failed:
        outputs.append((failed_file_for(out), "failed graph"))
    inputs = [args.input, *([args.inputs] if getattr(args, "inputs", None) else [])]
    check_report_path(args, inputs, outputs)


class StdoutClosed(Exception):
    """Whoever read our standard output went away (``normdeploy … | head``)."""


def emit(result: Renderable, args: argparse.Namespace) -> None:
    """Write --report when asked, then print the result in --format (a closed pipe on stdout
    then costs nothing already done)."""
    from normdeploy.report import render, write_report

    if getattr(args, "report", None) is not None:
        write_report(result, args.report, overwrite=args.force)
    try:
        sys.stdout.write(render(result, args.format))
        sys.stdout.flush()
    except BrokenPipeError:
        raise StdoutClosed from None
    except OSError as exc:
        raise OutputPathError(
            f"standard output: cannot write the result ({exc.strerror or exc})"
        ) from None


def run_reported(args: argparse.Namespace, work: Callable[[], Any]) -> Any:
    """Run ``work``; when it fails a check, --report still gets the failing result (the
    diagnosis), then the failure goes on to ``main``."""
    try:
        return work()
    except VerificationFailed as exc:
        if getattr(args, "report", None) is not None and exc.result is not None:
            from normdeploy.report import write_report

            write_report(exc.result, args.report, overwrite=getattr(args, "force", False))  # type: ignore[arg-type]
        raise
