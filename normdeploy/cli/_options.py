"""Options and output shared by the subcommands: one definition, the same behaviour everywhere."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from normdeploy.errors import InvalidArgumentError

FORMATS = ("text", "json", "markdown")


def add_input_shape(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--input-shape", action="append", metavar="SHAPE", help=help_text)


def add_output_options(
    p: argparse.ArgumentParser, *, report: bool = True, force_help: str | None = None
) -> None:
    """--report (optional), --format, and -f/--force when ``force_help`` is given."""
    if report:
        p.add_argument("--report", help="also write the report (.json, .md or text)")
    p.add_argument("--format", choices=FORMATS, default="text")
    if force_help:
        p.add_argument("-f", "--force", action="store_true", help=force_help)


def input_shapes(args: argparse.Namespace) -> list[tuple[int, ...]] | None:
    """The parsed --input-shape values, or None when none were given."""
    from normdeploy.modelspec import parse_shape

    return [parse_shape(s) for s in args.input_shape] if args.input_shape else None


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,3' → (1, 3); InvalidArgumentError for anything that is not positive integers."""
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"--batch-sizes: '{text}' is not a comma-separated list of integers"
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise InvalidArgumentError(f"--batch-sizes: '{text}' must list positive batch sizes")
    return sizes


def check_report_path(
    args: argparse.Namespace, inputs: Sequence[str | os.PathLike[str]]
) -> None:
    """Fail before any work when --report cannot be written."""
    if args.report:
        from normdeploy.io import check_output_path

        check_output_path(
            args.report, inputs=tuple(inputs), overwrite=args.force, what="--report"
        )


def emit(result: Any, args: argparse.Namespace) -> None:
    """Print the result in --format, and write --report when asked."""
    from normdeploy.report import render, write_report

    sys.stdout.write(render(result, args.format))
    if getattr(args, "report", None):
        write_report(result, args.report)
