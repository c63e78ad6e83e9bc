"""The exception hierarchy: user errors (bad input, one clear line, exit 2) vs. everything else.

Anything that is not a :class:`NormdeployError` is an internal bug and keeps its traceback.
Library messages name the function parameter at fault (``batch_sizes: …``, ``opset=21``); the
CLI spells those as its flags (:func:`normdeploy.cli._options.cli_words`).
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator


class NormdeployError(Exception):
    """Base of every error normdeploy raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class UserError(NormdeployError):
    """The user's input is wrong: the message names the file/argument and what is wrong."""


class InputFileError(UserError):
    """An input file is missing, unreadable or not what it claims to be."""


class OutputPathError(UserError):
    """An output path cannot be written (missing directory, exists without force, is the input)."""


class ModelSpecError(UserError):
    """A MODEL argument (reference name or ``module:factory``) cannot be resolved to a module."""


class WeightsError(UserError):
    """A weights file cannot be loaded safely or does not match the model."""


class InvalidArgumentError(UserError):
    """An API argument has an invalid value; the message starts with the parameter's name."""


class InvalidModelError(UserError):
    """An ONNX model or its parameters are invalid (checker failure, NaN statistics, ...)."""


class UserCodeError(UserError):
    """User code (a MODEL's import, factory or forward) ended abnormally: ``sys.exit()``, or a
    ``BaseException`` that is not an ``Exception``. Downstream handlers treat it like any error
    the user's code raised."""


class ResourceLimitError(UserError):
    """An input would make normdeploy allocate more memory than its budget allows."""


class ExportError(NormdeployError):
    """torch could not export the model; the message says which exporter and why."""


class VerificationFailed(NormdeployError):
    """Outputs differ beyond tolerance. Carries the result object that shows where."""

    exit_code = 1

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the signal arrived so that every ``with`` block and
    ``finally`` unwinds (temp files and staging directories are removed) exactly as for Ctrl-C.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


def describe_exit(exc: BaseException) -> str:
    """How a ``BaseException`` that is not an ``Exception`` ended user code, in words."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    text = str(exc).strip()
    return f"raised {type(exc).__name__}" + (f": {text.splitlines()[0][:200]}" if text else "")


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run a MODEL's code (import, factory, forward). ``sys.exit()`` or another
    ``BaseException`` that is not an ``Exception`` becomes :class:`UserCodeError`, so it never
    ends the caller's process; Ctrl-C and the termination signals pass through unchanged."""
    try:
        yield
    except (Exception, KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:
        raise UserCodeError(f"{what} {describe_exit(exc)}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 240, *, innermost: bool = False) -> str:
    """The first line of an exception's message (ANSI codes removed), or its type name.

    ``innermost`` follows ``__cause__`` to the root error: exporters wrap the real error in
    several layers of boilerplate.
    """
    if innermost:
        seen = {id(exc)}
        while exc.__cause__ is not None and id(exc.__cause__) not in seen:
            exc = exc.__cause__
            seen.add(id(exc))
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
