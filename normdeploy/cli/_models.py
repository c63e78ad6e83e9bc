"""`normdeploy models`: list the reference models with their norm layers and sizes."""

from __future__ import annotations

import argparse

from normdeploy.cli._options import add_output_options, emit


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the reference models")
    add_output_options(p, report=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from normdeploy.reference_models import describe_reference_models

    emit(describe_reference_models(), args)
    return 0
