"""Reference PyTorch models with normalization layers, and their registry.

Every factory returns a model in eval mode whose BatchNorm statistics come from real train-mode
passes over shifted and scaled random batches (seeded), and whose norm affine parameters are not
the identity, so folding and export are tested on numbers that can go wrong.
"""

from __future__ import annotations

from . import cnn, norms, transformer  # noqa: F401  (registration side effect)
from ._registry import REGISTRY, ReferenceModel, get, names, register

__all__ = ["REGISTRY", "ReferenceModel", "get", "names", "register"]
