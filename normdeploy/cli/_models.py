"""`normdeploy models`: list the reference models with their norm layers and sizes."""

from __future__ import annotations

import argparse
import sys

from normdeploy.reference_models import describe_reference_models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the reference models")
    p.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.report import render

    sys.stdout.write(render(describe_reference_models(), args.format))
    return 0
