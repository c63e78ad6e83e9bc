"""Graph passes: small declared units that say what they changed.

A pass takes an ``onnx.ModelProto`` and returns a :class:`PassResult`: the (possibly new) model
and whether it was modified. Passes that rewrite in place say so (``in_place = True``); callers
that need the original keep a copy first. Each pass lives in its own module with a docstring
that says what it removes and when it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class PassResult:
    """The model after a pass, and whether the pass changed it."""

    model: onnx.ModelProto
    modified: bool


class GraphPass:
    """Base of graph passes: ``__call__(model) -> PassResult``."""

    name: str = "pass"
    in_place: bool = True

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError
