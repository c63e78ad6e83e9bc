"""The exception hierarchy: user errors (bad input, one clear line, exit 2) vs. everything else.

Anything that is not a :class:`NormdeployError` is an internal bug and keeps its traceback.
"""

from __future__ import annotations


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
    """A command-line or API argument has an invalid value."""


class InvalidModelError(UserError):
    """An ONNX model or its parameters are invalid (checker failure, NaN statistics, ...)."""


class ExportError(NormdeployError):
    """torch could not export the model; the message says which exporter and why."""


class VerificationFailed(NormdeployError):
    """Outputs differ beyond tolerance. Carries the result object that shows where."""

    exit_code = 1

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result
