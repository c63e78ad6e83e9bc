"""Command-line interface: parse arguments, call the library, print. No logic lives here.

``main(argv) -> int``: typed user errors become one line on stderr and exit code 2 (1 for a
numerical mismatch); internal bugs keep their traceback. ``--debug`` shows tracebacks always.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from normdeploy import __version__
from normdeploy.cli._options import cli_words
from normdeploy.errors import NormdeployError

# One module per subcommand; each has add_parser(subparsers) and run(args) -> int.
COMMANDS = ("models", "export", "inspect", "fold-bn", "fuse-norms", "verify", "deploy")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="normdeploy",
        description="Export PyTorch models with normalization layers to ONNX, fold BatchNorm, "
        "and verify that onnxruntime computes what PyTorch computes in eval mode.",
    )
    parser.add_argument("--version", action="version", version=f"normdeploy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for all errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"normdeploy.cli._{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Third-party chatter (exporter, torch init warnings from user factories) stays out of
        # the way of the one line a user error gets; --verbose shows it.
        warnings.simplefilter("ignore")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except NormdeployError as exc:
        if args.debug:
            raise
        print(f"normdeploy {args.command}: error: {cli_words(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"normdeploy {args.command}: interrupted; no output was written", file=sys.stderr
        )
        return 130
