"""Command-line interface: parse arguments, call the library, print. No logic lives here.

``main(argv) -> int``: typed user errors become one line on stderr and exit code 2 (1 for a
numerical mismatch); internal bugs keep their traceback. ``--debug`` shows tracebacks always.
Ctrl-C, SIGTERM and SIGHUP unwind the work (temporary files and staging directories are
removed), print one line and exit 128 + the signal number. A MODEL's code that calls
``sys.exit()`` (or raises another ``BaseException``) is a user-code error: one line, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from types import FrameType

from normdeploy import __version__
from normdeploy.cli._options import StdoutClosed, cli_words
from normdeploy.errors import Interrupted, NormdeployError, describe_exit, interrupt_exit_code

# One module per subcommand; each has add_parser(subparsers) and run(args) -> int.
COMMANDS = ("models", "export", "inspect", "fold-bn", "fuse-norms", "verify", "deploy")
# Signals that end a run the way Ctrl-C does: with the work unwound, not cut off.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


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


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise where they arrive (KeyboardInterrupt, Interrupted), so
    ``with`` blocks and ``finally`` clean up; a second signal during that cleanup is held
    back, not allowed to cut it short. Previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return
    arrived: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)
        if len(arrived) > 1:
            return  # already unwinding
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    previous = {}
    for signum in (signal.SIGINT, *TERMINATING_SIGNALS):
        with contextlib.suppress(OSError, ValueError):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def entry() -> int:
    """The process's entry point (``cli.py``, the ``normdeploy`` script): :func:`main` in a
    process that owns its allocator (:func:`normdeploy.budget.tune_allocator`), then
    ``gc.freeze()`` before the interpreter's teardown. torch's exporter leaves about half a
    million tracked objects, and the cyclic collections Python runs over them while it
    finalizes took 1.0-1.4 s after a DenseNet-121 export (as long as the export's own check).
    Nothing is left to collect in a process about to exit; atexit handlers, finalizers of what
    reference counting frees and the flush of buffered output still run."""
    from normdeploy.budget import tune_allocator

    tune_allocator()
    code = main()
    gc.freeze()
    return code


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
    prefix = f"normdeploy {args.command}"
    try:
        with signals_unwind():
            return _run(args)
    except NormdeployError as exc:
        if args.debug:
            raise
        print(f"{prefix}: error: {cli_words(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except StdoutClosed:
        # Like any Unix filter whose reader left: quiet, 128 + SIGPIPE. Later flushes of
        # stdout (at exit) go nowhere instead of failing again.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        how = f" by {exc.name}" if isinstance(exc, Interrupted) else ""
        print(f"{prefix}: interrupted{how}; no output was written", file=sys.stderr)
        return interrupt_exit_code(exc)
    except Exception:
        raise  # a bug in normdeploy: keep the traceback
    except BaseException as exc:
        # Our code raises only Exceptions: SystemExit (or another BaseException) here came from
        # a MODEL's code (its import, factory or forward) outside the library's own guards.
        if args.debug:
            raise
        print(
            f"{prefix}: error: the model's code {describe_exit(exc)}; a MODEL's factory and "
            "forward must return, not exit",
            file=sys.stderr,
        )
        return 2


def _run(args: argparse.Namespace) -> int:
    from normdeploy.budget import memory_limit

    with memory_limit(getattr(args, "max_memory", None)):
        return int(args.run(args))
